//! A batch of nonces as a backend takes it and gives it back: inputs and permutations drawn
//! on all host threads ([`prepare`]), and the distances and proofs that come out of it
//! ([`BatchResult`]; [`finish`] makes one from logits on the host, for backends that do not
//! compute the tail on their device).

use crate::pow::dtype::Dtype;
use crate::pow::params::Params;
use crate::pow::proof;
use rayon::prelude::*;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Whether a batch being computed should be given up: its job was stopped (time limit,
/// preemption, disconnect, shutdown) or its deadline passed. Cheap to ask (an atomic load
/// and, with a deadline, a clock read), so that a backend can ask between layers.
///
/// A batch given up is dropped whole: the backend returns
/// [`BackendError::Stopped`](super::BackendError::Stopped) and none of its nonces is reported.
#[derive(Debug, Clone, Default)]
pub struct StopToken {
    /// Set once the job is stopped; None: never.
    flag: Option<Arc<AtomicBool>>,
    deadline: Option<Instant>,
}

impl StopToken {
    /// A token that is stopped once `flag` is set.
    pub fn new(flag: Arc<AtomicBool>) -> Self {
        StopToken {
            flag: Some(flag),
            deadline: None,
        }
    }

    /// The same token, stopped at `deadline` too.
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    pub fn is_stopped(&self) -> bool {
        self.flag.as_ref().is_some_and(|f| f.load(Ordering::SeqCst))
            || self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

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
    /// When to give up a batch midway (never, unless the engine sets one).
    pub stop: StopToken,
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
            stop: StopToken::default(),
        }
    }

    /// This spec, its batches also given up once `deadline` passes (a job's time limit).
    pub fn until(self, deadline: Instant) -> Self {
        JobSpec {
            stop: self.stop.clone().with_deadline(deadline),
            ..self
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

/// The nonces of a batch, the proofs among them, and (when asked for) every distance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchResult {
    /// Every nonce computed, in batch order.
    pub nonces: Vec<u64>,
    /// Every nonce's distance, lined up with `nonces`, when the batch was run with all
    /// distances ([`finish`], or [`Backend::run_batch`](super::Backend::run_batch) with
    /// `all_distances`); None when only the proofs came back (what the engine's workers ask
    /// for: a GPU then sends only the proofs over the bus).
    pub dist: Option<Vec<f64>>,
    /// The nonces strictly below r_target, in batch order, and their distances.
    pub valid_nonces: Vec<u64>,
    pub valid_dist: Vec<f64>,
}

impl BatchResult {
    /// A result that carries only the proofs (what a device that filters on r_target itself
    /// hands back).
    pub fn from_valid(nonces: Vec<u64>, valid_nonces: Vec<u64>, valid_dist: Vec<f64>) -> Self {
        debug_assert_eq!(valid_nonces.len(), valid_dist.len());
        BatchResult {
            nonces,
            dist: None,
            valid_nonces,
            valid_dist,
        }
    }

    /// Drop the distances of every nonce, keeping the proofs'.
    pub fn without_distances(mut self) -> Self {
        self.dist = None;
        self
    }

    /// Keep every nonce's distance only when `all_distances` (what a batch was run with, see
    /// [`super::Backend::run_batch`]).
    pub fn keeping_distances(self, all_distances: bool) -> Self {
        if all_distances {
            self
        } else {
            self.without_distances()
        }
    }

    /// Every nonce's distance, when the batch was run with all distances.
    pub fn distances(&self) -> Option<&[f64]> {
        self.dist.as_deref()
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
            dist: Some(dist),
            valid_nonces,
            valid_dist,
        }
    }

    /// Append another batch's results. The distances of every nonce stay only when both
    /// carry them.
    pub fn extend(&mut self, other: BatchResult) {
        self.dist = match (self.dist.take(), other.dist) {
            (Some(mut a), Some(b)) => {
                a.extend(b);
                Some(a)
            }
            // An empty result takes on what the first batch carries.
            (None, b) if self.nonces.is_empty() => b,
            _ => None,
        };
        self.nonces.extend(other.nonces);
        self.valid_nonces.extend(other.valid_nonces);
        self.valid_dist.extend(other.valid_dist);
    }

    pub fn empty() -> Self {
        BatchResult {
            nonces: Vec::new(),
            dist: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_tokens() {
        assert!(!StopToken::default().is_stopped());
        let flag = Arc::new(AtomicBool::new(false));
        let t = StopToken::new(flag.clone());
        let later = t
            .clone()
            .with_deadline(Instant::now() + std::time::Duration::from_secs(60));
        assert!(!t.is_stopped() && !later.is_stopped());
        flag.store(true, Ordering::SeqCst);
        assert!(t.is_stopped() && later.is_stopped());
        let past = StopToken::default().with_deadline(Instant::now());
        assert!(past.is_stopped());
    }

    #[test]
    fn results_with_all_distances_or_only_the_proofs() {
        let all = BatchResult::from_distances(vec![1, 2, 3, 4], vec![0.5, 2.0, 0.1, 1.0], 1.0);
        assert_eq!(all.valid_nonces, [1, 3]);
        assert_eq!(all.valid_dist, [0.5, 0.1]);
        assert_eq!(all.distances(), Some(&[0.5, 2.0, 0.1, 1.0][..]));
        let valid = all.clone().without_distances();
        assert_eq!(valid.nonces, all.nonces);
        assert_eq!(valid.valid_dist, [0.5, 0.1]);
        assert_eq!(valid.distances(), None);
        assert_eq!(
            BatchResult::from_valid(vec![1, 2, 3, 4], vec![1, 3], vec![0.5, 0.1]),
            valid
        );
        let mut v = BatchResult::empty();
        v.extend(valid.clone());
        v.extend(valid);
        assert_eq!(v.nonces.len(), 8);
        assert_eq!(v.valid_dist, [0.5, 0.1, 0.5, 0.1]);
        assert_eq!(v.distances(), None);
        let mut a = BatchResult::empty();
        a.extend(all.clone());
        a.extend(all);
        assert_eq!(a.distances().map(<[f64]>::len), Some(8));
    }
}
