//! Binomial probabilities accurate to the last few bits, for the validators' fraud test:
//! P(X >= k) for X ~ Binomial(n, p), the one-sided test a validator runs on the number of
//! nonces whose recomputed distance misses r_target.
//!
//! Each probability mass is computed on its own with Loader's saddle-point form
//! ("Fast and accurate computation of binomial probabilities", 2000): the log of the mass is
//! a sum of small, well-conditioned terms (Stirling's error and the deviance `bd0`) instead
//! of a difference of log-factorials, which for n = 10^6 would lose ten digits to
//! cancellation. A tail is the sum of its masses from the far end inward until they no
//! longer change it, taken from whichever side of the mean keeps the sum free of
//! cancellation: P(X >= k) directly when k is above the mean, 1 - P(X <= k - 1) otherwise.
//! Masses below the smallest f64 underflow to zero, as they do in scipy.

/// `ln(n!) - ln(sqrt(2 pi n) (n / e)^n)` for n = 0..=15, to 17 digits (computed in
/// 60-digit decimal arithmetic; n = 0 is 0 by convention).
const STIRLING_ERROR: [f64; 16] = [
    0.0,
    0.081_061_466_795_327_26,
    0.041_340_695_955_409_3,
    0.027_677_925_684_998_34,
    0.020_790_672_103_765_093,
    0.016_644_691_189_821_193,
    0.013_876_128_823_070_748,
    0.011_896_709_945_891_77,
    0.010_411_265_261_972_096,
    0.009_255_462_182_712_733,
    0.008_330_563_433_362_87,
    0.007_573_675_487_951_841,
    0.006_942_840_107_209_53,
    0.006_408_994_188_004_207,
    0.005_951_370_112_758_847_5,
    0.005_554_733_551_962_801,
];

/// ln(2 pi).
const LN_2PI: f64 = 1.837_877_066_409_345_5;

/// Stirling's error `ln(n!) - ln(sqrt(2 pi n) (n / e)^n)`: a table up to 15, then its
/// asymptotic series (1/12n - 1/360n^3 + 1/1260n^5 - ...), with as many terms as n needs for
/// full double precision.
fn stirling_error(n: f64) -> f64 {
    const S0: f64 = 1.0 / 12.0;
    const S1: f64 = 1.0 / 360.0;
    const S2: f64 = 1.0 / 1260.0;
    const S3: f64 = 1.0 / 1680.0;
    const S4: f64 = 1.0 / 1188.0;
    if n <= 15.0 {
        return STIRLING_ERROR[n as usize];
    }
    let nn = n * n;
    if n > 500.0 {
        (S0 - S1 / nn) / n
    } else if n > 80.0 {
        (S0 - (S1 - S2 / nn) / nn) / n
    } else if n > 35.0 {
        (S0 - (S1 - (S2 - S3 / nn) / nn) / nn) / n
    } else {
        (S0 - (S1 - (S2 - (S3 - S4 / nn) / nn) / nn) / nn) / n
    }
}

/// The deviance term `x ln(x / m) + m - x`, without the cancellation of that formula when x
/// is near m (a series in ((x - m) / (x + m))^2 there).
fn bd0(x: f64, m: f64) -> f64 {
    if (x - m).abs() < 0.1 * (x + m) {
        let mut v = (x - m) / (x + m);
        let mut s = (x - m) * v;
        let mut ej = 2.0 * x * v;
        v *= v;
        for j in 1..1000 {
            ej *= v;
            let next = s + ej / f64::from(2 * j + 1);
            if next == s {
                return next;
            }
            s = next;
        }
        return s;
    }
    x * (x / m).ln() + m - x
}

/// P(X = x) for X ~ Binomial(n, p), q = 1 - p given separately so that it keeps its digits.
fn mass(x: u64, n: u64, p: f64, q: f64) -> f64 {
    if x > n {
        return 0.0;
    }
    if p == 0.0 {
        return if x == 0 { 1.0 } else { 0.0 };
    }
    if q == 0.0 {
        return if x == n { 1.0 } else { 0.0 };
    }
    let (xf, nf) = (x as f64, n as f64);
    if x == 0 {
        let lc = if p < 0.1 {
            -bd0(nf, nf * q) - nf * p
        } else {
            nf * q.ln()
        };
        return lc.exp();
    }
    if x == n {
        let lc = if q < 0.1 {
            -bd0(nf, nf * p) - nf * q
        } else {
            nf * p.ln()
        };
        return lc.exp();
    }
    let lc = stirling_error(nf)
        - stirling_error(xf)
        - stirling_error(nf - xf)
        - bd0(xf, nf * p)
        - bd0(nf - xf, nf * q);
    // ln(2 pi x (n - x) / n), written so that x = n - 1 keeps its digits.
    let lf = LN_2PI + xf.ln() + (-xf / nf).ln_1p();
    (lc - 0.5 * lf).exp()
}

