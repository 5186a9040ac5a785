//! One GPU brought up for computing: its context, the stream every launch of ours goes to,
//! the kernels compiled for it and the cuBLASLt handle; and the device buffers the forward
//! pass works in.
//!
//! Everything runs on one stream per GPU, in order, so no buffer needs events: cudarc's
//! event tracking is switched off and a buffer's raw device address is taken once when it is
//! allocated. A buffer is freed on the same stream (stream-ordered), after every launch that
//! was queued before, so a launch may name a buffer that is dropped right after it.
//!
//! Launchers take [`DevView`]s, not addresses: a view is borrowed from its [`DevBuf`] and
//! knows its GPU, its element type and its length, and each launcher checks them against
//! what its kernel reads and writes before anything is queued.

use super::gemm::{Gemm, GemmError};
use super::kernels::{DeviceKernels, KernelCache, KernelError};
use super::GpuInfo;
use crate::backend::BackendError;
use crate::pow::dtype::Dtype;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig};
use std::marker::PhantomData;
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
    /// Frees of this GPU's buffers that failed, reported at the next synchronisation.
    faults: Arc<FreeFaults>,
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
            faults: Arc::default(),
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

    /// An uninitialised buffer of `len` values of `elem`.
    pub fn alloc(&self, elem: Elem, len: usize) -> Result<DevBuf, BackendError> {
        let bytes = elem.bytes().checked_mul(len).ok_or_else(|| {
            BackendError::OutOfMemory(format!("{len} values of {} overflow", elem.name()))
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
            ordinal: self.ordinal(),
            faults: self.faults.clone(),
            slice: Some(slice),
        })
    }

    /// A buffer of the model dtype's storage (2 bytes for f16 / bf16, 4 for f32).
    pub fn alloc_dtype(&self, dtype: Dtype, len: usize) -> Result<DevBuf, BackendError> {
        self.alloc(Elem::storage(dtype), len)
    }

    /// A buffer holding `values`.
    pub fn upload<T: HostElem>(&self, values: &[T]) -> Result<DevBuf, BackendError> {
        let buf = self.alloc(T::ELEM, values.len())?;
        self.copy_in(values, buf.view())?;
        Ok(buf)
    }

    /// Copy `values` into the first `values.len()` values of `dst`.
    pub fn copy_in<T: HostElem>(&self, values: &[T], dst: DevView<'_>) -> Result<(), BackendError> {
        let to = dst.check(self, "copy destination", T::ELEM, values.len())?;
        if values.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(|e| self.err("bind", e))?;
        // SAFETY: the destination, on this GPU, holds at least values.len() values of T
        // (checked above); the source is a live host slice of exactly that many bytes. The
        // copy from pageable memory is staged by the driver before the call returns, so
        // `values` may be dropped after.
        unsafe { cudarc::driver::result::memcpy_htod_async(to, values, self.stream.cu_stream()) }
            .map_err(|e| self.err("copy to device", e))
    }

    /// Copy the first `out.len()` values of `src` into `out`, waiting for everything queued
    /// before on the stream.
    pub fn copy_out<T: HostElem>(
        &self,
        src: DevView<'_>,
        out: &mut [T],
    ) -> Result<(), BackendError> {
        let from = src.check(self, "copy source", T::ELEM, out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(|e| self.err("bind", e))?;
        // SAFETY: the source, on this GPU, holds at least out.len() values of T (checked
        // above); `out` is a live, exclusively borrowed host slice of exactly that many
        // bytes; the stream is synchronised before `out` is handed back, so the copy has
        // landed.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(out, from, self.stream.cu_stream()) }
            .map_err(|e| self.err("copy to host", e))?;
        self.sync()
    }

    /// Wait for everything queued on the stream; a kernel's failure surfaces here, and so
    /// does a free of one of this GPU's buffers that failed since the last call.
    pub fn sync(&self) -> Result<(), BackendError> {
        self.stream
            .synchronize()
            .map_err(|e| self.err("synchronize", e))?;
        let faults = self.faults.take();
        if faults.is_empty() {
            Ok(())
        } else {
            Err(BackendError::Device(format!(
                "cuda:{}: {}",
                self.ordinal(),
                faults.join("; ")
            )))
        }
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
    /// until the kernel has run, large enough for everything the kernel reads and writes
    /// (the launchers check their [`DevView`]s for this before they push them).
    pub(crate) unsafe fn run(
        &self,
        args: &mut cudarc::driver::LaunchArgs<'_>,
        name: &str,
        cfg: LaunchConfig,
    ) -> Result<(), BackendError> {
        // SAFETY: this function's own contract, which each launcher meets and states.
        unsafe { args.launch(cfg) }
            .map(|_| ())
            .map_err(|e| self.err(&format!("launching {name}"), e))
    }
}

/// Bytes of one stored value of `dtype`.
pub fn storage_bytes(dtype: Dtype) -> usize {
    Elem::storage(dtype).bytes()
}

/// What a device buffer holds, as the kernels read it. A launcher checks every buffer it is
/// handed against the element type and the number of values its kernel touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    /// IEEE half precision (bit patterns).
    F16,
    /// bfloat16 (bit patterns).
    Bf16,
    F64,
    I64,
    I32,
    /// Also the bits of a non-negative f32 (the FP8 maximum).
    U32,
    /// One FP8 (E4M3) code a byte.
    E4M3,
}

