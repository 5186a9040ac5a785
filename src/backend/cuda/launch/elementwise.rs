//! Launchers of `kernels/elementwise.cu`.

use super::{kernel, long};
use crate::backend::cuda::gpu::Gpu;
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use cudarc::driver::PushKernelArg;

/// Launch one of the two-pointer, one-length kernels of the family over `n` elements.
fn two_pointers(
    gpu: &Gpu,
    base: &str,
    dtype: Dtype,
    a: u64,
    b: u64,
    n: usize,
) -> Result<(), BackendError> {
    if n == 0 {
        return Ok(());
    }
    let f = kernel(gpu, base, dtype)?;
    let n_l = long(n);
    let mut args = gpu.stream.launch_builder(f);
    args.arg(&a).arg(&b).arg(&n_l);
    // SAFETY: every kernel of this family has the signature (pointer, pointer, i64 n) and
    // reads / writes elements 0 .. n of both (the callers pass buffers of at least n values
    // of the kernel's element types: storage dtype, or f32 for from_f32's source and
    // to_f32's destination).
    unsafe { gpu.run(&mut args, base, gpu.grid_for(n)) }
}

/// `a = round_T(round_T(silu(a)) * b)` over `n` values.
pub fn silu_mul(gpu: &Gpu, dtype: Dtype, a: u64, b: u64, n: usize) -> Result<(), BackendError> {
    two_pointers(gpu, "silu_mul", dtype, a, b, n)
}

/// `x = round_T(x + y)` over `n` values.
pub fn add(gpu: &Gpu, dtype: Dtype, x: u64, y: u64, n: usize) -> Result<(), BackendError> {
    two_pointers(gpu, "add", dtype, x, y, n)
}

/// `dst = round_T(src)`: `n` f32 values into the dtype's storage.
pub fn from_f32(gpu: &Gpu, dtype: Dtype, src: u64, dst: u64, n: usize) -> Result<(), BackendError> {
    two_pointers(gpu, "from_f32", dtype, src, dst, n)
}

/// `dst = src as f32`: `n` stored values into f32 (exact).
pub fn to_f32(gpu: &Gpu, dtype: Dtype, src: u64, dst: u64, n: usize) -> Result<(), BackendError> {
    two_pointers(gpu, "to_f32", dtype, src, dst, n)
}

/// `dst[r * width + c] = src[r * src_stride + c]` for `rows` rows (no overlap).
pub fn gather_rows(
    gpu: &Gpu,
    dtype: Dtype,
    src: u64,
    dst: u64,
    rows: usize,
    width: usize,
    src_stride: usize,
) -> Result<(), BackendError> {
    if rows * width == 0 {
        return Ok(());
    }
    assert!(src_stride >= width, "gather_rows: stride below width");
    let f = kernel(gpu, "gather_rows", dtype)?;
    let (r, w, s) = (long(rows), long(width), long(src_stride));
    let mut a = gpu.stream.launch_builder(f);
    a.arg(&src).arg(&dst).arg(&r).arg(&w).arg(&s);
    // SAFETY: gather_rows_<dtype>(const S* src, S* dst, i64 rows, i64 width,
    // i64 src_stride): matching order and types; src holds (rows - 1) * src_stride + width
    // values, dst rows * width, and they do not overlap (the caller's separate buffers).
    unsafe { gpu.run(&mut a, "gather_rows", gpu.grid_for(rows * width)) }
}

/// [`silu_mul`], also leaving the largest magnitude it wrote (bits of an f32) in the u32 at
/// `amax_bits`, which it zeroes first: the FP8 path's scale without another pass.
pub fn silu_mul_amax(
    gpu: &Gpu,
    dtype: Dtype,
    a: u64,
    b: u64,
    n: usize,
    amax_bits: u64,
) -> Result<(), BackendError> {
    super::fp8::zero_u32(gpu, amax_bits)?;
    if n == 0 {
        return Ok(());
    }
    let f = kernel(gpu, "silu_mul_amax", dtype)?;
    let n_l = long(n);
    let mut args = gpu.stream.launch_builder(f);
    args.arg(&a).arg(&b).arg(&n_l).arg(&amax_bits);
    // SAFETY: silu_mul_amax_<dtype>(S* a, const S* b, i64 n, unsigned* amax): matching
    // order and types; a and b hold n values of the dtype, amax_bits one u32.
    unsafe { gpu.run(&mut args, "silu_mul_amax", gpu.grid_for(n)) }
}
