//! Launchers of `kernels/tail.cu`: from last-position logits to the proofs.

use super::{int, kernel, single};
use crate::backend::cuda::gpu::Gpu;
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// `o[b, j] = logits[b, perm[b, j]]` as f32 (`perm`: i64, `batch * vocab` values).
pub fn gather(
    gpu: &Gpu,
    dtype: Dtype,
    logits: u64,
    perm: u64,
    o: u64,
    batch: usize,
    vocab: usize,
) -> Result<(), BackendError> {
    if batch * vocab == 0 {
        return Ok(());
    }
    let f = kernel(gpu, "tail_gather", dtype)?;
    let (b, v) = (int("batch", batch)?, int("vocab", vocab)?);
    let mut a = gpu.stream.launch_builder(f);
    a.arg(&logits).arg(&perm).arg(&o).arg(&b).arg(&v);
    // SAFETY: tail_gather_<dtype>(const S* logits, const i64* perm, float* o, int batch,
    // int vocab): matching order and types; logits and perm hold batch * vocab values
    // (every perm entry is below vocab: it is a permutation), o batch * vocab floats.
    unsafe { gpu.run(&mut a, "tail_gather", gpu.grid_for(batch * vocab)) }
}

/// `dist[b] = || o[b] / ||o[b]||_f32 - target ||_f64` in numpy's summation order.
pub fn distance(
    gpu: &Gpu,
    o: u64,
    target: u64,
    dist: u64,
    batch: usize,
    vocab: usize,
) -> Result<(), BackendError> {
    if batch == 0 {
        return Ok(());
    }
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
    // doubles, dist batch doubles; threads past batch return at once.
    unsafe { gpu.run(&mut a, "tail_distance", cfg) }
}

/// The `b` with `dist[b] < r_target`, in increasing order, into `index` / `valid_dist`,
/// their number into `count` (one i32).
#[allow(clippy::too_many_arguments)]
pub fn filter(
    gpu: &Gpu,
    dist: u64,
    batch: usize,
    r_target: f64,
    count: u64,
    index: u64,
    valid_dist: u64,
) -> Result<(), BackendError> {
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
        .arg(&valid_dist);
    // SAFETY: tail_filter(const double* dist, int batch, double r_target, int* count,
    // int* index, double* valid_dist): matching order and types; dist holds batch doubles,
    // index and valid_dist room for batch entries, count one int.
    unsafe { gpu.run(&mut a, "tail_filter", cfg) }
}
