//! POST /validate over real loopback sockets against the server binary: the reference's own
//! proofs validate, progress then the verdict streams, every bad request is a 400 naming its
//! field, an empty batch answers at once, validations and generations preempt each other, and
//! a client that disconnects stops its validation.

mod http_support;

use http_support::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const SECS: Duration = Duration::from_secs(1);

/// A /validate request of the golden `case`'s proofs (the reference's own distances).
fn golden_batch(case: &str) -> Value {
    let g = golden(case);
    json!({
        "block_hash": g["block_hash"],
        "block_height": 12,
        "public_key": g["public_key"],
        "node_id": 4,
        "params": g["params"],
        "r_target": g["r_target"],
        "nonces": g["valid_nonces"],
        "dist": g["valid_dist"],
        "batch_size": 8,
    })
}

/// A long validation: `n` nonces of the v2_shaped model (hundreds of nonces per second on
/// a CPU), every one claimed as a proof.
fn long_batch(n: u64) -> Value {
    let g = golden("v2_shaped_f16");
    json!({
        "block_hash": g["block_hash"], "block_height": 1, "public_key": g["public_key"],
        "params": g["params"], "r_target": 2.0,
        "nonces": (0..n).collect::<Vec<u64>>(), "dist": vec![1.0; n as usize],
        "batch_size": 16,
    })
}

#[test]
fn the_references_proofs_validate_with_progress_then_the_verdict() {
    let s = Server::start(&["--max-job-seconds", "60"]);
    let req = golden_batch("tiny_f16");
    let n = req["nonces"].as_array().unwrap().len();
    // Bare, as the PyWorker wraps it, and Runpod-style: the same verdict.
    for body in [
        req.clone(),
        json!({"auth_data": {"signature": "x"}, "payload": req.clone()}),
        json!({"input": req.clone()}),
    ] {
        let st = post_stream(s.port, "/validate", &body);
        assert_eq!(st.status, 200);
        assert_eq!(st.content_type, "application/x-ndjson");
        let lines = st.collect(30 * SECS);
        let (verdict, progress) = lines.split_last().expect("lines");
        assert_eq!(progress.len(), n.div_ceil(8), "{lines:?}");
        let mut last = 0;
        for p in progress {
            let v = p["validated"].as_u64().unwrap();
            assert!(v > last);
            last = v;
            assert_eq!(p["total"], n);
            assert_eq!(p["n_invalid_so_far"], 0);
            assert!(p["elapsed_seconds"].as_f64().unwrap() >= 0.0);
        }
        assert_eq!(last, n as u64);
        for k in ["public_key", "block_hash", "nonces", "r_target"] {
            assert_eq!(verdict[k], req[k], "{k}");
        }
        assert_eq!(verdict["received_dist"], req["dist"]);
        assert_eq!(
            (
                verdict["block_height"].as_u64(),
                verdict["node_id"].as_u64()
            ),
            (Some(12), Some(4))
        );
        assert_eq!(verdict["n_invalid"], 0);
        assert_eq!(verdict["invalid_nonces"], json!([]));
        assert_eq!(verdict["probability_honest"], 1.0);
        assert_eq!(verdict["fraud_detected"], false);
        assert_eq!(verdict["fraud_threshold"], 0.01);
        assert!(verdict["max_abs_dist_diff"].as_f64().unwrap() <= 1e-5);
        assert!(verdict["p99_abs_dist_diff"].as_f64().unwrap() <= 1e-5);
        assert!(verdict["compute_seconds"].as_f64().unwrap() >= 0.0);
        assert_eq!(verdict["dist"].as_array().unwrap().len(), n);
    }
    let (_, _, metrics) = request_raw(s.port, "GET", "/metrics", None);
    let text = String::from_utf8_lossy(&metrics);
    assert!(text.contains("llama_pow_validations_total 3"), "{text}");
    assert!(text.contains(&format!("llama_pow_nonces_validated_total {}", 3 * n)));
    assert!(text.contains("llama_pow_frauds_detected_total 0"));
    s.assert_clean_log();
}

