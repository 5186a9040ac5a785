//! The forward pass's matrix products, through cuBLASLt's raw API.
//!
//! Every product of the forward is PyTorch's `F.linear` without bias:
//!
//! ```text
//! dst[i, j] = round_T( sum_l x[i * x_stride + l] * w[j * k + l] )      i < m, j < n, l < k
//! ```
//!
//! with `x` m rows of k values (`x_stride` apart: the last layer's query projection reads one
//! row per nonce out of a `[batch, seq, dim]` tensor), `w` row-major `[n, k]` (PyTorch's
//! `[out, in]`) and `dst` row-major `[m, n]`, all three of the model's storage dtype.
//! Accumulation and scaling are f32 (`CUBLAS_COMPUTE_32F`, scale type `CUDA_R_32F`); for f32
//! data that is exactly `CUBLAS_COMPUTE_32F`, never a TF32 compute type, whose 10-bit
//! mantissa inputs would put the products far from the reference's.
//!
//! cuBLASLt is column-major, so the product is computed transposed, the "TN" layout:
//! `C = dst^T` is column-major `[n, m]` (ldc = n), `A = w` seen column-major is `[k, n]`
//! (lda = k) taken transposed (`op(A) = [n, k]`), `B = x^T` is column-major `[k, m]`
//! (ldb = x_stride) taken as is. `C = op(A) * B` is then `[n, m]`, which is `dst` row-major.
//!
//! cuBLASLt documents 32-bit dimensions, and products whose matrices span 2^31 elements or
//! more are known to fail; PARAMS_V2's w1 and w3 outputs (49152 values a row, 256 rows a
//! nonce) reach 2^31 elements at 171 nonces. A product any of whose matrices would span
//! [`MAX_SPAN`] elements or more is enqueued as [`pieces`]: bands of rows (and, for a weight
//! that alone spans that much, bands of its rows too), each a product of its own below the
//! limit. Every output element is still one f32 sum over k rounded once; which rows share a
//! call changes nothing of the arithmetic.
//!
//! cudarc's safe `Matmul` rebuilds the descriptors and asks the heuristic on every call (and
//! uses TF32 for f32). Here a [`Plan`] (descriptor, layouts and the heuristic's algorithm) is
//! built on the first call of a shape and cached, so a call is one `cublasLtMatmul` enqueue,
//! and a shape always runs the same algorithm: the same bits from run to run on one device.

use super::{CudaLibrary, CudaUnavailable};
use crate::pow::dtype::Dtype;
use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DriverError};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;
use std::mem::{size_of, MaybeUninit};
use std::sync::{Arc, Mutex, PoisonError};

/// cuBLASLt's workspace, as NVIDIA recommends it (and cudarc's `Workspace` sizes it):
/// 32 MiB on Hopper (sm_90) and later, 4 MiB before.
const WORKSPACE_BYTES_SM90: usize = 32 << 20;
const WORKSPACE_BYTES_OLDER: usize = 4 << 20;

/// The largest alignment cuBLASLt's heuristic distinguishes (its default assumption).
const MAX_ALIGNMENT: u32 = 256;

/// `cublasOperation_t` values (the cuBLASLt bindings do not carry the enum): the
/// `CUBLASLT_MATMUL_DESC_TRANS*` attributes are `int32_t`.
const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;

/// The shape of one product (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub dtype: Dtype,
    /// Rows of `x` and `dst` (tokens).
    pub m: usize,
    /// Rows of `w`, columns of `dst` (output features).
    pub n: usize,
    /// Columns of `x` and `w` (input features).
    pub k: usize,
    /// Elements from one row of `x` to the next, at least `k`.
    pub x_stride: usize,
}

impl GemmShape {
    /// Floating-point operations of the product: a multiply and an add per term.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }

    /// Whether the product has no output element (nothing to compute, nothing read).
    fn is_empty(&self) -> bool {
        self.m == 0 || self.n == 0
    }

    /// The checks cuBLASLt's layouts need: a non-empty sum, rows of `x` that do not overlap,
    /// leading dimensions that fit its `int64_t`.
    fn validate(&self) -> Result<(), GemmError> {
        let fail = |reason: &str| {
            Err(GemmError::Shape {
                shape: *self,
                reason: reason.to_string(),
            })
        };
        if self.k == 0 {
            return fail("k is 0 (an empty sum; the forward never asks for one)");
        }
        if self.x_stride < self.k {
            return fail("x_stride is smaller than k (the rows of x would overlap)");
        }
        let fits = |v: usize| i64::try_from(v).is_ok();
        if ![self.m, self.n, self.k, self.x_stride]
            .into_iter()
            .all(fits)
        {
            return fail("a dimension does not fit in an int64");
        }
        Ok(())
    }
}

impl fmt::Display for GemmShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} m={} n={} k={} x_stride={}",
            self.dtype, self.m, self.n, self.k, self.x_stride
        )
    }
}

/// Why a product could not be set up or enqueued.
#[derive(Debug, thiserror::Error)]
pub enum GemmError {
    /// libcublasLt is not installed, or failed to load.
    #[error("cuBLASLt is unavailable: {0}")]
    Unavailable(CudaUnavailable),
    #[error("CUDA driver error around the matrix products: {0}")]
    Driver(#[from] DriverError),
    /// A cuBLASLt call that belongs to no shape (creating the handle) failed.
    #[error("{op} failed: {status}")]
    Setup {
        op: &'static str,
        status: CublasError,
    },
    /// A cuBLASLt call for one shape (building its plan, or the product itself) failed.
    #[error("{op} failed for shape {shape}: {status}")]
    Cublas {
        op: &'static str,
        shape: GemmShape,
        status: CublasError,
    },
    /// The heuristic offered no algorithm for the shape.
    #[error("no algorithm for shape {0}")]
    NoAlgorithm(GemmShape),
    /// The shape or the pointers break a rule of [`Gemm::linear`].
    #[error("invalid product {shape}: {reason}")]
    Shape { shape: GemmShape, reason: String },
}

/// The storage dtype's size in bytes.
pub(crate) fn element_bytes(dtype: Dtype) -> usize {
    match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::Bf16 => 2,
    }
}

