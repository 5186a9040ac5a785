//! One GPU brought up for computing: its context, the stream every launch of ours goes to,
//! the kernels compiled for it and the cuBLASLt handle; and the device buffers the forward
//! pass works in.
//!
//! Everything runs on one stream per GPU, in order, so no buffer needs events: cudarc's
//! event tracking is switched off, a buffer's raw device address is taken once when it is
//! allocated, and launches take plain addresses. A buffer is freed on the same stream
//! (stream-ordered), after every launch that was queued before.

use super::gemm::{Gemm, GemmError};
use super::kernels::{DeviceKernels, KernelCache, KernelError};
use super::GpuInfo;
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig};
use std::sync::Arc;

/// Why a GPU could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("cuda:{ordinal}: {error}")]
    Driver { ordinal: usize, error: DriverError },
    #[error(transparent)]
    Kernels(#[from] KernelError),
    #[error("cuda:{ordinal}: cuBLASLt: {error}")]
    Gemm { ordinal: usize, error: GemmError },
}

/// A driver error as the backend reports it: running out of memory is its own kind (the
/// request can be retried smaller), anything else means the device failed.
pub fn driver_error(ordinal: usize, what: &str, e: DriverError) -> BackendError {
    let text = format!("cuda:{ordinal}: {what}: {e}");
    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        BackendError::OutOfMemory(text)
    } else {
        BackendError::Device(text)
    }
}

/// A GPU ready to compute.
pub struct Gpu {
    pub info: GpuInfo,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub kernels: Arc<DeviceKernels>,
    pub gemm: Gemm,
    /// Streaming multiprocessors: grid-stride kernels launch a few blocks per SM.
    pub sm_count: u32,
    /// The most dynamic shared memory one block may ask for (after opting in).
    pub max_shared_optin: usize,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.info)
    }
}

impl Gpu {
    /// Bring up `info`'s device: its primary context, a stream, the kernels (compiled with
    /// NVRTC on the first device of an architecture: seconds, at start-up) and cuBLASLt.
    pub fn open(info: &GpuInfo) -> Result<Self, GpuError> {
        let ordinal = info.ordinal;
        let drv = |error| GpuError::Driver { ordinal, error };
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        // SAFETY: nothing has been allocated on this context by us yet, and every launch of
        // ours goes to the one stream created below, in order, so no buffer needs the
        // events cudarc would otherwise record around each use.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv)?;
        let kernels = KernelCache::global().for_device(&ctx)?;
        let gemm = Gemm::new(stream.clone()).map_err(|error| GpuError::Gemm { ordinal, error })?;
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv)?
            .max(1) as u32;
        let max_shared_optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(drv)?
            .max(0) as usize;
        Ok(Gpu {
            info: info.clone(),
            ctx,
            stream,
            kernels,
            gemm,
            sm_count,
            max_shared_optin,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.info.ordinal
    }

    /// A driver error of this device, as the backend reports it.
    pub fn err(&self, what: &str, e: DriverError) -> BackendError {
        driver_error(self.ordinal(), what, e)
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(u64, u64), BackendError> {
        let (free, total) = self.ctx.mem_get_info().map_err(|e| self.err("memory", e))?;
        Ok((free as u64, total as u64))
    }

    /// An uninitialised buffer of `len` values of `elem` bytes each.
    pub fn alloc(&self, elem: usize, len: usize) -> Result<DevBuf, BackendError> {
        let bytes = elem.checked_mul(len).ok_or_else(|| {
            BackendError::OutOfMemory(format!("{len} values of {elem} bytes overflow"))
        })?;
        // At least one byte: a zero-sized allocation has no address to hand to a kernel.
        // SAFETY: the memory is uninitialised; every user writes a buffer before reading
        // it (the forward pass fills each scratch buffer before the next step reads it).
        let slice: CudaSlice<u8> = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }
            .map_err(|e| self.err(&format!("allocating {bytes} bytes"), e))?;
        let ptr = {
            let (ptr, _sync) = slice.device_ptr(&self.stream);
            ptr
        };
        Ok(DevBuf {
            ptr,
            elem,
            len,
            _slice: slice,
        })
    }

    /// A buffer of the model dtype's storage (2 bytes for f16 / bf16, 4 for f32).
    pub fn alloc_dtype(&self, dtype: Dtype, len: usize) -> Result<DevBuf, BackendError> {
        self.alloc(storage_bytes(dtype), len)
    }

    /// A buffer holding `values`.
    pub fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        values: &[T],
    ) -> Result<DevBuf, BackendError> {
        let buf = self.alloc(std::mem::size_of::<T>(), values.len())?;
        self.copy_in(values, &buf, 0)?;
        Ok(buf)
    }

