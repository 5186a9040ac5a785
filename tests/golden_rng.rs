//! The numpy-exact random streams against tests/golden/rng.json (numpy 2.4's outputs), plus
//! property tests of the bit generator and of the parallel fill.

use llama_pow::pow::rng::{self, Generator, ParallelPlan, Pcg64};
use llama_pow::pow::seeds;
use proptest::prelude::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn golden_text() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/rng.json");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn cases(text: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(text).expect("rng.json parses");
    v["cases"].as_array().expect("cases").clone()
}

/// The number tokens of the `nth` array stored under `key`, read from the JSON text itself
/// so that Rust's correctly rounded `parse` sees the exact digits Python wrote.
fn raw_numbers(text: &str, key: &str, nth: usize) -> Vec<String> {
    let quoted = format!("\"{key}\"");
    let at = text
        .match_indices(&quoted)
        .nth(nth)
        .unwrap_or_else(|| panic!("{key} #{nth} missing"))
        .0;
    let open = at + text[at..].find('[').expect("array");
    let close = open + text[open..].find(']').expect("array end");
    text[open + 1..close]
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_str().expect("decimal string").parse().expect("u64"))
        .collect()
}

fn i64s(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("integer"))
        .collect()
}

fn case_generator(case: &Value) -> Generator {
    seeds::seeded(
        case["seed_string"].as_str().unwrap(),
        case["num_hashes"].as_u64().unwrap() as usize,
    )
}

fn case_entropy(case: &Value) -> Vec<u32> {
    seeds::entropy(
        case["seed_string"].as_str().unwrap(),
        case["num_hashes"].as_u64().unwrap() as usize,
    )
}