fn data_type(dtype: Dtype) -> sys::cudaDataType {
    match dtype {
        Dtype::F32 => sys::cudaDataType::CUDA_R_32F,
        Dtype::F16 => sys::cudaDataType::CUDA_R_16F,
        Dtype::Bf16 => sys::cudaDataType::CUDA_R_16BF,
    }
}

/// The split-K reduction schemes an algorithm may use (`cublasLtReductionScheme_t` bits).
/// The product must be one f32 sum rounded once to the dtype, as the CPU backend computes
/// it. `INPLACE` and `OUTPUT_TYPE` add the partial sums up in the output type, which for
/// f16 and bf16 rounds every partial sum (PyTorch's default "reduced precision reduction"):
/// only `COMPUTE_TYPE` (f32 partials in the workspace) keeps one rounding. For f32 the
/// output type is the compute type, and every scheme is allowed. Algorithms without split-K
/// (`NONE`, 0) are always allowed.
fn reduction_schemes(dtype: Dtype) -> u32 {
    use sys::cublasLtReductionScheme_t as R;
    match dtype {
        Dtype::F32 => R::CUBLASLT_REDUCTION_SCHEME_MASK as u32,
        Dtype::F16 | Dtype::Bf16 => R::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32,
    }
}

/// The alignment of a device address in bytes, capped at [`MAX_ALIGNMENT`] (null counts as
/// fully aligned).
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        MAX_ALIGNMENT
    } else {
        (1u64 << ptr.trailing_zeros().min(MAX_ALIGNMENT.trailing_zeros())) as u32
    }
}

/// The bound on the elements one matrix of a single cuBLASLt call may span: each of `x`,
/// `w` and `dst` spans fewer than this (2^31) in every call.
pub const MAX_SPAN: usize = 1 << 31;

/// One piece of a product (see [`pieces`]): a product of its own, and where its matrices
/// start inside the whole product's, in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Rows `row0 .. row0 + shape.m` of `x` and `dst`, output columns (rows of `w`)
    /// `col0 .. col0 + shape.n`; `k` and `x_stride` as in the whole product.
    pub shape: GemmShape,
    pub row0: usize,
    pub col0: usize,
    /// Elements from one row of the piece's output to the next: the whole product's n.
    pub dst_stride: usize,
}

impl Piece {
    /// Where the piece's `x` starts, in elements of `x`.
    pub fn x_offset(&self) -> usize {
        self.row0 * self.shape.x_stride
    }

    /// Where the piece's `w` starts, in elements of `w` (rows of k).
    pub fn w_offset(&self) -> usize {
        self.col0 * self.shape.k
    }

    /// Where the piece's `dst` starts, in elements of `dst`.
    pub fn dst_offset(&self) -> usize {
        self.row0 * self.dst_stride + self.col0
    }

    /// Elements the piece's `x`, `w` and `dst` span.
    pub fn spans(&self) -> (usize, usize, usize) {
        let GemmShape {
            m, n, k, x_stride, ..
        } = self.shape;
        ((m - 1) * x_stride + k, n * k, (m - 1) * self.dst_stride + n)
    }
}

/// `shape` cut into pieces whose matrices each span fewer than `limit` elements
/// ([`MAX_SPAN`] for cuBLASLt): bands of whole rows of `x` and `dst`, as many rows a band as
/// the limit allows; and, only when the weight alone spans `limit` or more, bands of its
/// rows (output columns) as well. Row-major order of (row band, column band); one piece when
/// the product fits.
pub fn pieces(shape: &GemmShape, limit: usize) -> Result<Vec<Piece>, GemmError> {
    shape.validate()?;
    let GemmShape {
        m, n, k, x_stride, ..
    } = *shape;
    if shape.is_empty() {
        return Ok(Vec::new());
    }
    if k >= limit {
        return Err(GemmError::Shape {
            shape: *shape,
            reason: format!("one row of k values spans {limit} elements or more"),
        });
    }
    // Columns a band: all of them when the weight fits, else as many rows of w as fit,
    // rounded down to a multiple of 16 (FP8 products need n a multiple of 16, and so does
    // every band of one), at least one.
    let cols = if n.saturating_mul(k) < limit {
        n
    } else {
        ((limit - 1) / k / 16 * 16).max(1)
    };
    // Rows a band: (rows - 1) * x_stride + k and (rows - 1) * n + cols below the limit.
    let by_x = (limit - 1 - k) / x_stride + 1;
    let by_dst = (limit - 1 - cols) / n + 1;
    let rows = by_x.min(by_dst).min(m);
    let mut out = Vec::with_capacity(m.div_ceil(rows) * n.div_ceil(cols));
    for row0 in (0..m).step_by(rows) {
        for col0 in (0..n).step_by(cols) {
            out.push(Piece {
                shape: GemmShape {
                    m: rows.min(m - row0),
                    n: cols.min(n - col0),
                    ..*shape
                },
                row0,
                col0,
                dst_stride: n,
            });
        }
    }
    Ok(out)
}

