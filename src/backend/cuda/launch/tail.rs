//! Launchers of `kernels/tail.cu`: from last-position logits to the proofs.

use super::{int, kernel, single};
use crate::backend::cuda::gpu::{DevView, Elem, Gpu};
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use crate::pow::params::limits::MAX_VOCAB;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Values numpy's pairwise sum adds in one leaf (`PAIRWISE_BLOCK` in the kernel).
const PAIRWISE_BLOCK: usize = 128;

/// The explicit stack of `tail_distance`'s pairwise sums, in levels (`PAIRWISE_MAX_DEPTH`
/// in `kernels/tail.cu`): what the deepest length up to [`MAX_VOCAB`] needs
/// ([`pairwise_stack_levels`]; a test checks the two agree).
pub const PAIRWISE_MAX_DEPTH: usize = 15;

/// Stack levels the pairwise sum of `n` values uses: one for a leaf (up to
/// [`PAIRWISE_BLOCK`] values), else one more than the deeper of its halves (the left half
/// `n / 2` rounded down to a multiple of 8, the right half the rest), as the kernel splits.
pub fn pairwise_stack_levels(n: usize) -> usize {
    if n <= PAIRWISE_BLOCK {
        return 1;
    }
    let left = n / 2 - (n / 2) % 8;
    1 + pairwise_stack_levels(left).max(pairwise_stack_levels(n - left))
}

/// `o[b, j] = logits[b, perm[b, j]]` as f32 (`perm`: i64, `batch * vocab` values).
pub(crate) fn gather(
    gpu: &Gpu,
    dtype: Dtype,
    logits: DevView<'_>,
    perm: DevView<'_>,
    o: DevView<'_>,
    batch: usize,
    vocab: usize,
) -> Result<(), BackendError> {
    if batch * vocab == 0 {
        return Ok(());
    }
    let n = batch * vocab;
    let logits = logits.check(gpu, "tail_gather logits", Elem::storage(dtype), n)?;
    let perm = perm.check(gpu, "tail_gather perm", Elem::I64, n)?;
    let o = o.check(gpu, "tail_gather o", Elem::F32, n)?;
    let f = kernel(gpu, "tail_gather", dtype)?;
    let (b, v) = (int("batch", batch)?, int("vocab", vocab)?);
    let mut a = gpu.stream.launch_builder(f);
    a.arg(&logits).arg(&perm).arg(&o).arg(&b).arg(&v);
    // SAFETY: tail_gather_<dtype>(const S* logits, const i64* perm, float* o, int batch,
    // int vocab): matching order and types; logits and perm hold batch * vocab values, o
    // batch * vocab floats, on this GPU (checked above); every perm entry is below vocab
    // (each row is a permutation, drawn on the host), so every read stays in its row.
    unsafe { gpu.run(&mut a, "tail_gather", gpu.grid_for(n)) }
}

/// `dist[b] = || o[b] / ||o[b]||_f32 - target ||_f64` in numpy's summation order.
pub(crate) fn distance(
    gpu: &Gpu,
    o: DevView<'_>,
    target: DevView<'_>,
    dist: DevView<'_>,
    batch: usize,
    vocab: usize,
) -> Result<(), BackendError> {
    if batch == 0 {
        return Ok(());
    }
    if vocab > MAX_VOCAB as usize {
        // The kernel's stack holds the recursion of lengths up to MAX_VOCAB only.
        return Err(BackendError::Unsupported(format!(
            "params.vocab_size: {vocab} is more than the GPU tail's limit of {MAX_VOCAB}"
        )));
    }
    let o = o.check(gpu, "tail_distance o", Elem::F32, batch * vocab)?;
    let target = target.check(gpu, "tail_distance target", Elem::F64, vocab)?;
    let dist = dist.check(gpu, "tail_distance dist", Elem::F64, batch)?;
    let f = single(gpu, "tail_distance")?;
    let (b, v) = (int("batch", batch)?, int("vocab", vocab)?);
    let cfg = LaunchConfig {
        grid_dim: (batch.div_ceil(32) as u32, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut a = gpu.stream.launch_builder(f);
    a.arg(&o).arg(&target).arg(&dist).arg(&b).arg(&v);
    // SAFETY: tail_distance(const float* o, const double* target, double* dist, int batch,
    // int vocab): matching order and types; o holds batch * vocab floats, target vocab
    // doubles, dist batch doubles, on this GPU (checked above); threads past batch return
    // at once.
    unsafe { gpu.run(&mut a, "tail_distance", cfg) }
}

/// Where the r_target filter writes: the number of proofs (one i32), their batch indices
/// (i32) and their distances (f64).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FilterOut<'a> {
    pub count: DevView<'a>,
    pub index: DevView<'a>,
    pub valid_dist: DevView<'a>,
}

/// The `b` with `dist[b] < r_target`, in increasing order, into `out.index` /
/// `out.valid_dist`, their number into `out.count`.
pub(crate) fn filter(
    gpu: &Gpu,
    dist: DevView<'_>,
    batch: usize,
    r_target: f64,
    out: FilterOut<'_>,
) -> Result<(), BackendError> {
    let dist = dist.check(gpu, "tail_filter dist", Elem::F64, batch)?;
    let count = out.count.check(gpu, "tail_filter count", Elem::I32, 1)?;
    let index = out
        .index
        .check(gpu, "tail_filter index", Elem::I32, batch)?;
    let valid = out
        .valid_dist
        .check(gpu, "tail_filter valid_dist", Elem::F64, batch)?;
    let f = single(gpu, "tail_filter")?;
    let b = int("batch", batch)?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut a = gpu.stream.launch_builder(f);
    a.arg(&dist)
        .arg(&b)
        .arg(&r_target)
        .arg(&count)
        .arg(&index)
        .arg(&valid);
    // SAFETY: tail_filter(const double* dist, int batch, double r_target, int* count,
    // int* index, double* valid_dist): matching order and types; dist holds batch doubles,
    // index and valid_dist room for batch entries, count one int, on this GPU (checked
    // above).
    unsafe { gpu.run(&mut a, "tail_filter", cfg) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distance_kernels_stack_fits_every_vocab_up_to_the_limit() {
        // Levels of every length up to the limit, shortest first (each length's halves are
        // shorter, so they are known when it is reached).
        let limit = MAX_VOCAB as usize;
        let mut levels = vec![1u8; limit + 1];
        for n in PAIRWISE_BLOCK + 1..=limit {
            let left = n / 2 - (n / 2) % 8;
            levels[n] = 1 + levels[left].max(levels[n - left]);
        }
        let deepest = (0..=limit)
            .max_by_key(|&n| (levels[n], usize::MAX - n))
            .unwrap();
        assert_eq!(usize::from(levels[deepest]), PAIRWISE_MAX_DEPTH);
        assert_eq!(deepest, 983_049);
        assert_eq!(pairwise_stack_levels(deepest), PAIRWISE_MAX_DEPTH);
        for n in [0, 1, 128, 129, 8196, limit] {
            assert_eq!(pairwise_stack_levels(n), usize::from(levels[n]), "{n}");
        }
        // The kernel's stack is exactly that deep.
        let src = crate::backend::cuda::kernels::Family::Tail.source();
        let line = format!("#define PAIRWISE_MAX_DEPTH {PAIRWISE_MAX_DEPTH}\n");
        assert!(src.contains(&line), "kernels/tail.cu: no {line:?}");
        let block = format!("#define PAIRWISE_BLOCK {PAIRWISE_BLOCK}\n");
        assert!(src.contains(&block), "kernels/tail.cu: no {block:?}");
    }
}
