//! A device as the engine sees it: one worker's compute unit (the whole CPU, or one GPU group
//! later), with the model type erased so that one engine can drive any backend.

use super::batch::{self, BatchResult, JobSpec, PreparedBatch};
use crate::backend::cpu::{self, CpuBackend};
use crate::backend::{Backend, BackendError};
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use std::any::Any;
use std::sync::Arc;

/// A model built on one device, type-erased.
pub type AnyModel = Arc<dyn Any + Send + Sync>;

/// One worker's device.
pub trait Device: Send + Sync + 'static {
    /// Short name for logs and /health ("cpu", "cuda:0").
    fn name(&self) -> String;

    /// Whether this device can serve `params` in `dtype` at all (checked before a request is
    /// accepted, so that the client gets a 400 rather than an error inside the stream).
    fn check(&self, params: &Params, dtype: Dtype) -> Result<(), BackendError>;

    /// Bring the device up (contexts, thread pools) ahead of the first job.
    fn warm_up(&self) {}

    /// Build the weights of `params` for `block_hash` on this device.
    fn build(
        &self,
        block_hash: &str,
        params: &Params,
        dtype: Dtype,
    ) -> Result<AnyModel, BackendError>;

    /// Forward a batch of inputs through a model built by [`Device::build`] on this device.
    fn forward(
        &self,
        model: &AnyModel,
        inputs: &[f32],
        batch: usize,
    ) -> Result<Vec<f32>, BackendError>;

    /// Forward a prepared batch and return its result (distances of the proofs, or of every
    /// nonce when `all_distances`; see [`BatchResult::dist`]).
    ///
    /// The default runs [`Device::forward`] then [`batch::finish`] on the host; a GPU computes
    /// the distances and the r_target filter on the device so that only (nonce, dist) pairs
    /// come back. `job` is the spec the batch was prepared with (its block hash and public
    /// key), or a later one that differs only in r_target.
    fn run_batch(
        &self,
        model: &AnyModel,
        job: &JobSpec,
        batch: PreparedBatch,
        all_distances: bool,
    ) -> Result<BatchResult, BackendError> {
        let logits = self.forward(model, &batch.inputs, batch.nonces.len())?;
        let r = batch::finish(job, batch, &logits);
        Ok(if all_distances {
            r
        } else {
            r.into_valid_only()
        })
    }

    /// Whether host-side preparation of the next batch should overlap this device's compute
    /// (true for GPUs: the host is idle while the GPU works; false for the CPU, whose cores do
    /// both).
    fn overlaps_preparation(&self) -> bool {
        false
    }

    /// Bytes of host memory one nonce of a batch takes (the engine's `max_batch_bytes`
    /// divided by this caps a batch). The CPU computes in host memory: the whole forward
    /// pass's activations ([`bytes_per_nonce`]).
    fn bytes_per_nonce(&self, params: &Params) -> u64 {
        bytes_per_nonce(params)
    }

    /// The largest batch this device can take for `params` with a built model (from free
    /// device memory), None when unbounded or unknown.
    fn max_batch(&self, _model: &AnyModel, _params: &Params) -> Option<usize> {
        None
    }
}

/// The concrete model behind `model`, or a device error when `device` did not build it.
pub fn downcast_model<'a, M: 'static>(
    model: &'a AnyModel,
    device: &str,
) -> Result<&'a M, BackendError> {
    model.downcast_ref::<M>().ok_or_else(|| {
        BackendError::Device(format!("a model of another backend was handed to {device}"))
    })
}

fn forward_with<B: Backend>(
    backend: &B,
    model: &AnyModel,
    inputs: &[f32],
    batch: usize,
) -> Result<Vec<f32>, BackendError>
where
    B::Model: 'static,
{
    let m = downcast_model::<B::Model>(model, &backend.name())?;
    backend.forward_last_logits(m, inputs, batch)
}

/// The CPU as one worker: every core through rayon.
#[derive(Debug, Default)]
pub struct CpuDevice {
    backend: CpuBackend,
}

impl CpuDevice {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Device for CpuDevice {
    fn name(&self) -> String {
        self.backend.name()
    }

    fn check(&self, params: &Params, _dtype: Dtype) -> Result<(), BackendError> {
        params
            .validate()
            .map_err(|e| BackendError::Unsupported(e.to_string()))?;
        if params.use_fp8 {
            return Err(BackendError::Unsupported(
                "params.use_fp8: this server computes on the CPU, which has no FP8 support; \
                 send use_fp8 false"
                    .into(),
            ));
        }
        cpu::check_model_fits(params, cpu::mem_available_bytes())
    }