impl Elem {
    /// The storage of a model dtype's tensors.
    pub fn storage(dtype: Dtype) -> Elem {
        match dtype {
            Dtype::F32 => Elem::F32,
            Dtype::F16 => Elem::F16,
            Dtype::Bf16 => Elem::Bf16,
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            Elem::F64 | Elem::I64 => 8,
            Elem::F32 | Elem::I32 | Elem::U32 => 4,
            Elem::F16 | Elem::Bf16 => 2,
            Elem::E4M3 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::F16 => "f16",
            Elem::Bf16 => "bf16",
            Elem::F64 => "f64",
            Elem::I64 => "i64",
            Elem::I32 => "i32",
            Elem::U32 => "u32",
            Elem::E4M3 => "e4m3",
        }
    }
}

/// Host types that are copied to and from device buffers as they are.
pub trait HostElem: cudarc::driver::DeviceRepr {
    const ELEM: Elem;
}

impl HostElem for f32 {
    const ELEM: Elem = Elem::F32;
}
impl HostElem for f64 {
    const ELEM: Elem = Elem::F64;
}
impl HostElem for i64 {
    const ELEM: Elem = Elem::I64;
}
impl HostElem for i32 {
    const ELEM: Elem = Elem::I32;
}
impl HostElem for u32 {
    const ELEM: Elem = Elem::U32;
}

/// Failures of stream-ordered frees on one GPU, kept with their cause until the next
/// synchronisation reports them. A buffer is freed in its `Drop`, where no error can be
/// returned; cudarc would keep the error code in the context and hand it to the next call
/// of any kind, without saying that it came from a free.
#[derive(Debug, Default)]
pub struct FreeFaults(std::sync::Mutex<Vec<String>>);

impl FreeFaults {
    fn record(&self, what: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(what);
    }

    /// The failures recorded since the last call, oldest first.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A device buffer: `len` values of `elem`, at a fixed device address on GPU `ordinal`.
pub struct DevBuf {
    ptr: u64,
    elem: Elem,
    len: usize,
    ordinal: usize,
    faults: Arc<FreeFaults>,
    /// Owns the memory; freed (stream-ordered) in `Drop`. Only None once dropped.
    slice: Option<CudaSlice<u8>>,
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DevBuf(cuda:{}, {} x {})",
            self.ordinal,
            self.len,
            self.elem.name()
        )
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        let Some(slice) = self.slice.take() else {
            return;
        };
        let ctx = slice.context().clone();
        // A model can be dropped on any thread (an evicted cache entry, a job's last
        // reference): make the buffer's context current for the free. Not through
        // `bind_to_thread`, which takes any error recorded in the context and throws it
        // away: set aside what was recorded before, free, read what the free recorded, and
        // put the earlier error back for whoever checks next.
        let earlier = ctx.check_err();
        // SAFETY: the context is alive (the slice holds a reference to it) and making it
        // current on this thread changes nothing but which context this thread's later
        // driver calls address; every call of ours binds its own context first.
        let bound = unsafe { cudarc::driver::result::ctx::set_current(ctx.cu_ctx()) };
        drop(slice);
        let freed = ctx.check_err().and(bound);
        if let Err(e) = earlier {
            ctx.record_err::<()>(Err(e));
        }
        if let Err(e) = freed {
            let what = format!(
                "freeing {} bytes ({} x {}) failed: {e}",
                self.bytes(),
                self.len,
                self.elem.name()
            );
            tracing::warn!("cuda:{}: {what}", self.ordinal);
            self.faults.record(what);
        }
    }
}

impl DevBuf {
    /// The whole buffer as a view.
    pub fn view(&self) -> DevView<'_> {
        DevView {
            ptr: self.ptr,
            len: self.len,
            elem: self.elem,
            ordinal: self.ordinal,
            _buf: PhantomData,
        }
    }

    /// The values from `i` on (`i <= len`: an empty view at the end is allowed).
    pub fn from(&self, i: usize) -> DevView<'_> {
        self.view().from(i)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn elem(&self) -> Elem {
        self.elem
    }

    pub fn bytes(&self) -> usize {
        self.len * self.elem.bytes()
    }
}

/// A stretch of a [`DevBuf`]: its address, how many values it holds and of what type, and
/// the GPU it lives on, borrowed from the buffer so that it cannot outlive it. What every
/// launcher takes instead of a raw address; each checks the views it gets against what its
/// kernel reads and writes ([`DevView::check`]).
#[derive(Clone, Copy)]
pub struct DevView<'a> {
    ptr: u64,
    len: usize,
    elem: Elem,
    ordinal: usize,
    _buf: PhantomData<&'a DevBuf>,
}

impl std::fmt::Debug for DevView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DevView(cuda:{}, {} x {} at {:#x})",
            self.ordinal,
            self.len,
            self.elem.name(),
            self.ptr
        )
    }
}

