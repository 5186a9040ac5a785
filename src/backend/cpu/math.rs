//! `exp` for f32 that the compiler can vectorise, for the forward pass's SiLU.
//!
//! `f32::exp` is a call into the C library per value, which keeps the SiLU loop scalar (and
//! was a tenth of the CPU forward once the products were fast). [`exp_f32`] is plain f64
//! arithmetic (conversions, multiplies, fused multiply-adds, integer shifts and adds on the
//! bit patterns), so inside a [`super::simd::wide_fn!`] it runs 8 or 16 lanes at a time,
//! and, being IEEE f64 operations in a fixed order, it gives the same bits on every machine.
//!
//! Method: `exp(x) = 2^n * exp(r)` with `n = round(x / ln 2)` and `r = x - n ln 2` (two FMAs
//! with ln 2 split in two parts, so `r` is exact to about 2^-60), `|r| <= ln 2 / 2`;
//! `exp(r)` by its Taylor series to degree 12 (truncation below 2^-48 relative), evaluated
//! in f64 by Estrin's scheme; `2^n` built in the exponent field; one rounding to f32 at the
//! end. The f64 result is within about 2^-46 of `exp(x)`, so the f32 result is the correctly
//! rounded one except when `exp(x)` lies within that of a rounding boundary (about one input
//! in a million); the tests measure how often it differs from the C library's `expf`.

/// 1 / ln 2.
const INV_LN2: f64 = std::f64::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO, LN2_HI with its last 20 bits clear: `n * LN2_HI` is exact for
/// |n| < 2^20.
const LN2_HI: f64 = f64::from_bits(std::f64::consts::LN_2.to_bits() & !0xF_FFFF);
const LN2_LO: f64 = std::f64::consts::LN_2 - LN2_HI;
/// 1.5 * 2^52: adding it rounds a value below 2^51 to an integer (ties to even), which
/// then sits in the low bits of the sum's pattern.
const ROUND_SHIFT: f64 = 6_755_399_441_055_744.0;
/// Beyond this, exp overflows (and below its negative, underflows) f32 by far; clamping
/// there keeps 2^n inside the f64 exponent range.
const CLAMP: f64 = 200.0;

/// 1 / i! for i = 0 to 12.
const TAYLOR: [f64; 13] = {
    let mut c = [0f64; 13];
    let mut fact = 1f64;
    let mut i = 0;
    while i < 13 {
        if i > 0 {
            fact *= i as f64;
        }
        c[i] = 1.0 / fact;
        i += 1;
    }
    c
};