/// What a plan is built for: the shape, and how aligned the three matrices' addresses are.
/// cuBLASLt's heuristic assumes 256-byte aligned addresses unless told otherwise, and an
/// algorithm picked under that assumption may refuse (or misread) a less aligned matrix,
/// such as the last layer's query rows that start mid-tensor. Addresses from the allocator
/// are 256-byte aligned, so a shape normally has one plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    shape: GemmShape,
    /// ldc: elements from one output row to the next (n, or the whole product's n for a
    /// piece of a product split by columns).
    dst_stride: usize,
    /// E4M3 inputs (`w` and `x`) with per-tensor scales, output in the shape's dtype.
    fp8: bool,
    /// Alignment in bytes of `w` (cuBLASLt's A), `x` (B) and `dst` (C and D).
    align_w: u32,
    align_x: u32,
    align_dst: u32,
}

/// A matmul descriptor, destroyed when dropped.
struct MatmulDesc(sys::cublasLtMatmulDesc_t);

impl Drop for MatmulDesc {
    fn drop(&mut self) {
        // SAFETY: the descriptor was created by cublasLtMatmulDescCreate, is owned by this
        // value alone and is destroyed only here. A failure cannot be acted on in a drop.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

/// A matrix layout, destroyed when dropped.
struct Layout(sys::cublasLtMatrixLayout_t);

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatrixLayoutCreate, owned by this value alone, destroyed
        // only here.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

/// Heuristic preferences, destroyed when dropped (they are only needed to build a plan).
struct Preference(sys::cublasLtMatmulPreference_t);

impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulPreferenceCreate, owned by this value alone,
        // destroyed only here.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// Everything one `cublasLtMatmul` call of a shape needs besides the pointers. The
/// descriptors are destroyed when the plan is dropped.
struct Plan {
    desc: MatmulDesc,
    /// `w`: column-major `[k, n]`, lda = k, used transposed.
    a: Layout,
    /// `x^T`: column-major `[k, m]`, ldb = x_stride.
    b: Layout,
    /// `dst^T`: column-major `[n, m]`, ldc = the key's dst_stride (n unless a piece); C and D
    /// are the same matrix (beta is 0, so C is never read).
    c: Layout,
    /// The heuristic's first algorithm, copied out of its result.
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Plan {
    /// Builds the descriptors for `key` and asks the heuristic for an algorithm that fits in
    /// `workspace_bytes` and the key's alignments.
    ///
    /// The caller has bound the stream's context to this thread; `handle` is live.
    fn build(
        handle: sys::cublasLtHandle_t,
        workspace_bytes: usize,
        key: &PlanKey,
        scales: Option<(u64, u64)>,
    ) -> Result<Self, GemmError> {
        let shape = key.shape;
        let fail = |op: &'static str| move |status| GemmError::Cublas { op, shape, status };
        let GemmShape {
            dtype,
            m,
            n,
            k,
            x_stride,
        } = shape;

        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map(MatmulDesc)
        .map_err(fail("cublasLtMatmulDescCreate"))?;
        for (attr, op) in [
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                CUBLAS_OP_T,
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                CUBLAS_OP_N,
            ),
        ] {
            // SAFETY: `desc` is live; the TRANS attributes are int32_t and `op` is an i32
            // that outlives the call (cuBLASLt copies the value).
            unsafe {
                lt::set_matmul_desc_attribute(
                    desc.0,
                    attr,
                    (&op as *const i32).cast(),
                    size_of::<i32>(),
                )
            }
            .map_err(fail("cublasLtMatmulDescSetAttribute"))?;
        }

        // FP8 plans carry their scale pointers before the heuristic sees the descriptor.
        if let Some(scales) = scales {
            set_scales(&desc, shape, scales)?;
        }
        let input_type = if key.fp8 {
            sys::cudaDataType::CUDA_R_8F_E4M3
        } else {
            data_type(dtype)
        };
        let layout = |ty, rows: usize, cols: usize, ld: usize| {
            // Shape::validate checked that every dimension fits an int64.
            let ld = i64::try_from(ld).unwrap_or(i64::MAX);
            lt::create_matrix_layout(ty, rows as u64, cols as u64, ld)
                .map(Layout)
                .map_err(fail("cublasLtMatrixLayoutCreate"))
        };
        let a = layout(input_type, k, n, k)?;
        let b = layout(input_type, k, m, x_stride)?;
        let c = layout(data_type(dtype), n, m, key.dst_stride)?;

        let pref = lt::create_matmul_pref()
            .map(Preference)
            .map_err(fail("cublasLtMatmulPreferenceCreate"))?;
        let workspace = workspace_bytes as u64;
        // SAFETY: `pref` is live; MAX_WORKSPACE_BYTES is a uint64_t and `workspace` a u64
        // that outlives the call (cuBLASLt copies the value).
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace as *const u64).cast(),
                size_of::<u64>(),
            )
        }
        .map_err(fail("cublasLtMatmulPreferenceSetAttribute"))?;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        for (attr, value) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_w),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_x),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_dst),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_dst),
            (
                P::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                reduction_schemes(dtype),
            ),
        ] {
            // SAFETY: `pref` is live; the MIN_ALIGNMENT and REDUCTION_SCHEME_MASK attributes
            // are uint32_t and `value` a u32 that outlives the call.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref.0,
                    attr,
                    (&value as *const u32).cast(),
                    size_of::<u32>(),
                )
            }
            .map_err(fail("cublasLtMatmulPreferenceSetAttribute"))?;
        }

        let mut result = MaybeUninit::<sys::cublasLtMatmulHeuristicResult_t>::zeroed();
        let mut count: i32 = 0;
        // SAFETY: the handle, descriptor, layouts and preference are live; `result` has room
        // for the one result requested and `count` receives how many were written. C and D
        // share one layout, as they are one matrix.
        unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                handle,
                desc.0,
                a.0,
                b.0,
                c.0,
                c.0,
                pref.0,
                1,
                result.as_mut_ptr(),
                &mut count,
            )
        }
        .result()
        .map_err(fail("cublasLtMatmulAlgoGetHeuristic"))?;
        if count < 1 {
            return Err(GemmError::NoAlgorithm(shape));
        }
        // SAFETY: cuBLASLt wrote `count` >= 1 results, and the buffer was zeroed before (a
        // valid bit pattern for this plain C struct either way).
        let result = unsafe { result.assume_init() };
        result
            .state
            .result()
            .map_err(fail("cublasLtMatmulAlgoGetHeuristic"))?;
        Ok(Plan {
            desc,
            a,
            b,
            c,
            algo: result.algo,
        })
    }
}

