//! Devices that compute the forward pass: a model built for a block hash, then batches of
//! input embeddings in, last-position logits out.

pub mod cpu;
pub mod cuda;

use crate::pow::dtype::Dtype;
use crate::pow::params::Params;

/// What can go wrong inside a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request asks for something this backend cannot do (a dtype, fp8, a size).
    #[error("{0}")]
    Unsupported(String),
    /// Not enough memory for the model or the batch.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The device failed.
    #[error("device failure: {0}")]
    Device(String),
}

/// A device that computes the forward pass.
pub trait Backend: Send + Sync {
    /// A model resident on the device, ready to run batches.
    type Model: Send + Sync;

    /// Short name for logs ("cpu", "cuda:0").
    fn name(&self) -> String;

    /// Build the weights of `params` for `block_hash` in `dtype` on the device.
    fn build_model(
        &self,
        block_hash: &str,
        params: &Params,
        dtype: Dtype,
    ) -> Result<Self::Model, BackendError>;

    /// Forward `batch` nonces' inputs (`batch * seq_len * dim` values, each exactly
    /// representable in the model's dtype) and return the f32 logits of the last position,
    /// `batch * vocab_size` values.
    fn forward_last_logits(
        &self,
        model: &Self::Model,
        inputs: &[f32],
        batch: usize,
    ) -> Result<Vec<f32>, BackendError>;
}
