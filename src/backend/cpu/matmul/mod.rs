//! The forward pass's matrix products: `dst = round_T(x . w^T)`, the weights held in the
//! model dtype T, the inputs exact in T, f32 accumulation and one rounding of each output
//! (the reference's rounding points; see the parent module).
//!
//! # Paths
//!
//! | [`Kernel`] | f32 | f16 | bf16 | weights |
//! | --- | --- | --- | --- | --- |
//! | `Amx` | - | TDPFP16PS | TDPBF16PS | pairs |
//! | `Avx512Bf16` | - | - | `vdpbf16ps` | pairs |
//! | `Avx512` | FMA | `vcvtph2ps` + FMA | shift + FMA | rows |
//! | `Avx2` (with F16C) | FMA | F16C + FMA | shift + FMA | rows |
//! | `Scalar` | `mul_add` | `mul_add` | `mul_add` | rows |
//!
//! The fastest path the CPU has is chosen at run time from CPUID ([`Features`]); AMX also
//! needs the OS to grant the tile state (asked for once; a refusal only means no AMX). The
//! environment variable [`MATMUL_ENV`] caps the choice (`amx`, `avx512`, `avx2`, `scalar`,
//! or `auto`), so that every path a machine has can be run and compared there.
//!
//! # What each path computes, exactly
//!
//! - FMA paths (`Scalar`, `Avx2`, `Avx512`, whatever the dtype): each output is
//!   `acc = fma(x[l], w[l], acc)` for `l = 0, 1, ..., k - 1` in order from `acc = +0`. They
//!   agree bit for bit with each other (`ScalarFma` in `blocked.rs` is the readable statement).
//! - `Avx512Bf16`: per input pair, the odd input first, then the even one, each an FMA,
//!   with bf16 denormals read as zero and denormal results flushed (Intel's SDM; checked
//!   against the instruction bit for bit in the tests).
//! - `Amx` f16: per the SDM, the same sequence as the FMA paths (f32 denormal results
//!   flushed to zero, which a sum of f16 products never produces).
//! - `Amx` bf16: per the SDM, within each instruction (32 inputs) the even and the odd
//!   inputs are summed separately from zero, the two sums added, and that added to the
//!   accumulator. Intel notes that the hardware may order these operations differently.
//!
//! Orders differ between paths, so outputs may differ by the last bit of f32 before the
//! rounding to T, and now and then by one unit of T after it; the reference (PyTorch's
//! oneDNN kernels) fixes no order either.
//!
//! # Why our own kernels and not a library loaded at run time
//!
//! Measured on paper before choosing, for these products (m = batch * seq_len rows, in the
//! thousands; n and k from 1024 to 49152; T = f16 by default, bf16, f32):
//!
//! - The ceiling is the instruction, not the code around it: per core and cycle, AMX's
//!   TMUL does 16 x 16 x 32 multiply-adds per 16 cycles (1024 FLOP), `vdpbf16ps` on two
//!   512-bit pipes 128 FLOP, AVX-512 FMA 64, AVX2 FMA 32. These shapes are large and
//!   regular, so a plain blocked kernel (tiles held for the whole of k, weights packed once
//!   at model build time) reaches most of it; what a library adds beyond that (prefetch
//!   scheduling, small and odd shapes) is worth little here.
//! - oneDNN (what PyTorch itself calls): it has the best AMX kernels, but it is a C++
//!   library with a descriptor / primitive / stream C API (dozens of entry points to bind
//!   through dlopen, a JIT-compiled primitive per shape to create and cache). PyTorch's
//!   wheels link it statically, so hosts rarely have a `libdnnl.so` to load: the embedded
//!   CPU backend would still need its own kernels everywhere else. Its accumulation order
//!   is unspecified and changes between versions and ISAs.
//! - MKL (`cblas_gemm_bf16bf16f32`, `cblas_gemm_f16f16f32`): proprietary, hundreds of MB,
//!   tuned for Intel CPUs (slow paths elsewhere), absent on most hosts. OpenBLAS: a bf16
//!   GEMM (`sbgemm`, AVX512_BF16 and AMX) but no f16 GEMM on x86, and f16 is the default
//!   dtype.
//! - Either would return f32 that we round afterwards (one more pass over the output), and
//!   neither states its summation order, so the tests could only compare within a bound.
//!
//! So: our own kernels, which exist on every machine, fuse the rounding into the product,
//! state their order (checked bit for bit in the tests) and, for AMX, run through a
//! software model of the tile instructions where the CPU has none. No library is loaded.