/// The rules of an FP8 product's shape (see [`Gemm::linear_fp8`]).
fn check_fp8_shape(shape: &GemmShape) -> Result<(), GemmError> {
    shape.validate()?;
    let bad = |reason: String| {
        Err(GemmError::Shape {
            shape: *shape,
            reason,
        })
    };
    if shape.dtype == Dtype::F32 {
        return bad("FP8 products write f16 or bf16, not f32".into());
    }
    if !shape.k.is_multiple_of(16) || !shape.n.is_multiple_of(16) {
        return bad(format!(
            "FP8 products need k and n multiples of 16 (k {}, n {})",
            shape.k, shape.n
        ));
    }
    if shape.x_stride != shape.k {
        return bad("FP8 activations are quantised into contiguous rows".into());
    }
    Ok(())
}

/// Point an FP8 plan's descriptor at the f32 scales of A (the weight) and B (the
/// activations) on the device; they change from product to product, so they are set before
/// each one (under the plans' lock).
fn set_scales(desc: &MatmulDesc, shape: GemmShape, (a, b): (u64, u64)) -> Result<(), GemmError> {
    use sys::cublasLtMatmulDescAttributes_t as D;
    for (attr, ptr) in [
        (D::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, a),
        (D::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, b),
    ] {
        let p = ptr as *const c_void;
        // SAFETY: the descriptor is live; the attribute is a device pointer (`const void*`),
        // copied by cuBLASLt from `p`, which outlives the call.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc.0,
                attr,
                (&p as *const *const c_void).cast(),
                size_of::<*const c_void>(),
            )
        }
        .map_err(|status| GemmError::Cublas {
            op: "cublasLtMatmulDescSetAttribute",
            shape,
            status,
        })?;
    }
    Ok(())
}

/// The device addresses of `piece`'s `(dst, x, w)` inside the whole product's, with `x` and
/// `w` of `in_elem` bytes an element and `dst` of `out_elem`.
fn piece_addresses(
    piece: &Piece,
    (dst, x, w): (u64, u64, u64),
    in_elem: usize,
    out_elem: usize,
) -> (u64, u64, u64) {
    (
        dst + (piece.dst_offset() * out_elem) as u64,
        x + (piece.x_offset() * in_elem) as u64,
        w + (piece.w_offset() * in_elem) as u64,
    )
}

/// Whether libcublasLt can be loaded. cudarc panics on the first call into a library it
/// cannot find, so this comes before any call into cuBLASLt.
fn ensure_library() -> Result<(), GemmError> {
    if CudaLibrary::CublasLt.is_present() {
        Ok(())
    } else {
        Err(GemmError::Unavailable(CudaUnavailable::LibraryMissing(
            CudaLibrary::CublasLt,
        )))
    }
}

/// Creates a cuBLASLt handle; a library that loads but lacks the symbol (cudarc panics then)
/// is reported, not a crash.
fn create_handle() -> Result<sys::cublasLtHandle_t, GemmError> {
    match std::panic::catch_unwind(lt::create_handle) {
        Ok(Ok(handle)) => Ok(handle),
        Ok(Err(status)) => Err(GemmError::Setup {
            op: "cublasLtCreate",
            status,
        }),
        Err(payload) => Err(GemmError::Unavailable(CudaUnavailable::LoadFailure(
            super::panic_message(payload.as_ref()),
        ))),
    }
}

/// The matrix products of one stream: a cuBLASLt handle, its workspace and the plans of the
/// shapes seen so far.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    /// Owns the workspace memory (freed, in stream order, when the `Gemm` is dropped).
    workspace: CudaSlice<u8>,
    /// The workspace's address, taken once: the workspace is only ever used on `stream`, in
    /// stream order, so no per-call synchronisation bookkeeping is needed.
    workspace_ptr: u64,
    stream: Arc<CudaStream>,
    /// Also serialises the use of `handle` and `workspace`: the lock is held from the plan
    /// lookup to the end of the enqueue.
    plans: Mutex<HashMap<PlanKey, Plan>>,
}

// SAFETY: the raw cuBLASLt handle and the plans' descriptors are plain heap objects of the
// library, not tied to the thread that created them; a handle may be used from any thread,
// one thread at a time. Every use of them (building plans, enqueueing, destroying) happens
// under the `plans` mutex or with `&mut self` in drop, and binds the stream's context to the
// calling thread first. The workspace and stream are cudarc types that are Send and Sync.
unsafe impl Send for Gemm {}
// SAFETY: as for Send: shared use goes through the mutex.
unsafe impl Sync for Gemm {}