/// `e^x`, rounded to f32 (see the module docs). NaN gives NaN; overflow infinity;
/// underflow zero or an f32 denormal.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // A NaN goes through as a NaN (clamp keeps it, and every operation after propagates it).
    let xd = f64::from(x);
    let clamped = xd.clamp(-CLAMP, CLAMP);
    let shifted = clamped * INV_LN2 + ROUND_SHIFT;
    let n = shifted - ROUND_SHIFT;
    let r = (-n).mul_add(LN2_HI, clamped);
    let r = (-n).mul_add(LN2_LO, r);
    // sum_i TAYLOR[i] r^i by Estrin's scheme: pairs, then pairs of pairs, so that the
    // chain of dependent operations is 5 long instead of Horner's 12.
    let c = &TAYLOR;
    let r2 = r * r;
    let r4 = r2 * r2;
    let r8 = r4 * r4;
    let q0 = c[1].mul_add(r, c[0]);
    let q1 = c[3].mul_add(r, c[2]);
    let q2 = c[5].mul_add(r, c[4]);
    let q3 = c[7].mul_add(r, c[6]);
    let q4 = c[9].mul_add(r, c[8]);
    let q5 = c[11].mul_add(r, c[10]);
    let s0 = q1.mul_add(r2, q0);
    let s1 = q3.mul_add(r2, q2);
    let s2 = q5.mul_add(r2, q4);
    let t0 = s1.mul_add(r4, s0);
    let t1 = c[12].mul_add(r4, s2);
    let p = t1.mul_add(r8, t0);
    // n sits in the low bits of `shifted` (two's complement within the mantissa); moved to
    // the exponent field and biased, it is 2^n for |n| <= 1022.
    let scale = f64::from_bits((shifted.to_bits() << 52).wrapping_add(1023 << 52));
    (p * scale) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_what_they_say() {
        assert_eq!(LN2_HI + LN2_LO, std::f64::consts::LN_2);
        assert_eq!(LN2_HI.to_bits() & 0xF_FFFF, 0);
        assert_eq!(ROUND_SHIFT, 1.5 * 2f64.powi(52));
        assert_eq!(TAYLOR[0], 1.0);
        assert_eq!(TAYLOR[1], 1.0);
        assert_eq!(TAYLOR[2], 0.5);
        assert!((TAYLOR[12] - 1.0 / 479_001_600.0).abs() < 1e-25);
    }

    #[test]
    fn special_values() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-0.0), 1.0);
        assert_eq!(exp_f32(1.0), std::f32::consts::E);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(-f32::INFINITY), 0.0);
        assert_eq!(exp_f32(-104.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        // Denormal results: e^-100 = 3.72e-44, a few units of 2^-149.
        let d = exp_f32(-100.0);
        assert!(d > 0.0 && d.is_subnormal());
        assert_eq!(d, (-100f64).exp() as f32);
    }

    /// Against exp in f64 rounded once to f32 (correct to within f64's own error), and
    /// against the C library's expf, over every 61st f32 in [-30, 30] (the SiLU's working
    /// range: beyond it the SiLU is x or 0 to every digit of f32) and a sweep of the rest.
    #[test]
    fn agrees_with_the_reference_exponentials() {
        let (mut total, mut vs_f64, mut vs_expf, mut bad) = (0u64, 0u64, 0u64, 0u64);
        let mut check = |x: f32| {
            let got = exp_f32(x);
            let f64_ref = (x as f64).exp() as f32;
            let libm = x.exp();
            total += 1;
            vs_f64 += u64::from(got != f64_ref);
            vs_expf += u64::from(got != libm);
            // Never more than one unit in the last place from either.
            let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
            if ulps(got, f64_ref) > 1 || ulps(got, libm) > 1 {
                bad += 1;
            }
        };
        let (lo, hi) = (-30f32, 30f32);
        let mut b = lo.to_bits();
        while f32::from_bits(b) < 0.0 {
            check(f32::from_bits(b));
            b -= 61;
        }
        let mut b = 0f32.to_bits();
        while f32::from_bits(b) <= hi {
            check(f32::from_bits(b));
            b += 61;
        }
        for i in 0..2_000_000 {
            let x = -104.0 + 193.0 * i as f32 / 2_000_000.0;
            check(x);
        }
        eprintln!(
            "exp_f32: {total} inputs; differs from f64 exp rounded to f32 in {vs_f64}, from \
             the C library's expf in {vs_expf}"
        );
        assert_eq!(bad, 0);
        assert!(vs_f64 * 100_000 <= total, "{vs_f64} of {total}");
        assert!(vs_expf * 10_000 <= total, "{vs_expf} of {total}");
    }

    /// The forward's SiLU-times against the readable one: the same rounding points, so
    /// equal except where the two exponentials differ in the last bit and that survives
    /// the division and the rounding to the dtype, and then by one unit of the dtype.
    #[test]
    fn vectorised_silu_mul_equals_the_readable_one_but_rarely() {
        use crate::pow::dtype::{Dtype, RoundBf16, RoundF16, RoundF32, Rounding};
        fn run<R: Rounding>(a: &[f32], b: &[f32]) -> (usize, f32) {
            let (mut want, mut got) = (a.to_vec(), a.to_vec());
            super::super::silu_mul::<R>(&mut want, b);
            super::super::silu_mul_vectorised::<R>(&mut got, b);
            let mut worst = 0f32;
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .inspect(|(g, w)| worst = worst.max((*g - *w).abs() / w.abs().max(1e-30)))
                .count();
            (differ, worst)
        }
        let mut rng = crate::splitmix::SplitMix64(3);
        let n = 1 << 21;
        for dt in Dtype::ALL {
            let a: Vec<f32> = (0..n)
                .map(|_| dt.round(((rng.unit() - 0.5) * 24.0) as f32))
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|_| dt.round(((rng.unit() - 0.5) * 6.0) as f32))
                .collect();
            let (differ, worst) = match dt {
                Dtype::F32 => run::<RoundF32>(&a, &b),
                Dtype::F16 => run::<RoundF16>(&a, &b),
                Dtype::Bf16 => run::<RoundBf16>(&a, &b),
            };
            eprintln!("{dt}: {differ} of {n} differ, largest relative difference {worst:e}");
            assert!(differ * 1000 <= n, "{dt}: {differ} of {n}");
            let unit = match dt {
                Dtype::F32 => 4.0 * f32::EPSILON,
                Dtype::F16 => 2f32.powi(-10),
                Dtype::Bf16 => 2f32.powi(-7),
            };
            assert!(worst <= unit, "{dt}: {worst:e}");
        }
    }
}