mod amx;
#[cfg(test)]
mod amx_model;
mod blocked;
pub mod features;
pub mod pack;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use features::Features;
pub use pack::{Layout, PackError, PackedWeight, Storage};

use crate::pow::dtype::{Dtype, Rounding};
use blocked::{Bf16Bits, F16Bits, ScalarFma};
use std::sync::OnceLock;

/// Environment variable capping the product path: `auto` (default), `amx`, `avx512`,
/// `avx2` or `scalar`; the fastest path at or below it that the CPU has is used.
pub const MATMUL_ENV: &str = "LLAMA_POW_CPU_MATMUL";

/// The most capable family a selection may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cap {
    Scalar,
    Avx2,
    Avx512,
    /// No cap: AMX where present.
    Amx,
}

/// A bad value of [`MATMUL_ENV`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{MATMUL_ENV}={0:?}: expected auto, amx, avx512, avx2 or scalar")]
pub struct BadCap(pub String);

impl Cap {
    /// Parse a cap (`auto` is no cap).
    pub fn parse(s: &str) -> Result<Cap, BadCap> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" | "amx" => Ok(Cap::Amx),
            "avx512" => Ok(Cap::Avx512),
            "avx2" => Ok(Cap::Avx2),
            "scalar" => Ok(Cap::Scalar),
            _ => Err(BadCap(s.to_owned())),
        }
    }

    /// The cap of [`MATMUL_ENV`] (none when unset).
    pub fn from_env() -> Result<Cap, BadCap> {
        match std::env::var(MATMUL_ENV) {
            Ok(v) => Cap::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(Cap::Amx),
            Err(std::env::VarError::NotUnicode(v)) => Err(BadCap(v.to_string_lossy().into_owned())),
        }
    }
}

/// A product path (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    Scalar,
    Avx2,
    Avx512,
    Avx512Bf16,
    Amx,
    /// The AMX driver on the software model of the tile instructions (tests only).
    #[cfg(test)]
    AmxModel,
    /// The `Avx512Bf16` driver (pair steps) on a software model of `vdpbf16ps` (tests
    /// only), so that it is tested where the instruction is absent.
    #[cfg(test)]
    Avx512Bf16Model,
}