impl Gemm {
    /// A handle and workspace for products enqueued on `stream`.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, GemmError> {
        ensure_library()?;
        let ctx = stream.context();
        ctx.bind_to_thread()?;
        let major =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let bytes = if major >= 9 {
            WORKSPACE_BYTES_SM90
        } else {
            WORKSPACE_BYTES_OLDER
        };
        let workspace = stream.alloc_zeros::<u8>(bytes)?;
        let workspace_ptr = {
            let (ptr, _sync) = workspace.device_ptr(&stream);
            ptr
        };
        let handle = create_handle()?;
        Ok(Gemm {
            handle,
            workspace,
            workspace_ptr,
            stream,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// Enqueues `dst = x * w^T` on the stream (see the module documentation), rounded to the
    /// shape's dtype, in [`pieces`] below [`MAX_SPAN`]. Products with no output element (m or
    /// n is 0) do nothing.
    ///
    /// Plans (descriptors, layouts, the heuristic's first algorithm) are built on the first
    /// call of a shape and cached.
    ///
    /// # Safety
    /// `dst`, `x` and `w` are device pointers (CUdeviceptr) in this stream's context, each
    /// aligned to the dtype's size, holding at least `m*n`, `(m-1)*x_stride+k` and `n*k`
    /// elements of the dtype, valid until the product has run on the stream; `dst` aliases
    /// neither input.
    pub(crate) unsafe fn linear(
        &self,
        shape: GemmShape,
        dst: u64,
        x: u64,
        w: u64,
    ) -> Result<(), GemmError> {
        if shape.is_empty() {
            return Ok(());
        }
        let elem = element_bytes(shape.dtype);
        for piece in pieces(&shape, MAX_SPAN)? {
            let (dst, x, w) = piece_addresses(&piece, (dst, x, w), elem, elem);
            let key = PlanKey {
                shape: piece.shape,
                dst_stride: piece.dst_stride,
                fp8: false,
                align_w: alignment(w),
                align_x: alignment(x),
                align_dst: alignment(dst),
            };
            if key.align_w.min(key.align_x).min(key.align_dst) < elem as u32 {
                return Err(GemmError::Shape {
                    shape,
                    reason: format!(
                        "a pointer is not aligned to the {elem}-byte element \
                         (dst {dst:#x}, x {x:#x}, w {w:#x})"
                    ),
                });
            }
            // SAFETY: the piece's matrices lie inside the caller's (its rows and columns
            // are inside the whole product's, and its offsets are the whole product's
            // strides times its first row and column), so the caller's guarantees cover
            // them; no scales for 16/32-bit inputs.
            unsafe { self.enqueue(key, dst, x, w, None) }?;
        }
        Ok(())
    }

    /// Enqueues `dst = round_T((x_scale * x8) * (w_scale * w8)^T)`: the FP8 (E4M3) path of
    /// Hopper and Blackwell (and Ada, sm_89) tensor cores. `x8` holds `m` rows of `k` E4M3
    /// values (contiguous: `shape.x_stride` must be `k`), `w8` the `[n, k]` weight in E4M3,
    /// `x_scale` / `w_scale` point to one f32 each on the device (the factors that turn the
    /// stored values back into the tensors' own scale); accumulation in f32, `dst` in the
    /// shape's dtype (f16 or bf16). cuBLASLt's FP8 kernels need the TN layout (which this is)
    /// and `k` a multiple of 16.
    ///
    /// # Safety
    /// As [`Gemm::linear`], with `x8` and `w8` holding `m * k` and `n * k` bytes, and the two
    /// scale pointers one f32 each, all valid until the product has run.
    pub(crate) unsafe fn linear_fp8(
        &self,
        shape: GemmShape,
        dst: u64,
        x8: u64,
        w8: u64,
        x_scale: u64,
        w_scale: u64,
    ) -> Result<(), GemmError> {
        if shape.is_empty() {
            return Ok(());
        }
        check_fp8_shape(&shape)?;
        let bad = |reason: String| Err(GemmError::Shape { shape, reason });
        let out_elem = element_bytes(shape.dtype);
        for piece in pieces(&shape, MAX_SPAN)? {
            let (dst, x8, w8) = piece_addresses(&piece, (dst, x8, w8), 1, out_elem);
            let key = PlanKey {
                shape: piece.shape,
                dst_stride: piece.dst_stride,
                fp8: true,
                align_w: alignment(w8),
                align_x: alignment(x8),
                align_dst: alignment(dst),
            };
            if key.align_w.min(key.align_x) < 16 || key.align_dst < out_elem as u32 {
                return bad(format!(
                    "FP8 inputs must be 16-byte aligned (dst {dst:#x}, x {x8:#x}, w {w8:#x})"
                ));
            }
            // SAFETY: as in `linear`, the piece lies inside the caller's matrices, which the
            // caller's guarantees cover; the scales are per tensor, the same for every piece.
            unsafe { self.enqueue(key, dst, x8, w8, Some((w_scale, x_scale))) }?;
        }
        Ok(())
    }

    /// Build (once) and enqueue the plan of `key`; `scales` are the device pointers of A's
    /// (the weight's) and B's (the activations') f32 scale, for FP8 plans.
    ///
    /// # Safety
    /// As [`Gemm::linear`] / [`Gemm::linear_fp8`].
    unsafe fn enqueue(
        &self,
        key: PlanKey,
        dst: u64,
        x: u64,
        w: u64,
        scales: Option<(u64, u64)>,
    ) -> Result<(), GemmError> {
        let shape = key.shape;
        // cuBLASLt launches through the runtime, which works in the current context.
        self.stream.context().bind_to_thread()?;
        let mut plans = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        let plan = match plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Plan::build(
                self.handle,
                self.workspace.len(),
                &key,
                scales,
            )?),
        };
        if let Some(scales) = scales {
            set_scales(&plan.desc, shape, scales)?;
        }

        let alpha: f32 = 1.0;
        let beta: f32 = 0.0;
        // SAFETY: the handle and the plan's descriptors are live and used under the lock;
        // alpha and beta are f32 host values (the scale type is CUDA_R_32F, the pointer mode
        // host) read during the call; the caller guarantees the device pointers hold the
        // matrices the layouts describe, in the stream's context, which is bound; the
        // workspace belongs to this handle and stream and is as large as the heuristic was
        // told; C is never read because beta is 0, and D is dst.
        unsafe {
            sys::cublasLtMatmul(
                self.handle,
                plan.desc.0,
                (&alpha as *const f32).cast(),
                w as *const c_void,
                plan.a.0,
                x as *const c_void,
                plan.b.0,
                (&beta as *const f32).cast(),
                dst as *const c_void,
                plan.c.0,
                dst as *mut c_void,
                plan.c.0,
                &plan.algo,
                self.workspace_ptr as *mut c_void,
                self.workspace.len(),
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .result()
        .map_err(|status| GemmError::Cublas {
            op: "cublasLtMatmul",
            shape,
            status,
        })
    }

    /// The stream the products are enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl fmt::Debug for Gemm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plans = self
            .plans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("Gemm")
            .field("workspace_bytes", &self.workspace.len())
            .field("plans", &plans)
            .finish_non_exhaustive()
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        // cublasLtDestroy synchronises the device through the runtime, in the current
        // context. Best effort: a context with a pending error is left as it is.
        let _ = self.stream.context().bind_to_thread();
        // The plans' descriptors first (each destroys its own), then the handle. The
        // workspace is freed after this, in stream order, when the field is dropped.
        self.plans
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        if !self.handle.is_null() {
            // SAFETY: the handle was created by cublasLtCreate in `new`, nothing uses it any
            // more (no plan is left and we hold `&mut self`), and it is destroyed only here.
            let _ = unsafe { lt::destroy_handle(self.handle) };
            self.handle = std::ptr::null_mut();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_shapes_follow_cublaslt_rules() {
        let shape = |dtype, n, k, x_stride| GemmShape {
            dtype,
            m: 3,
            n,
            k,
            x_stride,
        };
        // PARAMS_V2's products all qualify.
        for (n, k) in [(1792, 1792), (49152, 1792), (1792, 49152)] {
            check_fp8_shape(&shape(Dtype::F16, n, k, k)).unwrap();
            check_fp8_shape(&shape(Dtype::Bf16, n, k, k)).unwrap();
        }
        let e = check_fp8_shape(&shape(Dtype::F32, 32, 32, 32)).unwrap_err();
        assert!(e.to_string().contains("not f32"), "{e}");
        let e = check_fp8_shape(&shape(Dtype::F16, 32, 28, 28)).unwrap_err();
        assert!(e.to_string().contains("multiples of 16"), "{e}");
        let e = check_fp8_shape(&shape(Dtype::F16, 20, 32, 32)).unwrap_err();
        assert!(e.to_string().contains("n 20"), "{e}");
        let e = check_fp8_shape(&shape(Dtype::F16, 32, 32, 64)).unwrap_err();
        assert!(e.to_string().contains("contiguous"), "{e}");
    }
    use crate::backend::cuda::ceiling::encode;
    use crate::backend::cuda::cuda_available;
    use crate::pow::dtype::round_f64_via_f32;
    use cudarc::driver::CudaContext;

    #[test]
    fn shapes_are_validated_and_named() {
        let shape = GemmShape {
            dtype: Dtype::F16,
            m: 4,
            n: 8,
            k: 16,
            x_stride: 16,
        };
        assert!(shape.validate().is_ok());
        assert_eq!(shape.flops(), 1024.0);
        assert_eq!(shape.to_string(), "f16 m=4 n=8 k=16 x_stride=16");

        let text = GemmShape { k: 0, ..shape }
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("k is 0") && text.contains("m=4 n=8 k=0"),
            "{text}"
        );
        let text = GemmShape {
            x_stride: 15,
            ..shape
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(text.contains("x_stride is smaller than k"), "{text}");

        assert!(GemmShape { m: 0, ..shape }.is_empty());
        assert!(GemmShape {
            n: 0,
            k: 0,
            ..shape
        }
        .is_empty());
        assert!(!shape.is_empty());

        let text = GemmError::NoAlgorithm(shape).to_string();
        assert_eq!(text, "no algorithm for shape f16 m=4 n=8 k=16 x_stride=16");
        let text = GemmError::Cublas {
            op: "cublasLtMatmul",
            shape,
            status: CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED),
        }
        .to_string();
        assert!(
            text.contains("cublasLtMatmul failed for shape f16 m=4"),
            "{text}"
        );
        assert!(text.contains("NOT_SUPPORTED"), "{text}");
    }

    /// The CPU twin of one piece: each output element one f32 sum over k in order, rounded
    /// to the dtype, read and written through the piece's own offsets and strides (as the GPU
    /// path addresses them), inside slices of exactly the piece's spans.
    fn twin(dtype: Dtype, piece: &Piece, x: &[f32], w: &[f32], dst: &mut [f32]) {
        let (x_span, w_span, dst_span) = piece.spans();
        let x = &x[piece.x_offset()..piece.x_offset() + x_span];
        let w = &w[piece.w_offset()..piece.w_offset() + w_span];
        let dst = &mut dst[piece.dst_offset()..piece.dst_offset() + dst_span];
        let GemmShape {
            m, n, k, x_stride, ..
        } = piece.shape;
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f32;
                for l in 0..k {
                    acc += x[i * x_stride + l] * w[j * k + l];
                }
                dst[i * piece.dst_stride + j] = dtype.round(acc);
            }
        }
    }