#[test]
fn falsified_proofs_are_caught_and_judged_a_fraud() {
    let s = Server::start(&["--max-job-seconds", "60"]);
    let g = golden("tiny_f16");
    let r_target = g["r_target"].as_f64().unwrap();
    let mut req = golden_batch("tiny_f16");
    // Every nonce of the case claimed as a proof.
    req["nonces"] = g["nonces"].clone();
    req["dist"] = json!(vec![r_target - 0.01; g["nonces"].as_array().unwrap().len()]);
    let lines = post_stream(s.port, "/validate", &req).collect(30 * SECS);
    let verdict = lines.last().unwrap();
    let want: Vec<u64> = g["nonces"]
        .as_array()
        .unwrap()
        .iter()
        .zip(g["dist"].as_array().unwrap())
        .filter(|(_, d)| d.as_f64().unwrap() > r_target)
        .map(|(n, _)| n.as_u64().unwrap())
        .collect();
    assert!(!want.is_empty());
    assert_eq!(verdict["invalid_nonces"], json!(want));
    assert_eq!(verdict["n_invalid"], want.len());
    assert_eq!(verdict["fraud_detected"], true);
    let progress = &lines[lines.len() - 2];
    assert_eq!(progress["n_invalid_so_far"], want.len());
    let (_, _, metrics) = request_raw(s.port, "GET", "/metrics", None);
    let text = String::from_utf8_lossy(&metrics);
    assert!(text.contains("llama_pow_frauds_detected_total 1"), "{text}");
    assert!(text.contains(&format!(
        "llama_pow_validation_invalid_total {}",
        want.len()
    )));
}

fn error_of(s: &Server, body: &Value) -> String {
    let (status, v) = post(s.port, "/validate", body);
    assert_eq!(status, 400, "{body}: {v}");
    v["error"].as_str().unwrap().to_owned()
}

#[test]
fn bad_validations_are_400_naming_the_field() {
    let s = Server::start(&["--max-job-seconds", "60"]);
    let full = golden_batch("tiny_f16");
    let with = |k: &str, x: Value| {
        let mut v = full.clone();
        v[k] = x;
        v
    };
    let without = |keys: &[&str]| {
        let mut v = full.clone();
        for k in keys {
            v.as_object_mut().unwrap().remove(*k);
        }
        v
    };
    let r_target = full["r_target"].as_f64().unwrap();
    let n = full["nonces"].as_array().unwrap().len();
    let mut repeated = full["nonces"].as_array().unwrap().clone();
    repeated[3] = repeated[1].clone();
    let mut too_far = full["dist"].as_array().unwrap().clone();
    too_far[2] = json!(r_target);
    let cases: Vec<(Value, String)> = vec![
        (
            without(&["nonces"]),
            "nonces: missing required field".into(),
        ),
        (
            without(&["block_height", "params", "dist"]),
            "missing required fields: block_height, params, dist".into(),
        ),
        (with("nonces", json!(repeated)), "nonces[3]:".into()),
        (
            with("dist", json!(too_far)),
            format!("dist[2]: {r_target} is not below r_target"),
        ),
        (
            with("dist", json!([1.0])),
            format!("dist: 1 distances for {n} nonces"),
        ),
        (with("dist", json!("1.0")), "dist: expected an array".into()),
        (
            with("nonces", json!([-1])),
            "nonces[0]: expected a non-negative integer".into(),
        ),
        (
            with("r_target", json!(0)),
            "r_target: must be a positive finite number".into(),
        ),
        (
            with("fraud_threshold", json!(2)),
            "fraud_threshold: must be a probability".into(),
        ),
        (with("node_id", json!("4")), "node_id: expected".into()),
        (with("batch_size", json!(0)), "batch_size:".into()),
        (
            with("public_key", json!("")),
            "public_key: must not be empty".into(),
        ),
        (
            with("params", json!({"dim": 64, "n_heads": 3})),
            "params.".into(),
        ),
        (
            with("params", json!({"bogus": 1})),
            "params.bogus: unknown field".into(),
        ),
    ];
    for (body, want) in cases {
        let e = error_of(&s, &body);
        assert!(e.starts_with(&want), "{e:?} should start with {want:?}");
    }
    // Unknown top-level keys are ignored, as on /generate.
    let lines = post_stream(s.port, "/validate", &with("extra", json!(1))).collect(30 * SECS);
    assert_eq!(lines.last().unwrap()["n_invalid"], 0);
    assert_eq!(
        s.health()["jobs_started"],
        1,
        "no job for a refused request"
    );
    s.assert_clean_log();
}

