//! One batch of nonces through a backend: inputs and permutations drawn on all host threads,
//! the forward pass on the device, distances and the r_target filter back on the host (or, for
//! a device that overrides [`Device::run_batch`](super::device::Device::run_batch), on the
//! device).

use crate::backend::{Backend, BackendError};
use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use crate::pow::proof;
use rayon::prelude::*;
use serde::Serialize;

/// What stays fixed across the batches of one job.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub block_hash: String,
    pub public_key: String,
    pub params: Params,
    pub dtype: Dtype,
    pub r_target: f64,
    /// The unit target vector of `block_hash`.
    pub target: Vec<f64>,
}

impl JobSpec {
    pub fn new(
        block_hash: &str,
        public_key: &str,
        params: &Params,
        dtype: Dtype,
        r_target: f64,
    ) -> Self {
        JobSpec {
            block_hash: block_hash.to_owned(),
            public_key: public_key.to_owned(),
            params: params.clone(),
            dtype,
            r_target,
            target: proof::target(block_hash, params.vocab_usize()),
        }
    }
}

/// A batch's inputs, ready for the device.
#[derive(Debug, Clone)]
pub struct PreparedBatch {
    pub nonces: Vec<u64>,
    /// `nonces.len() * seq_len * dim` values, exact in the model dtype.
    pub inputs: Vec<f32>,
    pub permutations: Vec<Vec<i64>>,
}

/// The nonces of a batch, their distances, and the proofs among them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchResult {
    /// Every nonce computed, in batch order.
    pub nonces: Vec<u64>,
    /// Distances. When every distance was asked for ([`finish`], [`run`], or
    /// [`Device::run_batch`](super::device::Device::run_batch) with `all_distances`), one per
    /// entry of `nonces`, in the same order. Otherwise (what the engine's workers ask for)
    /// only the proofs' distances: then `dist` equals `valid_dist` and lines up with
    /// `valid_nonces`, not with `nonces`; [`BatchResult::has_all_distances`] tells which.
    pub dist: Vec<f64>,
    /// The nonces strictly below r_target, in batch order, and their distances.
    pub valid_nonces: Vec<u64>,
    pub valid_dist: Vec<f64>,
}

impl BatchResult {
    /// A result that carries only the proofs' distances (what a device that filters on
    /// r_target itself hands back): `dist` is `valid_dist`.
    pub fn from_valid(nonces: Vec<u64>, valid_nonces: Vec<u64>, valid_dist: Vec<f64>) -> Self {
        debug_assert_eq!(valid_nonces.len(), valid_dist.len());
        BatchResult {
            nonces,
            dist: valid_dist.clone(),
            valid_nonces,
            valid_dist,
        }
    }

    /// Drop the distances of the nonces that are not proofs (see [`BatchResult::dist`]).
    pub fn into_valid_only(mut self) -> Self {
        self.dist.clone_from(&self.valid_dist);
        self
    }

    /// Whether `dist` holds one distance per nonce (rather than only the proofs').
    pub fn has_all_distances(&self) -> bool {
        self.dist.len() == self.nonces.len()
    }

    /// Keep the nonces strictly below r_target.
    pub fn from_distances(nonces: Vec<u64>, dist: Vec<f64>, r_target: f64) -> Self {
        let (valid_nonces, valid_dist) = nonces
            .iter()
            .zip(&dist)
            .filter(|(_, &d)| proof::is_valid(d, r_target))
            .map(|(&n, &d)| (n, d))
            .unzip();
        BatchResult {
            nonces,
            dist,
            valid_nonces,
            valid_dist,
        }
    }

    /// Append another batch's results (both with all distances, or both without, for `dist`
    /// to stay meaningful).
    pub fn extend(&mut self, other: BatchResult) {
        self.nonces.extend(other.nonces);
        self.dist.extend(other.dist);
        self.valid_nonces.extend(other.valid_nonces);
        self.valid_dist.extend(other.valid_dist);
    }

    pub fn empty() -> Self {
        BatchResult {
            nonces: Vec::new(),
            dist: Vec::new(),
            valid_nonces: Vec::new(),
            valid_dist: Vec::new(),
        }
    }
}

/// Draw the inputs and permutations of `nonces` on all host threads.
pub fn prepare(job: &JobSpec, nonces: Vec<u64>) -> PreparedBatch {
    let per = job.params.seq_len_usize() * job.params.dim_usize();
    let vocab = job.params.vocab_usize();
    let mut inputs = vec![0f32; nonces.len() * per];
    let permutations = inputs
        .par_chunks_mut(per.max(1))
        .zip(nonces.par_iter())
        .map(|(chunk, &n)| {
            proof::inputs_into(&job.block_hash, &job.public_key, n, job.dtype, chunk);
            proof::permutation(&job.block_hash, &job.public_key, n, vocab)
        })
        .collect();
    PreparedBatch {
        nonces,
        inputs,
        permutations,
    }
}

/// Distances from last-position logits (`nonces * vocab` values).
pub fn finish(job: &JobSpec, batch: PreparedBatch, logits: &[f32]) -> BatchResult {
    let vocab = job.params.vocab_usize();
    let dist: Vec<f64> = logits
        .par_chunks(vocab)
        .zip(batch.permutations.par_iter())
        .map(|(l, p)| proof::distance(l, p, &job.target))
        .collect();
    BatchResult::from_distances(batch.nonces, dist, job.r_target)
}

/// Prepare, forward and finish one batch.
pub fn run<B: Backend>(
    backend: &B,
    model: &B::Model,
    job: &JobSpec,
    nonces: Vec<u64>,
) -> Result<BatchResult, BackendError> {
    let batch = prepare(job, nonces);
    let logits = backend.forward_last_logits(model, &batch.inputs, batch.nonces.len())?;
    Ok(finish(job, batch, &logits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_with_all_distances_or_only_the_proofs() {
        let all = BatchResult::from_distances(vec![1, 2, 3, 4], vec![0.5, 2.0, 0.1, 1.0], 1.0);
        assert_eq!(all.valid_nonces, [1, 3]);
        assert_eq!(all.valid_dist, [0.5, 0.1]);
        assert!(all.has_all_distances());
        let valid = all.clone().into_valid_only();
        assert_eq!(valid.nonces, all.nonces);
        assert_eq!(valid.dist, [0.5, 0.1]);
        assert!(!valid.has_all_distances());
        assert_eq!(
            BatchResult::from_valid(vec![1, 2, 3, 4], vec![1, 3], vec![0.5, 0.1]),
            valid
        );
        let mut v = BatchResult::empty();
        v.extend(valid.clone());
        v.extend(valid);
        assert_eq!(v.nonces.len(), 8);
        assert_eq!(v.dist, v.valid_dist);
    }
}