    fn product_by_pieces(
        dtype: Dtype,
        shape: &GemmShape,
        limit: usize,
        x: &[f32],
        w: &[f32],
    ) -> Vec<f32> {
        let mut dst = vec![f32::NAN; shape.m * shape.n];
        let pieces = pieces(shape, limit).unwrap();
        for p in &pieces {
            let (a, b, c) = p.spans();
            assert!(
                a < limit && b < limit && c < limit,
                "{p:?} spans {a}, {b}, {c}"
            );
        }
        for p in pieces {
            twin(dtype, &p, x, w, &mut dst);
        }
        dst
    }

    #[test]
    fn split_products_give_the_unsplit_products_bits() {
        let mut rng = crate::splitmix::SplitMix64(11);
        let mut split = 0;
        for case in 0..400 {
            let dtype = Dtype::ALL[case % 3];
            let m = 1 + (rng.next_u64() % 23) as usize;
            let n = 1 + (rng.next_u64() % 40) as usize;
            let k = 1 + (rng.next_u64() % 9) as usize;
            let x_stride = k + (rng.next_u64() % 3) as usize * 5;
            let limit = k + 1 + (rng.next_u64() % 300) as usize;
            let shape = GemmShape {
                dtype,
                m,
                n,
                k,
                x_stride,
            };
            let value = |r: &mut crate::splitmix::SplitMix64| dtype.round((r.unit() - 0.5) as f32);
            let x: Vec<f32> = (0..(m - 1) * x_stride + k)
                .map(|_| value(&mut rng))
                .collect();
            let w: Vec<f32> = (0..n * k).map(|_| value(&mut rng)).collect();
            let whole = product_by_pieces(dtype, &shape, usize::MAX, &x, &w);
            assert_eq!(pieces(&shape, usize::MAX).unwrap().len(), 1);
            let parts = product_by_pieces(dtype, &shape, limit, &x, &w);
            assert!(
                parts.iter().all(|v| !v.is_nan()),
                "{shape} limit {limit}: unwritten"
            );
            assert_eq!(
                whole.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                parts.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{shape} limit {limit}"
            );
            split += usize::from(pieces(&shape, limit).unwrap().len() > 1);
        }
        // Most cases were really cut, by rows and by columns.
        assert!(split > 200, "{split}");
        let by_columns = pieces(
            &GemmShape {
                dtype: Dtype::F16,
                m: 3,
                n: 40,
                k: 2,
                x_stride: 2,
            },
            50,
        )
        .unwrap();
        assert!(by_columns.iter().any(|p| p.col0 > 0), "{by_columns:?}");
        assert!(by_columns
            .iter()
            .all(|p| p.shape.n % 16 == 0 || p.col0 + p.shape.n == 40));
    }