impl Kernel {
    /// Every path the selection may choose, fastest first.
    pub const ALL: [Kernel; 5] = [
        Kernel::Amx,
        Kernel::Avx512Bf16,
        Kernel::Avx512,
        Kernel::Avx2,
        Kernel::Scalar,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
            Kernel::Avx512Bf16 => "avx512-bf16",
            Kernel::Amx => "amx",
            #[cfg(test)]
            Kernel::AmxModel => "amx-model",
            #[cfg(test)]
            Kernel::Avx512Bf16Model => "avx512-bf16-model",
        }
    }

    /// The family a cap counts this path in.
    pub fn family(self) -> Cap {
        match self {
            Kernel::Scalar => Cap::Scalar,
            Kernel::Avx2 => Cap::Avx2,
            Kernel::Avx512 | Kernel::Avx512Bf16 => Cap::Avx512,
            Kernel::Amx => Cap::Amx,
            #[cfg(test)]
            Kernel::AmxModel => Cap::Amx,
            #[cfg(test)]
            Kernel::Avx512Bf16Model => Cap::Avx512,
        }
    }

    /// How this path wants the weights packed.
    pub fn layout(self) -> Layout {
        match self {
            Kernel::Scalar | Kernel::Avx2 | Kernel::Avx512 => Layout::Rows,
            Kernel::Avx512Bf16 | Kernel::Amx => Layout::Pairs,
            #[cfg(test)]
            Kernel::AmxModel | Kernel::Avx512Bf16Model => Layout::Pairs,
        }
    }

    /// Whether this path computes `dtype` products on a CPU with `f`.
    pub fn runs(self, dtype: Dtype, f: &Features) -> bool {
        match self {
            Kernel::Scalar => true,
            // One kernel for every dtype, so F16C (present on every AVX2 CPU) is required.
            Kernel::Avx2 => f.avx2_fma && f.f16c,
            Kernel::Avx512 => f.avx512f,
            Kernel::Avx512Bf16 => dtype == Dtype::Bf16 && f.avx512_bf16,
            Kernel::Amx => match dtype {
                Dtype::F16 => f.amx_fp16,
                Dtype::Bf16 => f.amx_bf16,
                Dtype::F32 => false,
            },
            #[cfg(test)]
            Kernel::AmxModel => dtype != Dtype::F32,
            #[cfg(test)]
            Kernel::Avx512Bf16Model => dtype == Dtype::Bf16,
        }
    }

    /// The fastest path for `dtype` on a CPU with `f`, within `cap`.
    pub fn best(dtype: Dtype, f: &Features, cap: Cap) -> Kernel {
        Kernel::ALL
            .into_iter()
            .find(|k| k.family() <= cap && k.runs(dtype, f))
            .unwrap_or(Kernel::Scalar)
    }

    /// The path for `dtype` on this machine, within the cap of [`MATMUL_ENV`]. AMX is taken
    /// only once this machine's tiles have computed a product exactly as stated
    /// ([`amx_proven`]); otherwise the best path below it.
    pub fn select(dtype: Dtype) -> Result<Kernel, BadCap> {
        let f = Features::host();
        let best = Kernel::best(dtype, &f, Cap::from_env()?);
        if best == Kernel::Amx && !amx_proven(dtype) {
            return Ok(Kernel::best(dtype, &f, Cap::Avx512));
        }
        Ok(best)
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether this machine's AMX path computes `dtype` products as stated, checked once per
/// dtype on first use. The tile instructions are written against Intel's SDM and tested
/// through a software model of it; where they execute for the first time on a machine that
/// disagrees (a microcode, an emulator, a reading of the SDM that was wrong), they must not
/// compute proofs: the warning says so and the path below AMX is used instead.
fn amx_proven(dtype: Dtype) -> bool {
    static F16: OnceLock<bool> = OnceLock::new();
    static BF16: OnceLock<bool> = OnceLock::new();
    let cell = match dtype {
        Dtype::F16 => &F16,
        Dtype::Bf16 => &BF16,
        Dtype::F32 => return false,
    };
    *cell.get_or_init(|| match exact_product_agrees(Kernel::Amx, dtype) {
        Ok(()) => true,
        Err(why) => {
            tracing::warn!(
                "the AMX {dtype} products of this CPU disagree with their statement ({why}): \
                 computing with the next fastest path instead"
            );
            false
        }
    })
}

/// Odd sizes (not multiples of any tile or panel), so that every edge of a path runs.
const EXACT_M: usize = 19;
const EXACT_N: usize = 37;
const EXACT_K: usize = 70;

/// A product whose every partial sum is exact in f32 (multiples of 1/8, under 2^10 in
/// magnitude), so that any order of summation gives the same bits: x `[m, k]`, w `[n, k]`,
/// and each output as the product rounds it to `dtype`.
fn exact_case(dtype: Dtype) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let x: Vec<f32> = (0..EXACT_M * EXACT_K)
        .map(|i| (((i / EXACT_K) * 7 + (i % EXACT_K) * 3) % 9) as f32 * 0.25 - 1.0)
        .collect();
    let w: Vec<f32> = (0..EXACT_N * EXACT_K)
        .map(|i| (((i / EXACT_K) * 5 + i % EXACT_K) % 7) as f32 * 0.5 - 1.5)
        .collect();
    let want = (0..EXACT_M * EXACT_N)
        .map(|o| {
            let (r, c) = (o / EXACT_N, o % EXACT_N);
            let sum: f64 = (0..EXACT_K)
                .map(|l| f64::from(x[r * EXACT_K + l]) * f64::from(w[c * EXACT_K + l]))
                .sum();
            dtype.round(sum as f32)
        })
        .collect();
    (x, w, want)
}

/// Run [`exact_case`] through `kernel`: every output must be the exact one.
fn exact_product_agrees(kernel: Kernel, dtype: Dtype) -> Result<(), String> {
    use crate::pow::dtype::{RoundBf16, RoundF16, RoundF32};
    let (x, w, want) = exact_case(dtype);
    let packed = PackedWeight::pack(&w, EXACT_N, EXACT_K, dtype, kernel.layout())
        .map_err(|e| e.to_string())?;
    let mut got = vec![f32::NAN; EXACT_M * EXACT_N];
    match dtype {
        Dtype::F32 => linear::<RoundF32>(kernel, &mut got, &x, EXACT_M, EXACT_K, &packed),
        Dtype::F16 => linear::<RoundF16>(kernel, &mut got, &x, EXACT_M, EXACT_K, &packed),
        Dtype::Bf16 => linear::<RoundBf16>(kernel, &mut got, &x, EXACT_M, EXACT_K, &packed),
    }
    first_difference(&got, &want)
}

