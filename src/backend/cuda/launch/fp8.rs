//! Launchers of `kernels/fp8.cu`: per-tensor E4M3 quantisation for the FP8 products.

use super::{kernel, long};
use crate::backend::cuda::gpu::Gpu;
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use cudarc::driver::PushKernelArg;

/// Zero one u32 of device memory, in stream order (the maximum an amax kernel raises).
pub fn zero_u32(gpu: &Gpu, ptr: u64) -> Result<(), BackendError> {
    gpu.ctx.bind_to_thread().map_err(|e| gpu.err("bind", e))?;
    // SAFETY: `ptr` is one u32 of this GPU's memory (the caller's scratch); the memset is
    // queued on the stream, before the kernels that use it.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, 4, gpu.stream.cu_stream()) }
        .map_err(|e| gpu.err("zeroing the FP8 maximum", e))
}

/// Quantise `rows` rows of `width` values (rows `stride` apart) at `x` into contiguous E4M3
/// at `dst` (`rows * width` bytes), with one scale: the largest magnitude over 448, written
/// as one f32 at `scale`. `amax_bits` is one u32 of scratch; with `amax_known` it already
/// holds the largest magnitude (a kernel before found it on the way, see
/// `silu_mul_amax`), and the reduction is skipped.
#[allow(clippy::too_many_arguments)]
pub fn quantize_e4m3(
    gpu: &Gpu,
    dtype: Dtype,
    x: u64,
    rows: usize,
    width: usize,
    stride: usize,
    amax_bits: u64,
    amax_known: bool,
    dst: u64,
    scale: u64,
) -> Result<(), BackendError> {
    let n = rows * width;
    if n == 0 {
        return Ok(());
    }
    assert!(stride >= width, "quantize_e4m3: stride below width");
    let (r, w, s) = (long(rows), long(width), long(stride));
    let cfg = gpu.grid_for(n);
    if !amax_known {
        zero_u32(gpu, amax_bits)?;
        let f = kernel(gpu, "amax", dtype)?;
        let mut a = gpu.stream.launch_builder(f);
        a.arg(&x).arg(&r).arg(&w).arg(&s).arg(&amax_bits);
        // SAFETY: amax_<dtype>(const S* x, i64 rows, i64 width, i64 stride,
        // unsigned* amax): matching order and types; x holds (rows - 1) * stride + width
        // values of the dtype, amax_bits one u32.
        unsafe { gpu.run(&mut a, "amax", cfg) }?;
    }
    let f = kernel(gpu, "quantize_e4m3", dtype)?;
    let mut a = gpu.stream.launch_builder(f);
    a.arg(&x)
        .arg(&r)
        .arg(&w)
        .arg(&s)
        .arg(&amax_bits)
        .arg(&dst)
        .arg(&scale);
    // SAFETY: quantize_e4m3_<dtype>(const S* x, i64 rows, i64 width, i64 stride,
    // const unsigned* amax, unsigned char* dst, float* scale): matching order and types; x
    // as above, dst rows * width bytes, scale one f32, amax the maximum (found earlier on
    // the same stream).
    unsafe { gpu.run(&mut a, "quantize_e4m3", cfg) }
}