    #[test]
    fn v2_ffn_products_split_into_row_bands_below_2_31() {
        let p = crate::pow::params::Params::v2();
        let (dim, hidden, seq) = (p.dim_usize(), p.ffn_hidden(), p.seq_len_usize());
        let w1 = |batch: usize| GemmShape {
            dtype: Dtype::F16,
            m: batch * seq,
            n: hidden,
            k: dim,
            x_stride: dim,
        };
        // Up to 170 nonces the output spans fewer than 2^31 elements: one call.
        assert!(170 * seq * hidden < MAX_SPAN && 171 * seq * hidden >= MAX_SPAN);
        assert_eq!(pieces(&w1(170), MAX_SPAN).unwrap().len(), 1);
        // From 171 nonces on, bands of 43,690 rows (170.7 nonces), whole rows each.
        for batch in [171, 342, 512] {
            let shape = w1(batch);
            let bands = pieces(&shape, MAX_SPAN).unwrap();
            assert_eq!(bands.len(), (batch * seq).div_ceil(43_690), "batch {batch}");
            let mut next = 0;
            for b in &bands {
                assert_eq!((b.row0, b.col0, b.shape.n), (next, 0, hidden));
                let (x, w, dst) = b.spans();
                assert!(x < MAX_SPAN && w < MAX_SPAN && dst < MAX_SPAN, "{b:?}");
                next += b.shape.m;
            }
            assert_eq!(next, batch * seq);
        }
        // w2 reads the FFN's widest input: its x spans hidden values a row.
        let w2 = GemmShape {
            dtype: Dtype::F16,
            m: 342 * seq,
            n: dim,
            k: hidden,
            x_stride: hidden,
        };
        let bands = pieces(&w2, MAX_SPAN).unwrap();
        assert_eq!(bands.len(), 3);
        assert!(bands.iter().all(|b| b.spans().0 < MAX_SPAN));
        // A weight that alone spans 2^31 elements is cut by its rows, in multiples of 16.
        let huge = GemmShape {
            dtype: Dtype::Bf16,
            m: 4,
            n: 1 << 17,
            k: 1 << 14,
            x_stride: 1 << 14,
        };
        let bands = pieces(&huge, MAX_SPAN).unwrap();
        assert!(bands.len() >= 2);
        assert!(bands
            .iter()
            .all(|b| b.shape.n % 16 == 0 && b.spans().1 < MAX_SPAN));
    }

