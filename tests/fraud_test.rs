//! The validators' fraud test against scipy: `probability_honest(k, n)` must equal
//! `scipy.stats.binomtest(k, n, 5e-4, alternative='greater').pvalue` to 1e-12 relative, for n
//! up to 10^6, k = 0 and k = n, tails down to about 1e-300, and values that underflow to 0
//! (tests/fixtures/binomtest.json, written by scripts/binomtest_fixtures.py).
//!
//! The fixture also carries each value computed exactly (60-digit decimal arithmetic). scipy
//! itself is off by more than 1e-12 in two far-tail cases (n = 100, k = 94 and 95: 8e-11 and
//! 3e-8 relative); there ours must be within 1e-12 of the exact value and closer to it than
//! scipy is. Everywhere else ours is within 1e-12 of both.

use llama_pow::pow::validation::{probability_honest, PROBABILITY_MISMATCH};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/binomtest.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("the fixture")).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b
}

#[test]
fn probability_honest_equals_scipy() {
    let f = fixture();
    assert_eq!(f["p"].as_f64(), Some(PROBABILITY_MISMATCH));
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() > 150, "{}", cases.len());
    let (mut worst_scipy, mut worst_exact) = (0f64, 0f64);
    let (mut zeros, mut tiny, mut ones, mut scipy_off) = (0, 0, 0, 0);
    for c in cases {
        let (k, n) = (c["k"].as_u64().unwrap(), c["n"].as_u64().unwrap());
        let scipy = c["pvalue"].as_f64().unwrap();
        let exact = c["exact"].as_f64().unwrap();
        let got = probability_honest(k, n);
        if scipy == 0.0 {
            // Underflow: scipy's 0 is a probability below the smallest f64; ours may keep a
            // few subnormal bits of it, never more.
            assert_eq!(exact, 0.0, "k {k} n {n}");
            assert!(got < 1e-307, "k {k} n {n}: {got:e}, scipy 0");
            zeros += 1;
            continue;
        }
        let to_exact = rel(got, exact);
        assert!(
            to_exact <= 1e-12,
            "k {k} n {n}: {got:e} vs exact {exact:e} ({to_exact:e})"
        );
        worst_exact = worst_exact.max(to_exact);
        let to_scipy = rel(got, scipy);
        if rel(scipy, exact) <= 1e-12 {
            assert!(
                to_scipy <= 1e-12,
                "k {k} n {n}: {got:e} vs scipy {scipy:e} ({to_scipy:e})"
            );
            worst_scipy = worst_scipy.max(to_scipy);
        } else {
            assert!(to_exact < rel(scipy, exact), "k {k} n {n}");
            scipy_off += 1;
        }
        tiny += usize::from(scipy < 1e-290);
        ones += usize::from(scipy == 1.0);
    }
    // The fixture reaches the corners the fraud test must get right.
    assert!(
        zeros >= 10 && tiny >= 5 && ones >= 10,
        "{zeros} {tiny} {ones}"
    );
    assert!(scipy_off <= 2, "{scipy_off}");
    assert!(cases.iter().any(|c| c["k"] == c["n"] && c["pvalue"] != 0.0));
    assert!(cases.iter().any(|c| c["n"] == 1_000_000));
    eprintln!(
        "{} cases: worst relative difference {worst_scipy:.2e} to scipy, {worst_exact:.2e} to \
         the exact values ({zeros} underflows; {scipy_off} where scipy itself is off)",
        cases.len()
    );
}
