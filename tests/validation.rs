//! Validation on every golden case, through the engine and the validation session as /validate
//! and `llama-pow validate` run it (CPU backend): batches made of the reference's own proofs
//! validate with no invalid nonce; falsified distances are counted invalid and, enough of
//! them, judged a fraud; a recomputed distance exactly at r_target is not invalid.

mod common;

use common::*;
use llama_pow::backend::cpu::CpuBackend;
use llama_pow::backend::{batch, Backend, JobSpec};
use llama_pow::engine::{Engine, EngineOptions};
use llama_pow::pow::dtype::Dtype;
use llama_pow::pow::request::parse_params;
use llama_pow::pow::validation::{ValidatedBatch, ValidationRequest, DEFAULT_FRAUD_THRESHOLD};
use llama_pow::session::lines::LineSink;
use llama_pow::session::validation::{self, Outcome};
use llama_pow::session::Shutdown;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

fn request(case: &Value, nonces: Vec<u64>, dist: Vec<f64>, r_target: f64) -> ValidationRequest {
    ValidationRequest {
        block_hash: str_of(&case["block_hash"]).into(),
        block_height: 1,
        public_key: str_of(&case["public_key"]).into(),
        node_id: 3,
        params: parse_params(&case["params"]).unwrap(),
        r_target,
        fraud_threshold: DEFAULT_FRAUD_THRESHOLD,
        nonces,
        dist,
        batch_size: Some(5),
    }
}

