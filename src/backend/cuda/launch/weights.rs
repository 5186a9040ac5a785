//! Launchers of `kernels/weights.cu`: a parameter's values out of the pool on the device.

use super::{kernel, long};
use crate::backend::cuda::gpu::{DevView, Elem, Gpu};
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use crate::pow::weights::PoolSlice;
use cudarc::driver::PushKernelArg;

/// Fill the `numel` values of `dst` from the device `pool` (of the dtype) as `slice` says: a
/// direct copy of a stretch, or the pool tiled and rotated.
pub(crate) fn fill(
    gpu: &Gpu,
    dtype: Dtype,
    pool: DevView<'_>,
    slice: PoolSlice,
    dst: DevView<'_>,
    numel: usize,
) -> Result<(), BackendError> {
    if numel == 0 {
        return Ok(());
    }
    let t = Elem::storage(dtype);
    let pool_len = pool.len();
    let dst = dst.check(gpu, "fill dst", t, numel)?;
    let n = long(numel);
    let cfg = gpu.grid_for(numel);
    match slice {
        PoolSlice::Direct { start } => {
            let start = start as usize;
            let pool = pool.check(gpu, "fill pool", t, start + numel)?;
            let f = kernel(gpu, "fill_direct", dtype)?;
            let start = long(start);
            let mut a = gpu.stream.launch_builder(f);
            a.arg(&pool).arg(&start).arg(&dst).arg(&n);
            // SAFETY: fill_direct_<dtype>(const S* pool, i64 start, S* dst, i64 numel):
            // matching order and types; it reads pool[start .. start + numel] and writes
            // dst[0 .. numel], both inside their buffers on this GPU (checked above).
            unsafe { gpu.run(&mut a, "fill_direct", cfg) }
        }
        PoolSlice::Tiled { shift } => {
            assert!((shift as usize) < numel, "fill: shift beyond the parameter");
            let pool = pool.check(gpu, "fill pool", t, pool_len.max(1))?;
            let f = kernel(gpu, "fill_tiled", dtype)?;
            let (psize, shift) = (long(pool_len), shift as i64);
            let mut a = gpu.stream.launch_builder(f);
            a.arg(&pool).arg(&psize).arg(&dst).arg(&n).arg(&shift);
            // SAFETY: fill_tiled_<dtype>(const S* pool, i64 pool_size, S* dst, i64 numel,
            // i64 shift): matching order and types; it reads pool[0 .. pool_size] (index
            // taken modulo pool_size, the view's whole length) and writes dst[0 .. numel],
            // both on this GPU (checked above).
            unsafe { gpu.run(&mut a, "fill_tiled", cfg) }
        }
    }
}
