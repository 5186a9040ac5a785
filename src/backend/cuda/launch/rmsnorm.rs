//! Launcher of `kernels/rmsnorm.cu`.

use super::{int, kernel};
use crate::backend::cuda::gpu::{DevView, Elem, Gpu};
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Rows one block normalises (one warp each), as in the kernel.
const ROWS_PER_BLOCK: usize = 4;

/// `out[r] = round_T(round_T(x[r] * (1 / sqrt(sum(x[r]^2) / dim + eps))) * weight)` for
/// `rows` rows of `dim` values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rmsnorm(
    gpu: &Gpu,
    dtype: Dtype,
    x: DevView<'_>,
    weight: DevView<'_>,
    out: DevView<'_>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<(), BackendError> {
    if rows == 0 {
        return Ok(());
    }
    let t = Elem::storage(dtype);
    let x = x.check(gpu, "rmsnorm x", t, rows * dim)?;
    let weight = weight.check(gpu, "rmsnorm weight", t, dim)?;
    let out = out.check(gpu, "rmsnorm out", t, rows * dim)?;
    let f = kernel(gpu, "rmsnorm", dtype)?;
    let (rows_i, dim_i) = (int("rows", rows)?, int("dim", dim)?);
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
        block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut a = gpu.stream.launch_builder(f);
    a.arg(&x)
        .arg(&weight)
        .arg(&out)
        .arg(&rows_i)
        .arg(&dim_i)
        .arg(&eps);
    // SAFETY: rmsnorm_<dtype>(const S* x, const S* weight, S* out, int rows, int dim,
    // float eps): the arguments match in order and type; x and out hold rows * dim values
    // and weight dim values of the dtype on this GPU (checked above), and each warp touches
    // only its own row.
    unsafe { gpu.run(&mut a, "rmsnorm", cfg) }
}
