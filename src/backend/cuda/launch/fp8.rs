//! Launchers of `kernels/fp8.cu`: per-tensor E4M3 quantisation for the FP8 products.

use super::{kernel, long};
use crate::backend::cuda::gpu::{DevView, Elem, Gpu};
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use cudarc::driver::PushKernelArg;

/// Zero one u32 of device memory, in stream order (the maximum an amax kernel raises).
pub(crate) fn zero_u32(gpu: &Gpu, value: DevView<'_>) -> Result<(), BackendError> {
    let ptr = value.check(gpu, "the FP8 maximum", Elem::U32, 1)?;
    gpu.ctx.bind_to_thread().map_err(|e| gpu.err("bind", e))?;
    // SAFETY: `ptr` is one u32 of this GPU's memory (checked above); the memset is queued
    // on the stream, before the kernels that use it.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, 4, gpu.stream.cu_stream()) }
        .map_err(|e| gpu.err("zeroing the FP8 maximum", e))
}

/// Where a quantisation writes: the E4M3 codes and the scale, with one u32 of scratch for
/// the largest magnitude.
#[derive(Debug, Clone, Copy)]
pub(crate) struct E4m3Out<'a> {
    /// `rows * width` codes, contiguous.
    pub codes: DevView<'a>,
    /// One f32: the largest magnitude over 448.
    pub scale: DevView<'a>,
    /// One u32 (bits of an f32).
    pub amax: DevView<'a>,
}

/// Quantise `rows` rows of `width` values (rows `stride` apart) of `x` into contiguous E4M3
/// codes, with one scale: the largest magnitude over 448. With `amax_known`, `out.amax`
/// already holds the largest magnitude (a kernel before found it on the way, see
/// `silu_mul_amax`), and the reduction is skipped.
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize_e4m3(
    gpu: &Gpu,
    dtype: Dtype,
    x: DevView<'_>,
    rows: usize,
    width: usize,
    stride: usize,
    amax_known: bool,
    out: E4m3Out<'_>,
) -> Result<(), BackendError> {
    let n = rows * width;
    if n == 0 {
        return Ok(());
    }
    assert!(stride >= width, "quantize_e4m3: stride below width");
    let x = x.check(
        gpu,
        "quantize_e4m3 x",
        Elem::storage(dtype),
        (rows - 1) * stride + width,
    )?;
    let dst = out.codes.check(gpu, "quantize_e4m3 codes", Elem::E4M3, n)?;
    let scale = out.scale.check(gpu, "quantize_e4m3 scale", Elem::F32, 1)?;
    let amax_bits = out.amax.check(gpu, "quantize_e4m3 amax", Elem::U32, 1)?;
    let (r, w, s) = (long(rows), long(width), long(stride));
    let cfg = gpu.grid_for(n);
    if !amax_known {
        zero_u32(gpu, out.amax)?;
        let f = kernel(gpu, "amax", dtype)?;
        let mut a = gpu.stream.launch_builder(f);
        a.arg(&x).arg(&r).arg(&w).arg(&s).arg(&amax_bits);
        // SAFETY: amax_<dtype>(const S* x, i64 rows, i64 width, i64 stride,
        // unsigned* amax): matching order and types; x holds (rows - 1) * stride + width
        // values of the dtype, amax one u32, on this GPU (checked above).
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
    // as above, dst rows * width bytes, scale one f32, amax one u32 holding the maximum
    // (found earlier on the same stream), all on this GPU (checked above).
    unsafe { gpu.run(&mut a, "quantize_e4m3", cfg) }
}