/// The first output that is not the one wanted, as words.
fn first_difference(got: &[f32], want: &[f32]) -> Result<(), String> {
    match got
        .iter()
        .zip(want)
        .position(|(g, w)| g.to_bits() != w.to_bits())
    {
        None => Ok(()),
        Some(i) => Err(format!(
            "output {} of a {EXACT_M} x {EXACT_N} x {EXACT_K} product is {} where it is \
             exactly {}",
            i, got[i], want[i]
        )),
    }
}

/// Reinterpret 16-bit patterns as the marker type of their dtype.
fn as_bits<T>(d: &[u16]) -> &[T] {
    assert_eq!(std::mem::size_of::<T>(), 2);
    assert_eq!(std::mem::align_of::<T>(), 2);
    // SAFETY: T is F16Bits or Bf16Bits, `repr(transparent)` wrappers of u16 (size and
    // alignment checked above), so every u16 is a valid T and the slice covers the same
    // memory for the same lifetime.
    unsafe { std::slice::from_raw_parts(d.as_ptr().cast::<T>(), d.len()) }
}

/// The checks every product makes before it runs unsafe code; `m` and `n` are not zero.
fn check<R: Rounding>(
    kernel: Kernel,
    dst: &[f32],
    x: &[f32],
    m: usize,
    x_row_stride: usize,
    w: &PackedWeight,
) {
    let (n, k) = (w.n(), w.k());
    assert!(dst.len() >= m * n, "linear: destination too short");
    assert!(
        x_row_stride >= k && x.len() >= (m - 1) * x_row_stride + k,
        "linear: input too short"
    );
    assert_eq!(w.dtype(), R::DTYPE, "linear: weight dtype");
    assert_eq!(w.layout(), kernel.layout(), "linear: weight layout");
    assert!(
        kernel.runs(w.dtype(), &Features::host()),
        "linear: this CPU cannot run the {kernel} path for {}",
        w.dtype()
    );
}

/// Whether [`linear_silu_mul`] fuses its two products on the path `kernel` for `dtype`
/// weights of depth `k`: a register-blocked kernel, on this architecture, with `k` within
/// one of its stretches.
pub fn fuses_silu_mul(kernel: Kernel, dtype: Dtype, k: usize) -> bool {
    if k == 0 || !kernel.runs(dtype, &Features::host()) {
        return false;
    }
    match (kernel, dtype) {
        (Kernel::Scalar, Dtype::F32) => blocked::gated_fits::<ScalarFma<f32>>(k),
        (Kernel::Scalar, Dtype::F16) => blocked::gated_fits::<ScalarFma<F16Bits>>(k),
        (Kernel::Scalar, Dtype::Bf16) => blocked::gated_fits::<ScalarFma<Bf16Bits>>(k),
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx2, Dtype::F32) => blocked::gated_fits::<x86::Fma256<f32>>(k),
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx2, Dtype::F16) => blocked::gated_fits::<x86::Fma256<F16Bits>>(k),
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx2, Dtype::Bf16) => blocked::gated_fits::<x86::Fma256<Bf16Bits>>(k),
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512, Dtype::F32) => blocked::gated_fits::<x86::Fma512<f32>>(k),
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512, Dtype::F16) => blocked::gated_fits::<x86::Fma512<F16Bits>>(k),
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512, Dtype::Bf16) => blocked::gated_fits::<x86::Fma512<Bf16Bits>>(k),
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512Bf16, Dtype::Bf16) => blocked::gated_fits::<x86::Dp512Bf16>(k),
        #[cfg(test)]
        (Kernel::Avx512Bf16Model, Dtype::Bf16) => blocked::gated_fits::<blocked::DpBf16Model>(k),
        // The AMX driver keeps C in tiles per 32 x 32 block: not fused (yet).
        _ => false,
    }
}