    /// Copy `values` into `buf` from element `offset` on.
    pub fn copy_in<T: cudarc::driver::DeviceRepr>(
        &self,
        values: &[T],
        buf: &DevBuf,
        offset: usize,
    ) -> Result<(), BackendError> {
        assert_eq!(buf.elem, std::mem::size_of::<T>(), "copy_in: element size");
        assert!(offset + values.len() <= buf.len, "copy_in: out of bounds");
        if values.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(|e| self.err("bind", e))?;
        // SAFETY: the destination range lies inside `buf` (asserted above); the source is a
        // live host slice of exactly that many bytes. The copy from pageable memory is
        // staged by the driver before the call returns, so `values` may be dropped after.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                buf.at(offset),
                values,
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| self.err("copy to device", e))
    }

    /// Copy `out.len()` values of `buf` from element `offset` on into `out`, waiting for
    /// everything queued before on the stream.
    pub fn copy_out<T: cudarc::driver::DeviceRepr>(
        &self,
        buf: &DevBuf,
        offset: usize,
        out: &mut [T],
    ) -> Result<(), BackendError> {
        assert_eq!(buf.elem, std::mem::size_of::<T>(), "copy_out: element size");
        assert!(offset + out.len() <= buf.len, "copy_out: out of bounds");
        if out.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(|e| self.err("bind", e))?;
        // SAFETY: the source range lies inside `buf`; `out` is a live, exclusively borrowed
        // host slice of exactly that many bytes; the stream is synchronised before `out` is
        // handed back, so the copy has landed.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(out, buf.at(offset), self.stream.cu_stream())
        }
        .map_err(|e| self.err("copy to host", e))?;
        self.sync()
    }

    /// Wait for everything queued on the stream; a kernel's failure surfaces here.
    pub fn sync(&self) -> Result<(), BackendError> {
        self.stream
            .synchronize()
            .map_err(|e| self.err("synchronize", e))
    }

    /// A grid-stride launch over `n` elements: 256 threads a block, at most 16 blocks per SM.
    pub fn grid_for(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 16 * self.sm_count as usize);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Launch the kernel `args` was built for, with `cfg`.
    ///
    /// # Safety
    /// The arguments pushed must match the kernel's parameter list in number, order and
    /// type, and every address must point to device memory of this GPU that stays allocated
    /// until the kernel has run, large enough for everything the kernel reads and writes.
    pub unsafe fn run(
        &self,
        args: &mut cudarc::driver::LaunchArgs<'_>,
        name: &str,
        cfg: LaunchConfig,
    ) -> Result<(), BackendError> {
        // SAFETY: the caller guarantees the argument list and the memory behind it.
        unsafe { args.launch(cfg) }
            .map(|_| ())
            .map_err(|e| self.err(&format!("launching {name}"), e))
    }
}

/// Bytes of one stored value of `dtype`.
pub fn storage_bytes(dtype: Dtype) -> usize {
    match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::Bf16 => 2,
    }
}

/// A device buffer: `len` values of `elem` bytes, at a fixed device address.
pub struct DevBuf {
    ptr: u64,
    elem: usize,
    len: usize,
    /// Owns the memory; freed (stream-ordered) when the buffer drops.
    _slice: CudaSlice<u8>,
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({} x {} bytes)", self.len, self.elem)
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // The memory is freed (stream-ordered) by the slice's own drop, right after this;
        // make its context current first, since a model can be dropped on any thread (an
        // evicted cache entry, a job's last reference).
        let _ = self._slice.context().bind_to_thread();
    }
}

impl DevBuf {
    /// The device address of the first value.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The device address of value `i` (`i <= len`: one past the end is allowed, as for a
    /// slice).
    pub fn at(&self, i: usize) -> u64 {
        assert!(i <= self.len, "DevBuf::at({i}) past {} values", self.len);
        self.ptr + (i * self.elem) as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.len * self.elem
    }
}
