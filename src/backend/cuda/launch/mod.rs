//! Launchers: one module per kernel family (`kernels/<family>.cu`), each a thin, typed Rust
//! function per kernel that picks the dtype's instantiation by name
//! ([`super::kernels::kernel_name`]), sizes the grid as the kernel's source says, and passes
//! the arguments in the kernel's order. Buffers come as [`DevView`]s: each launcher checks
//! that every view lives on its GPU, holds the element type its kernel reads, and holds at
//! least as many values as the kernel touches, before anything is queued; so the SAFETY
//! argument of each launch rests on those checks, not on its callers.
//!
//! [`DevView`]: super::gpu::DevView

pub mod attention;
pub mod elementwise;
pub mod fp8;
pub mod rmsnorm;
pub mod rope;
pub mod tail;
pub mod weights;

use super::gpu::Gpu;
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use cudarc::driver::CudaFunction;

/// `base`'s instantiation for `dtype` on `gpu`, or a device error naming it.
pub(crate) fn kernel<'a>(
    gpu: &'a Gpu,
    base: &str,
    dtype: Dtype,
) -> Result<&'a CudaFunction, BackendError> {
    gpu.kernels
        .for_dtype(base, dtype)
        .map_err(|e| BackendError::Device(e.to_string()))
}

/// A kernel without dtype instantiations.
pub(crate) fn single<'a>(gpu: &'a Gpu, name: &str) -> Result<&'a CudaFunction, BackendError> {
    gpu.kernels
        .named(name)
        .map_err(|e| BackendError::Device(e.to_string()))
}

/// A size as the kernels' `int`, or an error when it does not fit.
pub(crate) fn int(what: &str, v: usize) -> Result<i32, BackendError> {
    i32::try_from(v).map_err(|_| {
        BackendError::Unsupported(format!("{what} = {v} is too large for the CUDA kernels"))
    })
}

/// A size as the kernels' 64-bit `i64`.
pub(crate) fn long(v: usize) -> i64 {
    v as i64
}