    fn warm_up(&self) {
        // Start rayon's global pool so that the first batch does not pay for it.
        rayon::broadcast(|_| ());
    }

    fn build(
        &self,
        block_hash: &str,
        params: &Params,
        dtype: Dtype,
    ) -> Result<AnyModel, BackendError> {
        let m = self.backend.build_model(block_hash, params, dtype)?;
        Ok(Arc::new(m))
    }

    fn forward(
        &self,
        model: &AnyModel,
        inputs: &[f32],
        batch: usize,
    ) -> Result<Vec<f32>, BackendError> {
        forward_with(&self.backend, model, inputs, batch)
    }
}

/// Rough bytes one nonce occupies during a forward pass (inputs, activations, scores,
/// logits and permutation), to cap a batch so that a large `batch_size` cannot exhaust memory.
pub fn bytes_per_nonce(params: &Params) -> u64 {
    let seq = params.seq_len.max(1) as u64;
    let dim = params.dim.max(1) as u64;
    let hidden = params.ffn_hidden() as u64;
    let heads = params.n_heads.max(1) as u64;
    let vocab = params.vocab_size.max(1) as u64;
    let activations = seq * (6 * dim + 3 * hidden) + heads * seq * seq;
    (activations + 4 * vocab) * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_device_refuses_fp8_and_builds_tiny() {
        let d = CpuDevice::new();
        let mut p = Params {
            dim: 64,
            n_layers: 1,
            n_heads: 4,
            n_kv_heads: 4,
            vocab_size: 50,
            multiple_of: 32,
            seq_len: 4,
            ..Params::default()
        };
        d.check(&p, Dtype::F16).unwrap();
        let m = d.build("h", &p, Dtype::F16).unwrap();
        let inputs = vec![0.5f32; 2 * 4 * 64];
        assert_eq!(d.forward(&m, &inputs, 2).unwrap().len(), 100);
        p.use_fp8 = true;
        assert!(d
            .check(&p, Dtype::F16)
            .unwrap_err()
            .to_string()
            .contains("use_fp8"));
        let wrong: AnyModel = Arc::new(3u8);
        assert!(d.forward(&wrong, &inputs, 2).is_err());
        assert!(bytes_per_nonce(&p) > 0);
    }

    fn tiny() -> Params {
        Params {
            dim: 32,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 2,
            vocab_size: 40,
            multiple_of: 32,
            seq_len: 4,
            ..Params::default()
        }
    }

    #[test]
    fn default_run_batch_is_forward_then_finish() {
        let d = CpuDevice::new();
        let p = tiny();
        assert!(!d.overlaps_preparation());
        let m = d.build("bh", &p, Dtype::F16).unwrap();
        assert_eq!(d.max_batch(&m, &p), None);
        let nonces: Vec<u64> = (10..26).collect();
        // An r_target between the distances, so that some nonces are proofs and some not.
        let mut job = JobSpec::new("bh", "pk", &p, Dtype::F16, f64::INFINITY);
        let all = d
            .run_batch(&m, &job, batch::prepare(&job, nonces.clone()), true)
            .unwrap();
        let mut sorted = all.dist.clone();
        sorted.sort_by(f64::total_cmp);
        job.r_target = sorted[nonces.len() / 2];

        let prepared = batch::prepare(&job, nonces.clone());
        let logits = d
            .forward(&m, &prepared.inputs, prepared.nonces.len())
            .unwrap();
        let want = batch::finish(&job, prepared.clone(), &logits);
        assert_eq!(want.nonces, nonces);
        assert_eq!(want.dist, all.dist);
        assert_eq!(want.valid_nonces.len(), nonces.len() / 2);
        assert!(want.has_all_distances());

        let got = d.run_batch(&m, &job, prepared.clone(), true).unwrap();
        assert_eq!(got, want);

        // Without all_distances: every nonce, only the proofs' distances.
        let got = d.run_batch(&m, &job, prepared, false).unwrap();
        assert_eq!(got.nonces, nonces);
        assert_eq!(got.valid_nonces, want.valid_nonces);
        assert_eq!(got.valid_dist, want.valid_dist);
        assert_eq!(got.dist, want.valid_dist);
        assert!(!got.has_all_distances());
        assert!(got.valid_dist.iter().all(|&x| x < job.r_target));

        let wrong: AnyModel = Arc::new(3u8);
        let prepared = batch::prepare(&job, nonces);
        assert!(d.run_batch(&wrong, &job, prepared, false).is_err());
    }
}
