//! Launchers of `kernels/elementwise.cu`.

use super::{kernel, long};
use crate::backend::cuda::gpu::{DevView, Elem, Gpu};
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use cudarc::driver::PushKernelArg;

/// Launch one of the two-pointer, one-length kernels of the family over `n` elements, `a`
/// holding values of `elem_a` and `b` of `elem_b`.
fn two_pointers(
    gpu: &Gpu,
    base: &str,
    dtype: Dtype,
    (a, elem_a): (DevView<'_>, Elem),
    (b, elem_b): (DevView<'_>, Elem),
    n: usize,
) -> Result<(), BackendError> {
    if n == 0 {
        return Ok(());
    }
    let a = a.check(gpu, &format!("{base} first operand"), elem_a, n)?;
    let b = b.check(gpu, &format!("{base} second operand"), elem_b, n)?;
    let f = kernel(gpu, base, dtype)?;
    let n_l = long(n);
    let mut args = gpu.stream.launch_builder(f);
    args.arg(&a).arg(&b).arg(&n_l);
    // SAFETY: every kernel of this family has the signature (pointer, pointer, i64 n) and
    // reads / writes elements 0 .. n of both; both views hold at least n values of the
    // element types the kernel reads (storage dtype, or f32 for from_f32's source and
    // to_f32's destination), on this GPU (checked above).
    unsafe { gpu.run(&mut args, base, gpu.grid_for(n)) }
}

/// `a = round_T(round_T(silu(a)) * b)` over `n` values.
pub(crate) fn silu_mul(
    gpu: &Gpu,
    dtype: Dtype,
    a: DevView<'_>,
    b: DevView<'_>,
    n: usize,
) -> Result<(), BackendError> {
    let t = Elem::storage(dtype);
    two_pointers(gpu, "silu_mul", dtype, (a, t), (b, t), n)
}

/// `x = round_T(x + y)` over `n` values.
pub(crate) fn add(
    gpu: &Gpu,
    dtype: Dtype,
    x: DevView<'_>,
    y: DevView<'_>,
    n: usize,
) -> Result<(), BackendError> {
    let t = Elem::storage(dtype);
    two_pointers(gpu, "add", dtype, (x, t), (y, t), n)
}

/// `dst = round_T(src)`: `n` f32 values into the dtype's storage.
pub(crate) fn from_f32(
    gpu: &Gpu,
    dtype: Dtype,
    src: DevView<'_>,
    dst: DevView<'_>,
    n: usize,
) -> Result<(), BackendError> {
    let t = Elem::storage(dtype);
    two_pointers(gpu, "from_f32", dtype, (src, Elem::F32), (dst, t), n)
}

/// `dst = src as f32`: `n` stored values into f32 (exact).
pub(crate) fn to_f32(
    gpu: &Gpu,
    dtype: Dtype,
    src: DevView<'_>,
    dst: DevView<'_>,
    n: usize,
) -> Result<(), BackendError> {
    let t = Elem::storage(dtype);
    two_pointers(gpu, "to_f32", dtype, (src, t), (dst, Elem::F32), n)
}

/// `dst[r * width + c] = src[r * src_stride + c]` for `rows` rows (no overlap).
pub(crate) fn gather_rows(
    gpu: &Gpu,
    dtype: Dtype,
    src: DevView<'_>,
    dst: DevView<'_>,
    rows: usize,
    width: usize,
    src_stride: usize,
) -> Result<(), BackendError> {
    if rows * width == 0 {
        return Ok(());
    }
    assert!(src_stride >= width, "gather_rows: stride below width");
    let t = Elem::storage(dtype);
    let src = src.check(gpu, "gather_rows src", t, (rows - 1) * src_stride + width)?;
    let dst = dst.check(gpu, "gather_rows dst", t, rows * width)?;
    let f = kernel(gpu, "gather_rows", dtype)?;
    let (r, w, s) = (long(rows), long(width), long(src_stride));
    let mut a = gpu.stream.launch_builder(f);
    a.arg(&src).arg(&dst).arg(&r).arg(&w).arg(&s);
    // SAFETY: gather_rows_<dtype>(const S* src, S* dst, i64 rows, i64 width,
    // i64 src_stride): matching order and types; src holds (rows - 1) * src_stride + width
    // values, dst rows * width, on this GPU (checked above); the forward passes views of
    // two different buffers, so they do not overlap.
    unsafe { gpu.run(&mut a, "gather_rows", gpu.grid_for(rows * width)) }
}

/// [`silu_mul`], also leaving the largest magnitude it wrote (bits of an f32) in the u32
/// `amax_bits`, which it zeroes first: the FP8 path's scale without another pass.
pub(crate) fn silu_mul_amax(
    gpu: &Gpu,
    dtype: Dtype,
    a: DevView<'_>,
    b: DevView<'_>,
    n: usize,
    amax_bits: DevView<'_>,
) -> Result<(), BackendError> {
    super::fp8::zero_u32(gpu, amax_bits)?;
    if n == 0 {
        return Ok(());
    }
    let t = Elem::storage(dtype);
    let a = a.check(gpu, "silu_mul_amax a", t, n)?;
    let b = b.check(gpu, "silu_mul_amax b", t, n)?;
    let amax = amax_bits.check(gpu, "silu_mul_amax amax", Elem::U32, 1)?;
    let f = kernel(gpu, "silu_mul_amax", dtype)?;
    let n_l = long(n);
    let mut args = gpu.stream.launch_builder(f);
    args.arg(&a).arg(&b).arg(&n_l).arg(&amax);
    // SAFETY: silu_mul_amax_<dtype>(S* a, const S* b, i64 n, unsigned* amax): matching
    // order and types; a and b hold n values of the dtype, amax one u32, on this GPU
    // (checked above).
    unsafe { gpu.run(&mut args, "silu_mul_amax", gpu.grid_for(n)) }
}
