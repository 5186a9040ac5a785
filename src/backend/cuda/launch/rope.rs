//! Launcher of `kernels/rope.cu`.

use super::{int, kernel, long};
use crate::backend::cuda::gpu::{DevView, Elem, Gpu};
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use cudarc::driver::PushKernelArg;

/// Rotate every head of `rows` rows of `row_width` values in place; row `r` sits at position
/// `first_pos + r % rows_per_batch`. `cos` / `sin` are f32 tables of `head_dim / 2` values
/// per position, already rounded to the dtype.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope(
    gpu: &Gpu,
    dtype: Dtype,
    x: DevView<'_>,
    cos: DevView<'_>,
    sin: DevView<'_>,
    rows: usize,
    row_width: usize,
    head_dim: usize,
    rows_per_batch: usize,
    first_pos: usize,
) -> Result<(), BackendError> {
    let pairs = rows * (row_width / 2);
    if pairs == 0 {
        return Ok(());
    }
    let x = x.check(gpu, "rope x", Elem::storage(dtype), rows * row_width)?;
    let table = (first_pos + rows_per_batch) * (head_dim / 2);
    let cos = cos.check(gpu, "rope cos", Elem::F32, table)?;
    let sin = sin.check(gpu, "rope sin", Elem::F32, table)?;
    let f = kernel(gpu, "rope", dtype)?;
    let rows_l = long(rows);
    let (width, hd) = (int("row width", row_width)?, int("head_dim", head_dim)?);
    let (rpb, first) = (
        int("rows per batch", rows_per_batch)?,
        int("position", first_pos)?,
    );
    let mut a = gpu.stream.launch_builder(f);
    a.arg(&x)
        .arg(&cos)
        .arg(&sin)
        .arg(&rows_l)
        .arg(&width)
        .arg(&hd)
        .arg(&rpb)
        .arg(&first);
    // SAFETY: rope_<dtype>(S* x, const float* cos, const float* sin, i64 rows,
    // int row_width, int head_dim, int rows_per_batch, int first_pos): matching order and
    // types; x holds rows * row_width values of the dtype, the tables (first_pos +
    // rows_per_batch) * head_dim / 2 floats each, all on this GPU (checked above): every
    // position the kernel reads.
    unsafe { gpu.run(&mut a, "rope", gpu.grid_for(pairs)) }
}