/// Sum the masses at `xs` in order, stopping once they no longer change the sum. `xs` must
/// walk away from the mode, so that the masses only fall off: once one is zero or too small
/// to count, so are all the rest.
fn tail_sum(xs: impl Iterator<Item = u64>, n: u64, p: f64, q: f64) -> f64 {
    let mut sum = 0.0f64;
    for x in xs {
        let m = mass(x, n, p, q);
        if m == 0.0 || m < sum * 1e-17 {
            break;
        }
        sum += m;
    }
    sum
}

/// P(X >= k) for X ~ Binomial(n, p): scipy's `binomtest(k, n, p, alternative='greater')`
/// p-value (1 for k = 0, 0 for k > n).
pub fn sf_at_least(k: u64, n: u64, p: f64) -> f64 {
    assert!((0.0..=1.0).contains(&p), "a probability, got {p}");
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    let q = 1.0 - p;
    // The mode is floor((n + 1) p), within one of the mean n p: above the mean, k is at or
    // past the mode and the masses fall off from k up; at or below it, k - 1 is below the
    // mode and they fall off from k - 1 down.
    if k as f64 > n as f64 * p {
        tail_sum(k..=n, n, p, q)
    } else {
        let lower = tail_sum((0..k).rev(), n, p, q);
        (1.0 - lower).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stirling_error_table_and_series_meet() {
        // Past the table the series agrees with exact values (60-digit decimal arithmetic on
        // ln n!) to within 2e-16, for every number of terms it takes: what matters, since it
        // enters the log of a mass as an absolute term.
        for (n, exact) in [
            (16.0, 0.005_207_655_919_609_640_4),
            (40.0, 0.002_083_289_938_302_421_8),
            (100.0, 0.000_833_330_555_634_914_7),
            (1000.0, 8.333_333_055_555_635e-5),
        ] {
            let s = stirling_error(n);
            assert!((s - exact).abs() < 2e-16, "{n}: {s} vs {exact}");
        }
        for n in [1.0, 5.0, 15.0, 16.0, 40.0, 100.0, 1000.0, 1e6] {
            let s = stirling_error(n);
            assert!(s > 0.0 && s <= 0.0811, "{n}: {s}");
            // 1 / 12n is the leading term.
            assert!((s * 12.0 * n - 1.0).abs() < 0.08, "{n}: {s}");
        }
    }

    #[test]
    fn masses_sum_to_one_and_match_small_cases_exactly() {
        // n = 10, p = 0.3: P(X = 3) = 120 * 0.027 * 0.0823543.
        let want = 120.0 * 0.3f64.powi(3) * 0.7f64.powi(7);
        assert!((mass(3, 10, 0.3, 0.7) / want - 1.0).abs() < 1e-14);
        for (n, p) in [
            (1u64, 0.5),
            (37, 5e-4),
            (1000, 5e-4),
            (100_000, 5e-4),
            (20, 0.9),
        ] {
            let total: f64 = (0..=n).map(|x| mass(x, n, p, 1.0 - p)).sum();
            assert!((total - 1.0).abs() < 1e-13, "n {n} p {p}: {total}");
        }
    }

    #[test]
    fn edges() {
        assert_eq!(sf_at_least(0, 0, 5e-4), 1.0);
        assert_eq!(sf_at_least(0, 100, 5e-4), 1.0);
        assert_eq!(sf_at_least(101, 100, 5e-4), 0.0);
        // k = n = 1: p itself.
        assert!((sf_at_least(1, 1, 5e-4) / 5e-4 - 1.0).abs() < 1e-15);
        // k = n: p^n, down to underflow.
        let want = 5e-4f64.powi(50);
        assert!((sf_at_least(50, 50, 5e-4) / want - 1.0).abs() < 1e-13);
        assert_eq!(sf_at_least(1000, 1000, 5e-4), 0.0);
        // One trial too many than there are.
        assert_eq!(sf_at_least(2, 1, 0.5), 0.0);
    }
}
