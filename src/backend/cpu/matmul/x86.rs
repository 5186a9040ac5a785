//! The x86-64 vector kernels of the register-blocked driver ([`super::blocked`]).
//!
//! - [`Fma512`]: AVX-512F, a block of 12 rows x 32 columns in 24 zmm accumulators; f16
//!   weights widen with `vcvtph2ps`, bf16 with a 16-bit shift, both exact.
//! - [`Fma256`]: AVX2 + FMA + F16C, 6 rows x 16 columns in 12 ymm accumulators,
//!   each 32-column panel in two halves.
//! - [`Dp512Bf16`]: AVX512_BF16, 12 rows x 32 columns, one `vdpbf16ps` per 16 outputs per
//!   input pair.
//!
//! The FMA kernels compute, lane by lane, exactly what [`super::blocked::ScalarFma`] states:
//! `acc = fma(x[l], w[l], acc)` in increasing `l` from +0. `vdpbf16ps` is, per Intel's SDM,
//! for each lane `acc = fma(x[2p + 1], w[2p + 1], acc)` then `acc = fma(x[2p], w[2p], acc)`
//! (the odd element first), with bf16 inputs and f32 accumulator denormals read as zero and
//! denormal results flushed to zero; the products of two bf16 values are exact in f32, so
//! each step is one rounding. `tests` check the instruction against that statement.

use super::blocked::{Bf16Bits, BlockKernel, BlockOut, F16Bits};
use super::pack::PANEL;
use crate::pow::dtype::Dtype;
use std::arch::x86_64::*;
use std::marker::PhantomData;

/// Rows of the AVX-512 blocks: 24 accumulators + 2 weight vectors of the 32 registers.
pub(super) const MR512: usize = 12;
/// Rows of the AVX2 blocks: 12 accumulators + 2 weight vectors + 1 broadcast of 16.
pub(super) const MR256: usize = 6;

/// The lanes `0..n` of a 16-lane mask.
#[inline(always)]
fn lanes16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// f32 lanes rounded to f16 and back: `vcvtps2ph` rounds to nearest even (f16 subnormals
/// and overflow to infinity included), exactly [`crate::pow::dtype::RoundF16`].
#[inline]
#[target_feature(enable = "avx512f")]
fn round_f16_x16(v: __m512) -> __m512 {
    _mm512_cvtph_ps(_mm512_cvtps_ph::<
        { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
    >(v))
}

/// f32 lanes rounded to bf16 and back: [`crate::pow::dtype::RoundBf16`]'s integer
/// arithmetic (ties to even on bit 16, NaNs kept quiet), lane by lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn round_bf16_x16(v: __m512) -> __m512 {
    let bits = _mm512_castps_si512(v);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let upper = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let rounded = _mm512_and_si512(
        _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd),
        upper,
    );
    let magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFF_FFFF));
    let nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7F80_0000));
    let quiet = _mm512_and_si512(_mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000)), upper);
    _mm512_castsi512_ps(_mm512_mask_blend_epi32(nan, rounded, quiet))
}

/// `v` rounded to `dtype` (none: as it is).
#[inline]
#[target_feature(enable = "avx512f")]
fn round_x16(v: __m512, dtype: Option<Dtype>) -> __m512 {
    match dtype {
        Some(Dtype::F16) => round_f16_x16(v),
        Some(Dtype::Bf16) => round_bf16_x16(v),
        Some(Dtype::F32) | None => v,
    }
}

/// The 8-lane forms of [`round_f16_x16`] and [`round_bf16_x16`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn round_x8(v: __m256, dtype: Option<Dtype>) -> __m256 {
    match dtype {
        Some(Dtype::F16) => _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)),
        Some(Dtype::Bf16) => {
            let bits = _mm256_castps_si256(v);
            let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
            let upper = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
            let rounded = _mm256_and_si256(
                _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd),
                upper,
            );
            let magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFF_FFFF));
            let nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F80_0000));
            let quiet =
                _mm256_and_si256(_mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000)), upper);
            _mm256_castsi256_ps(_mm256_blendv_epi8(rounded, quiet, nan))
        }
        Some(Dtype::F32) | None => v,
    }
}

