//! Launchers of `kernels/weights.cu`: a parameter's values out of the pool on the device.

use super::{kernel, long};
use crate::backend::cuda::gpu::Gpu;
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use crate::pow::weights::PoolSlice;
use cudarc::driver::PushKernelArg;

/// Fill `numel` values at `dst` from the device pool (`pool_len` values of the dtype) as
/// `slice` says: a direct copy of a stretch, or the pool tiled and rotated.
pub fn fill(
    gpu: &Gpu,
    dtype: Dtype,
    pool: u64,
    pool_len: usize,
    slice: PoolSlice,
    dst: u64,
    numel: usize,
) -> Result<(), BackendError> {
    if numel == 0 {
        return Ok(());
    }
    let n = long(numel);
    let cfg = gpu.grid_for(numel);
    match slice {
        PoolSlice::Direct { start } => {
            assert!(
                start as usize + numel <= pool_len,
                "fill: direct slice past the pool"
            );
            let f = kernel(gpu, "fill_direct", dtype)?;
            let start = start as i64;
            let mut a = gpu.stream.launch_builder(f);
            a.arg(&pool).arg(&start).arg(&dst).arg(&n);
            // SAFETY: fill_direct_<dtype>(const S* pool, i64 start, S* dst, i64 numel):
            // matching order and types; it reads pool[start .. start + numel] (inside the
            // pool, asserted above) and writes dst[0 .. numel].
            unsafe { gpu.run(&mut a, "fill_direct", cfg) }
        }
        PoolSlice::Tiled { shift } => {
            assert!((shift as usize) < numel, "fill: shift beyond the parameter");
            let f = kernel(gpu, "fill_tiled", dtype)?;
            let (psize, shift) = (long(pool_len), shift as i64);
            let mut a = gpu.stream.launch_builder(f);
            a.arg(&pool).arg(&psize).arg(&dst).arg(&n).arg(&shift);
            // SAFETY: fill_tiled_<dtype>(const S* pool, i64 pool_size, S* dst, i64 numel,
            // i64 shift): matching order and types; it reads pool[0 .. pool_size] (index
            // taken modulo pool_size) and writes dst[0 .. numel].
            unsafe { gpu.run(&mut a, "fill_tiled", cfg) }
        }
    }
}