/// The FFN's `round_T(round_T(silu(round_T(x . gate^T))) * round_T(x . up^T))` in one pass,
/// block by block (no intermediate product reaches memory), when the path can: a
/// register-blocked kernel, and `k` within one of its stretches. Returns `false`, having
/// done nothing, otherwise; the caller then runs two [`linear`] and
/// the SiLU-times pass of the forward, which give the same bits.
#[allow(clippy::too_many_arguments)]
pub fn linear_silu_mul<R: Rounding>(
    kernel: Kernel,
    dst: &mut [f32],
    x: &[f32],
    m: usize,
    x_row_stride: usize,
    gate: &PackedWeight,
    up: &PackedWeight,
) -> bool {
    let (n, k) = (gate.n(), gate.k());
    assert!(
        (up.n(), up.k(), up.dtype(), up.layout()) == (n, k, gate.dtype(), gate.layout()),
        "linear_silu_mul: the two weights differ in shape, dtype or layout"
    );
    if m == 0 || n == 0 || !fuses_silu_mul(kernel, gate.dtype(), k) {
        return false;
    }
    check::<R>(kernel, dst, x, m, x_row_stride, gate);
    let dst = &mut dst[..m * n];
    let panel_len = gate.panel_len();
    macro_rules! gated {
        ($kernel:ty, $ctor:expr, $g:expr, $u:expr) => {{
            debug_assert!(blocked::gated_fits::<$kernel>(k));
            let op = blocked::Operands {
                x,
                m,
                x_row_stride,
                k,
                w: $g,
                panel_len,
                n,
            };
            blocked::run_gated::<$kernel, R>(&$ctor, dst, op, $u);
            true
        }};
    }
    match (kernel, gate.storage(), up.storage(), gate.dtype()) {
        (Kernel::Scalar, Storage::F32(g), Storage::F32(u), _) => {
            gated!(ScalarFma<f32>, ScalarFma::<f32>::new(), g, u)
        }
        (Kernel::Scalar, Storage::Bits16(g), Storage::Bits16(u), Dtype::F16) => {
            gated!(
                ScalarFma<F16Bits>,
                ScalarFma::<F16Bits>::new(),
                as_bits(g),
                as_bits(u)
            )
        }
        (Kernel::Scalar, Storage::Bits16(g), Storage::Bits16(u), _) => {
            gated!(
                ScalarFma<Bf16Bits>,
                ScalarFma::<Bf16Bits>::new(),
                as_bits(g),
                as_bits(u)
            )
        }
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx2, Storage::F32(g), Storage::F32(u), _) => {
            gated!(x86::Fma256<f32>, x86::Fma256::<f32>::new(), g, u)
        }
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx2, Storage::Bits16(g), Storage::Bits16(u), Dtype::F16) => {
            gated!(
                x86::Fma256<F16Bits>,
                x86::Fma256::<F16Bits>::new(),
                as_bits(g),
                as_bits(u)
            )
        }
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx2, Storage::Bits16(g), Storage::Bits16(u), _) => {
            gated!(
                x86::Fma256<Bf16Bits>,
                x86::Fma256::<Bf16Bits>::new(),
                as_bits(g),
                as_bits(u)
            )
        }
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512, Storage::F32(g), Storage::F32(u), _) => {
            gated!(x86::Fma512<f32>, x86::Fma512::<f32>::new(), g, u)
        }
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512, Storage::Bits16(g), Storage::Bits16(u), Dtype::F16) => {
            gated!(
                x86::Fma512<F16Bits>,
                x86::Fma512::<F16Bits>::new(),
                as_bits(g),
                as_bits(u)
            )
        }
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512, Storage::Bits16(g), Storage::Bits16(u), _) => {
            gated!(
                x86::Fma512<Bf16Bits>,
                x86::Fma512::<Bf16Bits>::new(),
                as_bits(g),
                as_bits(u)
            )
        }
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512Bf16, Storage::Bits16(g), Storage::Bits16(u), Dtype::Bf16) => {
            gated!(x86::Dp512Bf16, x86::Dp512Bf16, g, u)
        }
        #[cfg(test)]
        (Kernel::Avx512Bf16Model, Storage::Bits16(g), Storage::Bits16(u), Dtype::Bf16) => {
            gated!(blocked::DpBf16Model, blocked::DpBf16Model, g, u)
        }
        (kernel, _, _, dtype) => unreachable!("{kernel} does not fuse {dtype} products"),
    }
}