#[test]
fn an_empty_batch_answers_at_once() {
    let s = Server::start(&["--max-job-seconds", "60"]);
    let mut req = golden_batch("tiny_f16");
    req["nonces"] = json!([]);
    req["dist"] = json!([]);
    let lines = post_stream(s.port, "/validate", &req).collect(5 * SECS);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["probability_honest"], 1.0);
    assert_eq!(lines[0]["fraud_detected"], false);
    assert_eq!(lines[0]["max_abs_dist_diff"], Value::Null);
    assert_eq!(s.health()["jobs_started"], 0);
}

#[test]
fn validations_and_generations_preempt_each_other() {
    let s = Server::start(&["--max-job-seconds", "60"]);
    // A generation preempted by a validation, which runs to its verdict.
    let g = post_stream(s.port, "/generate", &generate_request(1.4, 4, 0));
    g.next(5 * SECS).expect("a generation line");
    let v = post_stream(s.port, "/validate", &golden_batch("tiny_f16"));
    let rest = g.collect(5 * SECS);
    assert_eq!(rest.last().unwrap()["error_type"], "Preempted");
    let lines = v.collect(30 * SECS);
    assert_eq!(lines.last().unwrap()["n_invalid"], 0);
    // A validation preempted by a generation: no verdict, the Preempted line.
    let v = post_stream(s.port, "/validate", &long_batch(5000));
    let first = v.next(30 * SECS).expect("a progress line");
    assert!(first["validated"].as_u64().unwrap() > 0);
    let g = post_stream(s.port, "/generate", &generate_request(1.4, 4, 0));
    let lines = v.collect(10 * SECS);
    assert_eq!(
        lines.last().unwrap(),
        &json!({"error": "preempted by a newer request", "error_type": "Preempted"})
    );
    assert!(lines.iter().all(|l| l.get("probability_honest").is_none()));
    g.next(10 * SECS).expect("the generation streams");
    g.disconnect();
    assert!(wait_until(5 * SECS, || !s.busy()));
    s.assert_clean_log();
}

#[test]
fn a_client_that_disconnects_stops_its_validation() {
    let s = Server::start(&["--max-job-seconds", "60"]);
    let v = post_stream(s.port, "/validate", &long_batch(5000));
    v.next(30 * SECS).expect("a progress line");
    assert_eq!(s.health()["job"], "validate");
    let t = Instant::now();
    v.disconnect();
    assert!(
        wait_until(2 * SECS, || !s.busy()),
        "still busy 2 s after the disconnect"
    );
    eprintln!("validation stopped {:?} after the disconnect", t.elapsed());
    s.assert_clean_log();
}

#[test]
fn the_job_time_limit_ends_a_validation_without_a_verdict() {
    let s = Server::start(&["--max-job-seconds", "1"]);
    let lines = post_stream(s.port, "/validate", &long_batch(20_000)).collect(30 * SECS);
    let last = lines.last().unwrap();
    assert_eq!(last["error_type"], "TimeLimit", "{last}");
    assert!(last["error"].as_str().unwrap().contains("of 20000 nonces"));
    assert!(lines.iter().all(|l| l.get("probability_honest").is_none()));
}

#[test]
fn sigterm_ends_a_validation_with_the_shutdown_line() {
    let mut s = Server::start(&["--max-job-seconds", "60"]);
    let v = post_stream(s.port, "/validate", &long_batch(20_000));
    v.next(30 * SECS).expect("a progress line");
    let t = Instant::now();
    s.terminate();
    let lines = v.collect(15 * SECS);
    assert_eq!(
        lines.last().unwrap(),
        &json!({"error": "the server is shutting down", "error_type": "Shutdown"})
    );
    assert!(lines.iter().all(|l| l.get("probability_honest").is_none()));
    let status = s.wait_exit(15 * SECS).expect("the server exits");
    assert!(status.success(), "{status:?}");
    eprintln!("shutdown line and exit {:?} after SIGTERM", t.elapsed());
}