/// Round 16 values of `src` to `dtype` and store the first `n` at `dst`, with AVX-512F
/// (for the AMX driver's copy out of its staging block).
///
/// # Safety
/// `n <= 16` values at `dst` are writable; the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_rounded_x16(src: &[f32; 16], dst: *mut f32, n: usize, dtype: Dtype) {
    // SAFETY: 16 readable values at src; masked-off lanes of dst are not written.
    unsafe {
        let v = round_x16(_mm512_loadu_ps(src.as_ptr()), Some(dtype));
        _mm512_mask_storeu_ps(dst, lanes16(n), v);
    }
}

/// A stored weight type widened to 16 f32 lanes.
pub(super) trait Widen16: Copy + Sync {
    /// Load 16 consecutive stored values as f32.
    ///
    /// # Safety
    /// 16 values at `p` are readable; the CPU has AVX-512F.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Widen16 for f32 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees 16 readable values.
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl Widen16 for F16Bits {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const F16Bits) -> __m512 {
        // SAFETY: 16 readable 2-byte values are 32 readable bytes. vcvtph2ps is exact.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

impl Widen16 for Bf16Bits {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Bf16Bits) -> __m512 {
        // SAFETY: 32 readable bytes. A bf16 pattern is the upper half of its f32 pattern.
        unsafe {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
    }
}

/// AVX-512F FMA kernel over [`super::pack::Layout::Rows`] panels.
pub(super) struct Fma512<E>(PhantomData<E>);

impl<E> Fma512<E> {
    pub const fn new() -> Self {
        Fma512(PhantomData)
    }
}

impl<E: Widen16> BlockKernel for Fma512<E> {
    type B = E;
    const MR: usize = MR512;
    const K_STEP: usize = 1;
    /// 128 KB of a panel per stretch, streamed from L2 by every block: measured against 16,
    /// 32 and 64 KB on the forward's shapes, the longer stretches won (fewer reloads of the
    /// accumulators per block; the weights' stream from L2 keeps up).
    const KC_STEPS: usize = 128 * 1024 / (PANEL * std::mem::size_of::<E>());

    fn pack_a(lo: f32, _hi: f32) -> u32 {
        lo.to_bits()
    }

    unsafe fn block(&self, steps: usize, a: *const u32, b: *const E, out: &BlockOut) {
        // SAFETY: the caller upholds the contract of `BlockKernel::block`, which is this
        // function's, and checked that the CPU has AVX-512F.
        unsafe { fma512_block(steps, a.cast(), b, out) }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn fma512_block<E: Widen16>(steps: usize, a: *const f32, b: *const E, out: &BlockOut) {
    let (c, ldc, rows, cols) = (out.c, out.ldc, out.rows, out.cols);
    let m0 = lanes16(cols);
    let m1 = lanes16(cols.saturating_sub(16));
    let mut acc = [[_mm512_setzero_ps(); 2]; MR512];
    // Every loop over the rows runs to MR512 (a constant), so the accumulators stay in
    // registers; rows past `rows` are skipped by a test, not by a shorter loop.
    if out.accumulate {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            if r < rows {
                // SAFETY: row r < rows holds `cols` valid values; masked-off lanes are
                // neither read nor able to fault.
                unsafe {
                    let row = c.add(r * ldc);
                    acc_r[0] = _mm512_maskz_loadu_ps(m0, row);
                    acc_r[1] = _mm512_maskz_loadu_ps(m1, row.add(16));
                }
            }
        }
    }
    for s in 0..steps {
        // SAFETY: step s < steps: 32 weight values at b + 32 s, MR512 words at a + MR512 s.
        unsafe {
            let b0 = E::load16(b.add(s * PANEL));
            let b1 = E::load16(b.add(s * PANEL + 16));
            let a_s = a.add(s * MR512);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a_s.add(r));
                acc_r[0] = _mm512_fmadd_ps(av, b0, acc_r[0]);
                acc_r[1] = _mm512_fmadd_ps(av, b1, acc_r[1]);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        if r < rows {
            // SAFETY: row r < rows holds `cols` writable values; masked-off lanes are not
            // written.
            unsafe {
                let row = c.add(r * ldc);
                _mm512_mask_storeu_ps(row, m0, round_x16(acc_r[0], out.round));
                _mm512_mask_storeu_ps(row.add(16), m1, round_x16(acc_r[1], out.round));
            }
        }
    }
}

/// A stored weight type widened to 8 f32 lanes.
pub(super) trait Widen8: Copy + Sync {
    /// Load 8 consecutive stored values as f32.
    ///
    /// # Safety
    /// 8 values at `p` are readable; the CPU has AVX2, FMA and F16C.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Widen8 for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable values.
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Widen8 for F16Bits {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const F16Bits) -> __m256 {
        // SAFETY: 16 readable bytes. vcvtph2ps is exact.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

impl Widen8 for Bf16Bits {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Bf16Bits) -> __m256 {
        // SAFETY: 16 readable bytes. A bf16 pattern is the upper half of its f32 pattern.
        unsafe {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
    }
}

/// AVX2 FMA kernel over [`super::pack::Layout::Rows`] panels.
pub(super) struct Fma256<E>(PhantomData<E>);

impl<E> Fma256<E> {
    pub const fn new() -> Self {
        Fma256(PhantomData)
    }
}

impl<E: Widen8> BlockKernel for Fma256<E> {
    type B = E;
    const MR: usize = MR256;
    const K_STEP: usize = 1;
    const KC_STEPS: usize = 128 * 1024 / (PANEL * std::mem::size_of::<E>());

    fn pack_a(lo: f32, _hi: f32) -> u32 {
        lo.to_bits()
    }

    unsafe fn block(&self, steps: usize, a: *const u32, b: *const E, out: &BlockOut) {
        // The panel in two halves of 16 columns; the second re-reads the block's inputs
        // from L1.
        for half in 0..2 {
            let first = half * 16;
            if first >= out.cols {
                break;
            }
            // SAFETY: the caller upholds the contract of `BlockKernel::block`; the half
            // starts inside the block's columns (first < cols) and keeps within them, and
            // its weights are the same rows of the panel at an offset of `first`.
            unsafe {
                let half_out = BlockOut {
                    c: out.c.add(first),
                    cols: out.cols - first,
                    ..*out
                };
                fma256_half(steps, a.cast(), b.add(first), &half_out)
            }
        }
    }
}

/// The 8-lane masks of lanes `0..n` and `8..n` (AVX's masked moves take a sign per lane).
#[inline(always)]
fn lanes8x2(n: usize) -> [__m256i; 2] {
    let lane = |i: usize| if i < n { -1i32 } else { 0 };
    // SAFETY: plain register construction; AVX is enabled in the only caller.
    unsafe {
        [
            _mm256_setr_epi32(
                lane(0),
                lane(1),
                lane(2),
                lane(3),
                lane(4),
                lane(5),
                lane(6),
                lane(7),
            ),
            _mm256_setr_epi32(
                lane(8),
                lane(9),
                lane(10),
                lane(11),
                lane(12),
                lane(13),
                lane(14),
                lane(15),
            ),
        ]
    }
}

/// 6 rows by 16 columns (`cols` of them valid, at most 16 used) of a panel.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fma256_half<E: Widen8>(steps: usize, a: *const f32, b: *const E, out: &BlockOut) {
    let (c, ldc, rows, cols) = (out.c, out.ldc, out.rows, out.cols);
    let full = cols >= 16;
    let [m0, m1] = lanes8x2(cols);
    let mut acc = [[_mm256_setzero_ps(); 2]; MR256];
    if out.accumulate {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            if r < rows {
                // SAFETY: row r < rows holds `cols` valid values; masked-off lanes of a
                // masked load are not read and cannot fault.
                unsafe {
                    let row = c.add(r * ldc);
                    if full {
                        acc_r[0] = _mm256_loadu_ps(row);
                        acc_r[1] = _mm256_loadu_ps(row.add(8));
                    } else {
                        acc_r[0] = _mm256_maskload_ps(row, m0);
                        acc_r[1] = _mm256_maskload_ps(row.add(8), m1);
                    }
                }
            }
        }
    }
    for s in 0..steps {
        // SAFETY: step s < steps: 16 weight values at b + 32 s (the half's columns of the
        // panel row), MR256 words at a + MR256 s.
        unsafe {
            let b0 = E::load8(b.add(s * PANEL));
            let b1 = E::load8(b.add(s * PANEL + 8));
            let a_s = a.add(s * MR256);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a_s.add(r));
                acc_r[0] = _mm256_fmadd_ps(av, b0, acc_r[0]);
                acc_r[1] = _mm256_fmadd_ps(av, b1, acc_r[1]);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        if r < rows {
            // SAFETY: row r < rows holds `cols` writable values (16 when `full`); masked-off
            // lanes are not written.
            unsafe {
                let row = c.add(r * ldc);
                let (v0, v1) = (round_x8(acc_r[0], out.round), round_x8(acc_r[1], out.round));
                if full {
                    _mm256_storeu_ps(row, v0);
                    _mm256_storeu_ps(row.add(8), v1);
                } else {
                    _mm256_maskstore_ps(row, m0, v0);
                    _mm256_maskstore_ps(row.add(8), m1, v1);
                }
            }
        }
    }
}

/// AVX512_BF16 kernel over [`super::pack::Layout::Pairs`] panels of bf16 patterns.
pub(super) struct Dp512Bf16;

impl BlockKernel for Dp512Bf16 {
    type B = u16;
    const MR: usize = MR512;
    const K_STEP: usize = 2;
    /// 1024 pairs (2048 inputs): 128 KB of a panel, streamed from L2 (see `Fma512`).
    const KC_STEPS: usize = 1024;

    fn pack_a(lo: f32, hi: f32) -> u32 {
        // Exact: both are bf16 values (their low 16 bits are zero).
        (lo.to_bits() >> 16) | (hi.to_bits() & 0xFFFF_0000)
    }

    unsafe fn block(&self, steps: usize, a: *const u32, b: *const u16, out: &BlockOut) {
        // SAFETY: the caller upholds the contract of `BlockKernel::block`, which is this
        // function's, and checked that the CPU has AVX-512F and AVX512_BF16.
        unsafe { dp512_block(steps, a, b, out) }
    }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dp512_block(steps: usize, a: *const u32, b: *const u16, out: &BlockOut) {
    let (c, ldc, rows, cols) = (out.c, out.ldc, out.rows, out.cols);
    let m0 = lanes16(cols);
    let m1 = lanes16(cols.saturating_sub(16));
    let mut acc = [[_mm512_setzero_ps(); 2]; MR512];
    if out.accumulate {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            if r < rows {
                // SAFETY: as in `fma512_block`.
                unsafe {
                    let row = c.add(r * ldc);
                    acc_r[0] = _mm512_maskz_loadu_ps(m0, row);
                    acc_r[1] = _mm512_maskz_loadu_ps(m1, row.add(16));
                }
            }
        }
    }
    for s in 0..steps {
        // SAFETY: pair step s < steps: the panel's 32 column pairs (64 values) at b + 64 s,
        // MR512 packed pairs at a + MR512 s. __m512i and __m512bh are both 64 bytes of
        // plain lanes, so reinterpreting one as the other is a no-op.
        unsafe {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(s * 2 * PANEL).cast()));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(b.add(s * 2 * PANEL + PANEL).cast()));
            let a_s = a.add(s * MR512);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a_s.add(r) as i32));
                acc_r[0] = _mm512_dpbf16_ps(acc_r[0], b0, av);
                acc_r[1] = _mm512_dpbf16_ps(acc_r[1], b1, av);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        if r < rows {
            // SAFETY: as in `fma512_block`.
            unsafe {
                let row = c.add(r * ldc);
                _mm512_mask_storeu_ps(row, m0, round_x16(acc_r[0], out.round));
                _mm512_mask_storeu_ps(row.add(16), m1, round_x16(acc_r[1], out.round));
            }
        }
    }
}

/// `vdpbf16ps` on one lane, through the instruction itself (for the tests of its model).
///
/// # Safety
/// The CPU has AVX-512F and AVX512_BF16.
#[cfg(test)]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn vdpbf16ps_lanes(acc: [f32; 16], a: [u32; 16], b: [u32; 16]) -> [f32; 16] {
    let mut out = [0f32; 16];
    // SAFETY: every pointer is a local array of exactly 64 bytes; the transmutes
    // reinterpret 64-byte vectors of plain lanes.
    unsafe {
        let r = _mm512_dpbf16_ps(
            _mm512_loadu_ps(acc.as_ptr()),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(a.as_ptr().cast())),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b.as_ptr().cast())),
        );
        _mm512_storeu_ps(out.as_mut_ptr(), r);
    }
    out
}

/// [`round_x8`] on an array, for the tests.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[cfg(test)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn round_x8_lanes(v: [f32; 8], dtype: Dtype) -> [f32; 8] {
    let mut out = [0f32; 8];
    // SAFETY: both pointers are local arrays of 8 values.
    unsafe {
        _mm256_storeu_ps(
            out.as_mut_ptr(),
            round_x8(_mm256_loadu_ps(v.as_ptr()), Some(dtype)),
        )
    };
    out
}
