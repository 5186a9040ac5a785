//! Devices that compute the forward pass, behind one seam: [`Backend`]. A backend builds a
//! model for a block hash on its device, says whether it can serve a request, and runs
//! prepared batches of nonces ([`batch`]) to distances. The CPU ([`cpu::CpuBackend`]) and a
//! GPU group ([`cuda::CudaBackend`]) implement it; the engine drives every device through it
//! and never names either.

pub mod batch;
pub mod cpu;
pub mod cuda;
pub mod selftest;

pub use batch::{BatchResult, JobSpec, PreparedBatch, StopToken};

use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use std::any::Any;
use std::sync::Arc;

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
    /// The batch was given up midway because its [`JobSpec::stop`] said so: a stop, not a
    /// failure. None of its nonces is reported.
    #[error("the batch was stopped before it finished")]
    Stopped,
}

/// A model built by a backend on its device, its concrete type known only to that backend
/// (see [`downcast_model`]). Shared: the engine's cache and a running job may both hold it.
pub type Model = Arc<dyn Any + Send + Sync>;

/// One worker's device: the whole CPU, or one GPU group.
pub trait Backend: Send + Sync + 'static {
    /// Short name for logs and /health ("cpu", "cuda:0", "cuda:0+1").
    fn name(&self) -> String;

    /// Whether this device can serve `params` in `dtype` at all (checked before a request is
    /// accepted, so that the client gets a 400 rather than an error inside the stream).
    fn check(&self, params: &Params, dtype: Dtype) -> Result<(), BackendError>;

    /// Bring the device up (thread pools, contexts) ahead of the first job.
    fn warm_up(&self) {}

    /// Build the weights of `params` for `block_hash` in `dtype` on the device.
    fn build_model(
        &self,
        block_hash: &str,
        params: &Params,
        dtype: Dtype,
    ) -> Result<Model, BackendError>;

    /// Forward `batch` nonces' inputs (`batch * seq_len * dim` values, each exactly
    /// representable in the model's dtype) through a model built by
    /// [`Backend::build_model`] on this device, and return the f32 logits of the last
    /// position, `batch * vocab_size` values.
    fn forward_last_logits(
        &self,
        model: &Model,
        inputs: &[f32],
        batch: usize,
    ) -> Result<Vec<f32>, BackendError>;

    /// Run a prepared batch: the proofs among its nonces, and every nonce's distance when
    /// `all_distances` (see [`BatchResult::dist`]).
    ///
    /// The default is [`Backend::forward_last_logits`] then [`batch::finish`] on the host; a
    /// GPU computes the distances and the r_target filter on the device so that only the
    /// proofs come back. `job` is the spec the batch was prepared with (its block hash and
    /// public key), or a later one that differs only in r_target. A backend may give the
    /// batch up when `job.stop` says so ([`BackendError::Stopped`]); the CPU asks between
    /// layers.
    fn run_batch(
        &self,
        model: &Model,
        job: &JobSpec,
        batch: PreparedBatch,
        all_distances: bool,
    ) -> Result<BatchResult, BackendError> {
        let logits = self.forward_last_logits(model, &batch.inputs, batch.nonces.len())?;
        Ok(batch::finish(job, batch, &logits).keeping_distances(all_distances))
    }

    /// Whether host-side preparation of the next batch should overlap this device's compute
    /// (true for GPUs: the host is idle while the GPU works; false for the CPU, whose cores do
    /// both).
    fn overlaps_preparation(&self) -> bool {
        false
    }

    /// Bytes of host memory one nonce of a batch takes (the engine's `max_batch_bytes`
    /// divided by this caps a batch).
    fn bytes_per_nonce(&self, params: &Params) -> u64;

    /// The largest batch this device can take for `params` with a built model (from free
    /// device memory), None when unbounded or unknown.
    fn max_batch(&self, _model: &Model, _params: &Params) -> Option<usize> {
        None
    }

    /// A job has ended: give back the working memory kept between its batches (the CPU's
    /// scratch buffers), so that an idle server holds little more than its cached models.
    fn release_working_memory(&self) {}
}

/// The concrete model behind `model`, or a device error when the backend named `device` did
/// not build it.
pub fn downcast_model<'a, M: 'static>(
    model: &'a Model,
    device: &str,
) -> Result<&'a M, BackendError> {
    model.downcast_ref::<M>().ok_or_else(|| {
        BackendError::Device(format!("a model of another backend was handed to {device}"))
    })
}