/// `dst[i][j] = round_T(sum_l x[i][l] w[j][l])` for `i < m`, `j < n` with the path `kernel`:
/// row `i` of `x` starts at `i * x_row_stride`, `dst` is row-major `[m, n]`, `w` is the
/// packed `[n, k]` weight.
///
/// Panics when the shapes do not fit, when `w` is not packed for `kernel` or not in the
/// dtype of `R`, or when this CPU cannot run `kernel` (which would otherwise fault).
pub fn linear<R: Rounding>(
    kernel: Kernel,
    dst: &mut [f32],
    x: &[f32],
    m: usize,
    x_row_stride: usize,
    w: &PackedWeight,
) {
    let (n, k) = (w.n(), w.k());
    if m == 0 || n == 0 {
        return;
    }
    check::<R>(kernel, dst, x, m, x_row_stride, w);
    let dst = &mut dst[..m * n];
    if k == 0 {
        dst.fill(0.0);
        return;
    }
    let panel_len = w.panel_len();
    macro_rules! blocked {
        ($kernel:expr, $w:expr) => {
            blocked::run::<_, R>(
                &$kernel,
                dst,
                blocked::Operands {
                    x,
                    m,
                    x_row_stride,
                    k,
                    w: $w,
                    panel_len,
                    n,
                },
            )
        };
    }
    macro_rules! amx_ops {
        ($w:expr) => {
            amx::Operands {
                x,
                m,
                x_row_stride,
                k,
                w: $w,
                panel_len,
                n,
            }
        };
    }
    match (kernel, w.storage(), w.dtype()) {
        (Kernel::Scalar, Storage::F32(d), _) => blocked!(ScalarFma::<f32>::new(), d),
        (Kernel::Scalar, Storage::Bits16(d), Dtype::F16) => {
            blocked!(ScalarFma::<F16Bits>::new(), as_bits(d))
        }
        (Kernel::Scalar, Storage::Bits16(d), _) => {
            blocked!(ScalarFma::<Bf16Bits>::new(), as_bits(d))
        }
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx2, Storage::F32(d), _) => blocked!(x86::Fma256::<f32>::new(), d),
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx2, Storage::Bits16(d), Dtype::F16) => {
            blocked!(x86::Fma256::<F16Bits>::new(), as_bits(d))
        }
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx2, Storage::Bits16(d), _) => {
            blocked!(x86::Fma256::<Bf16Bits>::new(), as_bits(d))
        }
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512, Storage::F32(d), _) => blocked!(x86::Fma512::<f32>::new(), d),
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512, Storage::Bits16(d), Dtype::F16) => {
            blocked!(x86::Fma512::<F16Bits>::new(), as_bits(d))
        }
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512, Storage::Bits16(d), _) => {
            blocked!(x86::Fma512::<Bf16Bits>::new(), as_bits(d))
        }
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512Bf16, Storage::Bits16(d), Dtype::Bf16) => blocked!(x86::Dp512Bf16, d),
        #[cfg(target_arch = "x86_64")]
        (Kernel::Amx, Storage::Bits16(d), Dtype::F16) => {
            amx::run::<amx::AsmFp16, R>(|| amx::AsmTiles, dst, amx_ops!(d))
        }
        #[cfg(target_arch = "x86_64")]
        (Kernel::Amx, Storage::Bits16(d), Dtype::Bf16) => {
            amx::run::<amx::AsmBf16, R>(|| amx::AsmTiles, dst, amx_ops!(d))
        }
        #[cfg(test)]
        (Kernel::Avx512Bf16Model, Storage::Bits16(d), Dtype::Bf16) => {
            blocked!(blocked::DpBf16Model, d)
        }
        #[cfg(test)]
        (Kernel::AmxModel, Storage::Bits16(d), Dtype::F16) => {
            amx::run::<amx_model::TileModel<true>, R>(amx_model::TileModel::new, dst, amx_ops!(d))
        }
        #[cfg(test)]
        (Kernel::AmxModel, Storage::Bits16(d), Dtype::Bf16) => {
            amx::run::<amx_model::TileModel<false>, R>(amx_model::TileModel::new, dst, amx_ops!(d))
        }
        (kernel, _, dtype) => unreachable!("{kernel} runs {dtype}, checked above"),
    }
}