/// Validate on a CPU engine in `dtype`; the verdict, and every line written.
fn validate(req: &ValidationRequest, dtype: Dtype) -> (ValidatedBatch, Vec<Value>) {
    let engine = Engine::new(
        vec![Arc::new(CpuBackend::new())],
        EngineOptions {
            dtype,
            ..EngineOptions::default()
        },
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let (sink, mut rx) = LineSink::channel();
    let (_running, shutdown) = tokio::sync::watch::channel(false);
    let shutdown = Shutdown::new(shutdown);
    let outcome = rt.block_on(async {
        let o = validation::run(&engine, req, Duration::from_secs(600), &sink, &shutdown).await;
        drop(sink);
        o
    });
    let mut lines = Vec::new();
    while let Ok(l) = rx.try_recv() {
        lines.push(serde_json::from_slice(&l).unwrap());
    }
    match outcome {
        Outcome::Verdict(v) => (*v, lines),
        Outcome::Unfinished(why) => panic!("no verdict: {why}; {lines:?}"),
    }
}

fn dtype_of(case: &Value) -> Dtype {
    str_of(&case["dtype"]).parse().unwrap()
}

#[test]
fn the_references_proofs_validate_on_every_golden_case() {
    for name in MODEL_CASES {
        let case = load(&format!("{name}.json"));
        let r_target = case["r_target"].as_f64().unwrap();
        let (nonces, dist) = (u64s(&case["valid_nonces"]), f64s(&case["valid_dist"]));
        assert!(!nonces.is_empty(), "{name} has proofs");
        let req = request(&case, nonces.clone(), dist, r_target);
        let (v, lines) = validate(&req, dtype_of(&case));
        assert_eq!(v.n_invalid, 0, "{name}: {:?}", v.invalid_nonces);
        assert_eq!(v.probability_honest, 1.0);
        assert!(!v.fraud_detected);
        assert_eq!(v.nonces, nonces);
        assert_eq!((v.node_id, v.block_height), (3, 1));
        let tol = if dtype_of(&case) == Dtype::Bf16 {
            1e-4
        } else {
            1e-5
        };
        let max = v.max_abs_dist_diff.unwrap();
        assert!(max <= tol, "{name}: {max:e}");
        // A progress line per batch of 5, then the verdict.
        let progress: Vec<&Value> = lines
            .iter()
            .filter(|l| l.get("validated").is_some())
            .collect();
        assert_eq!(progress.len(), nonces.len().div_ceil(5), "{name}");
        assert_eq!(progress.last().unwrap()["validated"], nonces.len());
        assert_eq!(progress.last().unwrap()["total"], nonces.len());
        assert!(lines.last().unwrap().get("probability_honest").is_some());
        eprintln!(
            "{name}: {} proofs validated, max |dist diff| {max:.2e}",
            nonces.len()
        );
    }
}

#[test]
fn falsified_distances_are_invalid_and_enough_of_them_a_fraud() {
    for name in ["tiny_f16", "v2_shaped_f16", "gqa_scaled_rope_f32"] {
        let case = load(&format!("{name}.json"));
        let r_target = case["r_target"].as_f64().unwrap();
        let nonces = u64s(&case["nonces"]);
        let true_dist = f64s(&case["dist"]);
        let should_fail: Vec<u64> = nonces
            .iter()
            .zip(&true_dist)
            .filter(|(_, &d)| d > r_target)
            .map(|(&n, _)| n)
            .collect();
        assert!(!should_fail.is_empty(), "{name}");
        // Every nonce claimed as a proof at a distance just below r_target.
        let claimed = vec![r_target - 1e-3; nonces.len()];
        let (v, _) = validate(
            &request(&case, nonces.clone(), claimed, r_target),
            dtype_of(&case),
        );
        assert_eq!(v.invalid_nonces, should_fail, "{name}");
        assert_eq!(v.n_invalid as usize, should_fail.len());
        assert!(
            v.fraud_detected,
            "{name}: {} of {}",
            v.n_invalid,
            nonces.len()
        );
        assert!(
            v.probability_honest < 1e-6,
            "{name}: {:e}",
            v.probability_honest
        );

        // One falsified nonce among the honest proofs: counted, and for so small a batch
        // already improbable for an honest miner.
        let mut ns = u64s(&case["valid_nonces"]);
        let mut ds = f64s(&case["valid_dist"]);
        ns.push(should_fail[0]);
        ds.push(r_target - 1e-3);
        let (v, _) = validate(&request(&case, ns.clone(), ds, r_target), dtype_of(&case));
        assert_eq!(v.invalid_nonces, [should_fail[0]]);
        let want = 1.0 - (1.0 - 5e-4f64).powi(ns.len() as i32);
        assert!((v.probability_honest / want - 1.0).abs() < 1e-12);
    }
}

#[test]
fn a_distance_exactly_at_r_target_is_not_invalid() {
    let case = load("tiny_f32.json");
    let params = parse_params(&case["params"]).unwrap();
    let (bh, pk) = (str_of(&case["block_hash"]), str_of(&case["public_key"]));
    let nonce = u64s(&case["nonces"])[0];
    // This machine's own distance of the nonce becomes r_target.
    let cpu = CpuBackend::new();
    let m = cpu.build_model(bh, &params, Dtype::F32).unwrap();
    let job = JobSpec::new(bh, pk, &params, Dtype::F32, 2.0);
    let r = cpu
        .run_batch(&m, &job, batch::prepare(&job, vec![nonce]), true)
        .unwrap();
    let exact = r.distances().unwrap()[0];
    let req = request(&case, vec![nonce], vec![exact - 1e-9], exact);
    let (v, _) = validate(&req, Dtype::F32);
    assert_eq!(v.dist, [exact]);
    assert_eq!(v.n_invalid, 0, "strictly above r_target only");
    // One ulp lower and it is.
    let below = f64::from_bits(exact.to_bits() - 1);
    let req = request(&case, vec![nonce], vec![below - 1e-9], below);
    assert_eq!(validate(&req, Dtype::F32).0.n_invalid, 1);
}

#[test]
fn an_empty_batch_is_honest_at_once() {
    let case = load("tiny_f16.json");
    let r_target = case["r_target"].as_f64().unwrap();
    let (v, lines) = validate(&request(&case, vec![], vec![], r_target), Dtype::F16);
    assert_eq!(
        (v.n_invalid, v.probability_honest, v.fraud_detected),
        (0, 1.0, false)
    );
    assert_eq!(lines.len(), 1, "only the verdict: {lines:?}");
}