    #[test]
    fn alignments() {
        assert_eq!(alignment(0), 256);
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0080), 128);
        assert_eq!(alignment(0x7f00_0000_0002), 2);
        assert_eq!(alignment(0x7f00_0000_0001), 1);
    }

    #[test]
    fn missing_library_is_an_error() {
        if CudaLibrary::CublasLt.is_present() {
            eprintln!("skipped: libcublasLt is present on this machine");
            return;
        }
        let err = ensure_library().unwrap_err();
        assert!(matches!(
            err,
            GemmError::Unavailable(CudaUnavailable::LibraryMissing(CudaLibrary::CublasLt))
        ));
        let text = err.to_string();
        assert!(text.contains("libcublasLt.so.13"), "{text}");
    }

    /// The decoded values of a device buffer of the dtype.
    fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
        match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            Dtype::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
        }
    }

    /// Position of a 16-bit float on the number line, in units in the last place.
    fn ordinal16(dtype: Dtype, v: f32) -> i32 {
        let bits = match dtype {
            Dtype::F16 => half::f16::from_f32(v).to_bits(),
            _ => half::bf16::from_f32(v).to_bits(),
        };
        let magnitude = i32::from(bits & 0x7FFF);
        if bits & 0x8000 != 0 {
            -magnitude
        } else {
            magnitude
        }
    }

    /// One product on the GPU against an f64 reference. `offset` elements shift `x`'s start
    /// (an address less aligned than the allocator's). Positions of `x` outside the matrix
    /// and `dst` before the call hold NaN: reading the former or leaving any of the latter
    /// unwritten shows up.
    fn check(
        gemm: &Gemm,
        rng: &mut crate::splitmix::SplitMix64,
        dtype: Dtype,
        (m, n, k, x_stride, offset): (usize, usize, usize, usize, usize),
    ) {
        let stream = gemm.stream();
        let shape = GemmShape {
            dtype,
            m,
            n,
            k,
            x_stride,
        };
        // f32: full-precision values (a TF32 product would miss 1e-5 by far). f16, bf16:
        // multiples of 1/64 in [-1, 1], exact in both; their products are multiples of 2^-12
        // and every sum here (|sum| <= 1792) is exact in f32, so the only rounding is the
        // final one to the dtype.
        let mut value = || match dtype {
            Dtype::F32 => (rng.unit() * 2.0 - 1.0) as f32,
            _ => ((rng.next_u64() % 129) as i32 - 64) as f32 / 64.0,
        };
        let mut x = vec![f32::NAN; offset + (m - 1) * x_stride + k];
        for i in 0..m {
            for l in 0..k {
                x[offset + i * x_stride + l] = value();
            }
        }
        let w: Vec<f32> = (0..n * k).map(|_| value()).collect();

        let x_dev = stream.clone_htod(&encode(dtype, &x)).unwrap();
        let w_dev = stream.clone_htod(&encode(dtype, &w)).unwrap();
        let mut dst_dev = stream
            .clone_htod(&encode(dtype, &vec![f32::NAN; m * n]))
            .unwrap();
        let elem = element_bytes(dtype) as u64;
        let mut results = Vec::new();
        // Twice: the second call runs the cached plan.
        for _ in 0..2 {
            {
                let (xp, _x_sync) = x_dev.device_ptr(stream);
                let (wp, _w_sync) = w_dev.device_ptr(stream);
                let (dp, _dst_sync) =
                    cudarc::driver::DevicePtrMut::device_ptr_mut(&mut dst_dev, stream);
                // SAFETY: the buffers were sized above for this shape and offset, are
                // distinct, live on this stream, and outlive the call (read back below).
                unsafe { gemm.linear(shape, dp, xp + offset as u64 * elem, wp) }
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            results.push(decode(dtype, &stream.clone_dtoh(&dst_dev).unwrap()));
        }
        assert_eq!(
            results[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            results[1].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{shape}: the cached plan gave other bits"
        );
        let got = &results[0];
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k)
                    .map(|l| f64::from(x[offset + i * x_stride + l]) * f64::from(w[j * k + l]));
                let sum: f64 = terms.clone().sum();
                let magnitude: f64 = terms.map(f64::abs).sum();
                let g = got[i * n + j];
                assert!(g.is_finite(), "{shape} offset {offset}: dst[{i},{j}] = {g}");
                match dtype {
                    Dtype::F32 => {
                        let err = (f64::from(g) - sum).abs();
                        assert!(
                            err <= 1e-5 * magnitude + 1e-30,
                            "{shape} offset {offset}: dst[{i},{j}] = {g}, reference {sum}"
                        );
                    }
                    _ => {
                        let want = round_f64_via_f32(sum, dtype);
                        let ulps = (ordinal16(dtype, g) - ordinal16(dtype, want)).abs();
                        assert!(
                            ulps <= 1,
                            "{shape} offset {offset}: dst[{i},{j}] = {g}, reference {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn linear_matches_a_reference_on_the_gpu() {
        if let Err(why) = cuda_available() {
            eprintln!("skipped: {why}");
            return;
        }
        let ctx = CudaContext::new(0).unwrap();
        let stream = ctx.new_stream().unwrap();
        let gemm = Gemm::new(stream).unwrap();
        let cases = [
            (1, 1, 1, 1, 0),
            (3, 5, 7, 7, 0),
            (17, 33, 65, 65, 0),
            // The last layer's query rows: one row per nonce out of [batch, seq, dim].
            (64, 28, 1792, 1792 * 4, 0),
            // Rows not 16-byte multiples, starting one element past an aligned address.
            (3, 5, 7, 9, 1),
        ];
        let mut rng = crate::splitmix::SplitMix64(7);
        for dtype in Dtype::ALL {
            for case in cases {
                check(&gemm, &mut rng, dtype, case);
            }
        }
        // An empty product does nothing, whatever the pointers.
        let empty = GemmShape {
            dtype: Dtype::F16,
            m: 0,
            n: 8,
            k: 8,
            x_stride: 8,
        };
        // SAFETY: m is 0: nothing is read or written.
        unsafe { gemm.linear(empty, 0, 0, 0) }.unwrap();
        // k = 0 is refused before any pointer is used.
        // SAFETY: refused by validation before cuBLASLt sees the pointers.
        let err = unsafe {
            gemm.linear(
                GemmShape {
                    m: 1,
                    k: 0,
                    ..empty
                },
                0,
                0,
                0,
            )
        };
        assert!(matches!(err, Err(GemmError::Shape { .. })));
        eprintln!("{gemm:?}");
    }
}