impl<'a> DevView<'a> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn elem(&self) -> Elem {
        self.elem
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The values from `i` on. Panics past the end (a bug in the caller's arithmetic).
    pub fn from(self, i: usize) -> DevView<'a> {
        assert!(i <= self.len, "DevView::from({i}) past {} values", self.len);
        DevView {
            ptr: self.ptr + (i * self.elem.bytes()) as u64,
            len: self.len - i,
            ..self
        }
    }

    /// `n` values from `i` on. Panics past the end.
    pub fn slice(self, i: usize, n: usize) -> DevView<'a> {
        let v = self.from(i);
        assert!(
            n <= v.len,
            "DevView::slice({i}, {n}) past {} values",
            self.len
        );
        DevView { len: n, ..v }
    }

    /// The address of the first value, for a kernel argument or a driver call, once the view
    /// is known to be on `gpu`, of type `elem` and to hold at least `need` values; else an
    /// error naming `what` (a launcher's argument).
    pub fn check(
        self,
        gpu: &Gpu,
        what: &str,
        elem: Elem,
        need: usize,
    ) -> Result<u64, BackendError> {
        check_view(gpu.ordinal(), self, what, elem, need)
    }

    /// The raw address (for comparisons and alignment only; launches go through
    /// [`DevView::check`]).
    pub fn addr(&self) -> u64 {
        self.ptr
    }

    /// Whether the two views share no byte.
    pub fn is_disjoint(&self, other: &DevView<'_>) -> bool {
        let end = |v: &DevView<'_>| v.ptr + (v.len * v.elem.bytes()) as u64;
        self.ordinal != other.ordinal || end(self) <= other.ptr || end(other) <= self.ptr
    }
}

/// [`DevView::check`] without a GPU at hand.
fn check_view(
    ordinal: usize,
    v: DevView<'_>,
    what: &str,
    elem: Elem,
    need: usize,
) -> Result<u64, BackendError> {
    if v.ordinal != ordinal {
        return Err(BackendError::Device(format!(
            "internal: {what} lives on cuda:{}, the launch is on cuda:{ordinal}",
            v.ordinal
        )));
    }
    if v.elem != elem {
        return Err(BackendError::Device(format!(
            "internal: {what} holds {} values, the kernel reads {}",
            v.elem.name(),
            elem.name()
        )));
    }
    if v.len < need {
        return Err(BackendError::Device(format!(
            "internal: {what} holds {} values, the kernel touches {need}",
            v.len
        )));
    }
    Ok(v.ptr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view of no real memory: only its bookkeeping is exercised.
    fn view(len: usize, elem: Elem, ordinal: usize) -> DevView<'static> {
        DevView {
            ptr: 0x7f00_0000_0000,
            len,
            elem,
            ordinal,
            _buf: PhantomData,
        }
    }

    #[test]
    fn views_check_gpu_type_and_length() {
        let v = view(100, Elem::F16, 1);
        assert_eq!(
            check_view(1, v, "x", Elem::F16, 100).unwrap(),
            0x7f00_0000_0000
        );
        let e = check_view(1, v, "x", Elem::F16, 101)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x holds 100 values, the kernel touches 101"),
            "{e}"
        );
        let e = check_view(1, v, "w", Elem::Bf16, 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("w holds f16 values, the kernel reads bf16"),
            "{e}"
        );
        let e = check_view(0, v, "q", Elem::F16, 1).unwrap_err().to_string();
        assert!(
            e.contains("q lives on cuda:1, the launch is on cuda:0"),
            "{e}"
        );
    }

    #[test]
    fn sub_views_move_the_address_by_whole_values() {
        let v = view(100, Elem::F64, 0);
        let tail = v.from(10);
        assert_eq!((tail.addr() - v.addr(), tail.len()), (80, 90));
        let mid = v.slice(10, 5);
        assert_eq!((mid.addr() - v.addr(), mid.len()), (80, 5));
        assert_eq!(v.from(100).len(), 0);
        assert!(std::panic::catch_unwind(|| v.from(101)).is_err());
        assert!(std::panic::catch_unwind(|| v.slice(99, 2)).is_err());
        assert!(v.slice(0, 10).is_disjoint(&v.slice(10, 5)));
        assert!(!v.slice(0, 11).is_disjoint(&v.slice(10, 5)));
        assert!(v.is_disjoint(&view(100, Elem::F64, 1)));
        assert_eq!(Elem::storage(Dtype::Bf16), Elem::Bf16);
        assert_eq!(storage_bytes(Dtype::F32), 4);
        assert_eq!(Elem::E4M3.bytes(), 1);
    }

    #[test]
    fn free_faults_are_kept_until_taken() {
        let f = FreeFaults::default();
        assert!(f.take().is_empty());
        f.record("freeing 8 bytes (2 x f32) failed: CUDA_ERROR_ILLEGAL_ADDRESS".into());
        let got = f.take();
        assert_eq!(got.len(), 1);
        assert!(got[0].starts_with("freeing 8 bytes"));
        assert!(f.take().is_empty());
    }
}