#[test]
fn golden_entropy_and_seed_sequence() {
    let text = golden_text();
    for case in cases(&text) {
        let entropy = case_entropy(&case);
        let want: Vec<u32> = case["entropy_u32"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(entropy, want, "{}", case["seed_string"]);
        assert_eq!(
            rng::seed_sequence_state_u64(&entropy, 4),
            u64s(&case["seedseq_state_u64"]),
            "{}",
            case["seed_string"]
        );
    }
}

#[test]
fn golden_pcg64_raw() {
    let text = golden_text();
    for case in cases(&text) {
        let mut g = Pcg64::from_entropy(&case_entropy(&case));
        let got: Vec<u64> = (0..8).map(|_| g.next_u64()).collect();
        assert_eq!(
            got,
            u64s(&case["pcg64_first_raw_u64"]),
            "{}",
            case["seed_string"]
        );
    }
}

#[test]
fn golden_standard_normal_first_2000() {
    let text = golden_text();
    for (i, case) in cases(&text).iter().enumerate() {
        let want: Vec<f64> = raw_numbers(&text, "standard_normal_first_2000", i)
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(want.len(), 2000);
        let mut g = case_generator(case);
        for (k, w) in want.iter().enumerate() {
            let v = g.standard_normal();
            assert_eq!(
                v.to_bits(),
                w.to_bits(),
                "{} sample {k}",
                case["seed_string"]
            );
        }
    }
}

#[test]
fn golden_standard_normal_1e6_hash() {
    let text = golden_text();
    for case in cases(&text) {
        let mut g = case_generator(&case);
        let v = g.standard_normal_vec(1_000_000);
        let mut h = Sha256::new();
        for x in &v {
            h.update(x.to_le_bytes());
        }
        assert_eq!(
            hex::encode(h.finalize()),
            case["standard_normal_1e6_sha256_f64le"].as_str().unwrap(),
            "{}",
            case["seed_string"]
        );
        // The same values from the parallel fill.
        let mut p = vec![0u64; v.len()];
        rng::fill_standard_normal_parallel(&case_entropy(&case), &mut p, f64::to_bits);
        assert!(p.iter().zip(&v).all(|(a, b)| *a == b.to_bits()));
    }
}

#[test]
fn golden_normal_as_f32() {
    let text = golden_text();
    for (i, case) in cases(&text).iter().enumerate() {
        let want: Vec<f32> = raw_numbers(&text, "normal_0_0.02_first_1000_as_f32", i)
            .iter()
            .map(|s| s.parse::<f64>().unwrap() as f32)
            .collect();
        assert_eq!(want.len(), 1000);
        let mut g = case_generator(case);
        let got: Vec<f32> = (0..1000).map(|_| g.normal(0.0, 0.02) as f32).collect();
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{}",
            case["seed_string"]
        );
        let mut p = vec![0.0f32; 1000];
        rng::fill_normal_parallel(&case_entropy(case), 0.0, 0.02, &mut p, |x| x as f32);
        assert_eq!(
            p.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}

#[test]
fn golden_permutations() {
    let text = golden_text();
    for case in cases(&text) {
        let name = &case["seed_string"];
        assert_eq!(
            case_generator(&case).permutation(10),
            i64s(&case["permutation_10"]),
            "{name}"
        );
        let p = case_generator(&case).permutation(8196);
        assert_eq!(
            p[..64],
            i64s(&case["permutation_8196_first_64"])[..],
            "{name}"
        );
        let mut h = Sha256::new();
        for x in &p {
            h.update(x.to_le_bytes());
        }
        assert_eq!(
            hex::encode(h.finalize()),
            case["permutation_8196_sha256_i64le"].as_str().unwrap(),
            "{name}"
        );
    }
}

fn sequential_normals(entropy: &[u32], n: usize, loc: f64, scale: f64) -> Vec<u64> {
    let mut g = Generator::from_entropy(entropy);
    (0..n).map(|_| g.normal(loc, scale).to_bits()).collect()
}

fn parallel_normals(
    entropy: &[u32],
    n: usize,
    loc: f64,
    scale: f64,
    plan: Option<ParallelPlan>,
) -> Vec<u64> {
    let mut out = vec![0u64; n];
    match plan {
        None => rng::fill_normal_parallel(entropy, loc, scale, &mut out, f64::to_bits),
        Some(plan) => rng::fill_normal_parallel_with(
            Pcg64::from_entropy(entropy),
            loc,
            scale,
            &mut out,
            &f64::to_bits,
            plan,
        ),
    }
    out
}

#[test]
fn parallel_fill_equals_sequential_at_edge_sizes() {
    let entropy = seeds::entropy("parallel", 4);
    let plan = ParallelPlan::default();
    for n in [
        0,
        1,
        2,
        3,
        plan.chunks - 1,
        plan.chunks + 1,
        plan.sequential_below,
        plan.sequential_below + 1,
        plan.sequential_below * 3 + 7,
        plan.chunk_draws as usize * plan.chunks - 1,
        plan.chunk_draws as usize * plan.chunks + 1,
        plan.chunk_draws as usize * plan.chunks * 3 + 12_345,
    ] {
        assert_eq!(
            parallel_normals(&entropy, n, 0.0, 0.02, None),
            sequential_normals(&entropy, n, 0.0, 0.02),
            "n = {n}"
        );
    }
}

#[test]
fn parallel_fill_with_forced_small_chunks() {
    // Tiny chunks and probes force thousands of merges, merges that drop leading samples of
    // the later chunk, and failed merges (probes of 0 or 1 boundaries miss hundreds of times
    // per run) that end rounds early.
    let entropy = seeds::entropy("forced", 1);
    for n in [1usize, 2, 7, 64, 999, 10_000, 200_000] {
        let want = sequential_normals(&entropy, n, 1.5, 0.25);
        for (chunks, chunk_draws, probe) in [
            (2, 1, 0),
            (2, 2, 1),
            (3, 5, 1),
            (7, 13, 2),
            (16, 100, 4),
            (4, 1000, 64),
            (9, 4096, 4096),
        ] {
            let plan = ParallelPlan {
                chunks,
                chunk_draws,
                probe,
                sequential_below: 0,
            };
            assert_eq!(
                parallel_normals(&entropy, n, 1.5, 0.25, Some(plan)),
                want,
                "n {n} plan {plan:?}"
            );
        }
    }
}

#[test]
fn rare_paths_cross_chunk_boundaries() {
    // Chunks of 1..40 draws put chunk starts at every offset of the stream, so many of them
    // fall inside a multi-draw (wedge or tail) sample and need a non-trivial merge.
    let entropy = seeds::entropy("straddle", 2);
    let n = 50_000;
    let want = sequential_normals(&entropy, n, 0.0, 1.0);
    for chunk_draws in 1..40u64 {
        let plan = ParallelPlan {
            chunks: 6,
            chunk_draws,
            probe: 8,
            sequential_below: 0,
        };
        assert_eq!(
            parallel_normals(&entropy, n, 0.0, 1.0, Some(plan)),
            want,
            "chunk {chunk_draws}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn advance_composes(seed in any::<u32>(), a in 0u64..5000, b in 0u64..5000) {
        let base = Pcg64::from_entropy(&[seed]);
        let mut one = base.clone();
        one.advance(u128::from(a));
        one.advance(u128::from(b));
        let mut two = base.clone();
        two.advance(u128::from(a + b));
        let mut stepped = base.clone();
        for _ in 0..a + b {
            stepped.next_u64();
        }
        prop_assert_eq!(one.raw_state(), two.raw_state());
        prop_assert_eq!(one.raw_state(), stepped.raw_state());
        prop_assert_eq!(one.next_u64(), stepped.next_u64());
    }

    #[test]
    fn advance_composes_for_huge_jumps(seed in any::<u32>(), a in any::<u128>(), b in any::<u128>()) {
        let base = Pcg64::from_entropy(&[seed, 1]);
        let mut one = base.clone();
        one.advance(a);
        one.advance(b);
        let mut two = base;
        two.advance(a.wrapping_add(b));
        prop_assert_eq!(one.raw_state(), two.raw_state());
    }

    #[test]
    fn parallel_fill_equals_sequential(
        entropy in proptest::collection::vec(any::<u32>(), 0..12),
        n in 0usize..150_000,
        chunks in 2usize..12,
        chunk_draws in 1u64..3000,
        probe in 0usize..64,
    ) {
        let want = sequential_normals(&entropy, n, 0.0, 0.02);
        let plan = ParallelPlan { chunks, chunk_draws, probe, sequential_below: 0 };
        prop_assert_eq!(parallel_normals(&entropy, n, 0.0, 0.02, Some(plan)), want.clone());
        prop_assert_eq!(parallel_normals(&entropy, n, 0.0, 0.02, None), want);
    }

    #[test]
    fn permutation_is_a_permutation(seed in any::<u32>(), n in 0usize..5000) {
        let mut g = Generator::from_entropy(&[seed]);
        let mut p = g.permutation(n);
        p.sort_unstable();
        prop_assert_eq!(p, (0..n as i64).collect::<Vec<_>>());
    }
}
