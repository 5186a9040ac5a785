//! /health and /generate over real loopback sockets against the server binary: envelopes,
//! every validation error, streaming while the job runs, the reference's distances,
//! disconnects, preemption, the time limit, start-up and clean logs.

mod http_support;

use http_support::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const SECS: Duration = Duration::from_secs(1);

#[test]
fn health_answers_get_and_post() {
    let s = Server::start(&["--max-job-seconds", "1"]);
    for (method, body) in [
        ("GET", None),
        ("POST", Some(&b"{}"[..])),
        ("POST", None),
        ("POST", Some(&b"not json"[..])),
    ] {
        let (status, v) = request(s.port, method, "/health", body);
        assert_eq!(status, 200, "{method} {body:?}");
        assert_eq!(v["status"], "healthy");
        assert_eq!(v["cuda_broken"], false);
        assert_eq!(v["busy"], false);
        assert_eq!(v["device"], "cpu");
        assert_eq!(v["n_workers"], 1);
        assert_eq!(v["dtype"], "f16");
        // The start-up self-test ran on the CPU: the two f16 golden cases.
        assert_eq!(v["selftest"]["passed"], true, "{v}");
        assert_eq!(v["selftest"]["cases"], 2, "{v}");
        assert!(
            v["selftest"]["max_abs_diff"].as_f64().unwrap() < 2e-5,
            "{v}"
        );
        assert_eq!(v["selftest"]["devices"][0]["device"], "cpu", "{v}");
    }
    let (status, v) = request(s.port, "GET", "/nope", None);
    assert_eq!(status, 404);
    assert!(v["error"].as_str().unwrap().contains("no such endpoint"));
    let (status, v) = request(s.port, "GET", "/generate", None);
    assert_eq!(status, 405);
    assert!(v["error"].is_string());
    s.assert_clean_log();
}

fn error_of(s: &Server, body: &[u8]) -> String {
    let (status, v) = request(s.port, "POST", "/generate", Some(body));
    assert_eq!(status, 400, "{}: {v}", String::from_utf8_lossy(body));
    v["error"].as_str().unwrap().to_owned()
}

#[test]
fn generate_validation_errors_are_400_with_the_field_named() {
    let s = Server::start(&["--max-job-seconds", "1"]);
    let full = generate_request(1.4, 4, 0);
    let mut cases: Vec<(Vec<u8>, String)> = vec![
        (
            b"{\"block_hash\": ".to_vec(),
            "request is not valid JSON".into(),
        ),
        (b"".to_vec(), "request body is empty".into()),
        (
            b"[1, 2]".to_vec(),
            "request: expected a JSON object, got an array".into(),
        ),
        (
            json!({"payload": "x"}).to_string().into_bytes(),
            "payload: expected a JSON object".into(),
        ),
        (
            json!({"input": [1]}).to_string().into_bytes(),
            "input: expected a JSON object".into(),
        ),
        (
            vec![b' '; 2 << 20],
            "request body is larger than 1048576 bytes".into(),
        ),
    ];
    for key in [
        "block_hash",
        "block_height",
        "public_key",
        "r_target",
        "batch_size",
        "start_nonce",
        "params",
    ] {
        let mut v = full.clone();
        v.as_object_mut().unwrap().remove(key);
        cases.push((
            v.to_string().into_bytes(),
            format!("{key}: missing required field"),
        ));
        let mut v = full.clone();
        v[key] = Value::Null;
        cases.push((
            v.to_string().into_bytes(),
            format!("{key}: missing required field"),
        ));
    }
    let with = |k: &str, x: Value| {
        let mut v = full.clone();
        v[k] = x;
        v.to_string().into_bytes()
    };
    let with_param = |k: &str, x: Value| {
        let mut v = full.clone();
        v["params"][k] = x;
        v.to_string().into_bytes()
    };
    cases.extend([
        (
            with("block_hash", json!(5)),
            "block_hash: expected a string".into(),
        ),
        (
            with("public_key", json!("")),
            "public_key: must not be empty".into(),
        ),
        (
            with("start_nonce", json!(-1)),
            "start_nonce: expected a non-negative integer".into(),
        ),
        (
            with("r_target", json!("1.4")),
            "r_target: expected a number".into(),
        ),
        (
            with("r_target", json!(0)),
            "r_target: must be a positive finite number".into(),
        ),
        (
            with("batch_size", json!(0)),
            "batch_size: must be at least 1".into(),
        ),
        (
            with("batch_size", json!(1u64 << 20)),
            "batch_size: must be at most 65536".into(),
        ),
        (
            with("block_height", json!(1.5)),
            "block_height: expected a non-negative integer".into(),
        ),
        (
            with("params", json!("v2")),
            "params: expected a JSON object".into(),
        ),
        (
            with_param("dims", json!(3)),
            "params.dims: unknown field".into(),
        ),
        (
            with_param("n_heads", json!(5)),
            "params.n_heads: must divide dim".into(),
        ),
        (
            with_param("dim", json!(0)),
            "params.dim: must be a positive integer".into(),
        ),
        (
            with_param("use_fp8", json!(true)),
            "params.use_fp8: this server computes on the CPU".into(),
        ),
        (with_param("dim", json!(65536)), "out of memory".into()),
    ]);
    for (body, want) in cases {
        let e = error_of(&s, &body);
        assert!(
            e.contains(&want),
            "{}: {e:?} should contain {want:?}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
    }
    // Nothing ran.
    assert_eq!(s.health()["jobs_started"], 0);
    s.assert_clean_log();
}

fn first_line(s: &Server, body: &Value) -> Value {
    let st = post_stream(s.port, "/generate", body);
    assert_eq!(st.status, 200);
    assert_eq!(st.content_type, "application/x-ndjson");
    let v = st.next(10 * SECS).expect("a line");
    st.disconnect();
    v
}

#[test]
fn every_envelope_gives_the_same_stream_and_extra_keys_are_ignored() {
    let s = Server::start(&["--max-job-seconds", "5"]);
    let req = generate_request(10.0, 3, 40);
    let bare = first_line(&s, &req);
    let mut extra = req.clone();
    extra["request_id"] = json!("from-the-pyworker");
    extra["dtype"] = json!("whatever");
    for body in [
        json!({"auth_data": {"signature": "x", "cost": 3}, "payload": req}),
        json!({"input": req}),
        extra,
    ] {
        let v = first_line(&s, &body);
        assert_eq!(v["nonces"], bare["nonces"]);
        assert_eq!(v["dist"], bare["dist"]);
    }
    assert_eq!(bare["nonces"], json!([40, 41, 42]));
    let keys: Vec<&str> = bare
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    let want = [
        "worker_id",
        "public_key",
        "block_hash",
        "block_height",
        "nonces",
        "dist",
        "node_id",
        "batch_number",
        "batch_computed",
        "batch_valid",
        "total_computed",
        "total_valid",
        "elapsed_seconds",
        "next_nonce",
        "aggregated_batch_number",
        "aggregated_total_computed",
        "aggregated_total_valid",
        "n_workers",
    ];
    let mut sorted = keys.clone();
    sorted.sort();
    let mut want_sorted = want.to_vec();
    want_sorted.sort();
    assert_eq!(sorted, want_sorted);
    assert_eq!(bare["block_hash"], BLOCK_HASH);
    assert_eq!(bare["block_height"], 7);
    assert_eq!(bare["public_key"], "gonka1testkey");
    assert_eq!(bare["next_nonce"], 43);
    assert_eq!(bare["n_workers"], 1);
    s.assert_clean_log();
}

#[test]
fn distances_equal_the_reference() {
    let s = Server::start(&["--max-job-seconds", "5"]);
    for (case, tol) in [("tiny_f16", 1e-5), ("seq1_bignonce_f16", 1e-5)] {
        let g = golden(case);
        let nonces: Vec<u64> = g["nonces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .collect();
        let want: Vec<f64> = g["dist"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_f64().unwrap())
            .collect();
        // r_target 10: every nonce is valid, so every distance comes back.
        let req = json!({
            "block_hash": g["block_hash"], "public_key": g["public_key"], "params": g["params"],
            "block_height": 1, "r_target": 10.0, "batch_size": nonces.len(), "start_nonce": nonces[0],
        });
        let st = post_stream(s.port, "/generate", &req);
        let line = st.next(10 * SECS).expect("a line");
        st.disconnect();
        let got_n: Vec<u64> = line["nonces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .collect();
        assert_eq!(got_n, nonces, "{case}");
        for (i, (g, w)) in line["dist"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&want)
            .enumerate()
        {
            let g = g.as_f64().unwrap();
            assert!(
                (g - w).abs() <= tol,
                "{case} nonce {}: {g} vs {w}",
                nonces[i]
            );
        }
        // With the reference's r_target, exactly its valid nonces.
        let mut req = req;
        req["r_target"] = g["r_target"].clone();
        let st = post_stream(s.port, "/generate", &req);
        let line = st.next(10 * SECS).expect("a line");
        st.disconnect();
        assert_eq!(line["nonces"], g["valid_nonces"], "{case}");
        assert_eq!(line["batch_computed"], json!(nonces.len()));
    }
    s.assert_clean_log();
}

#[test]
fn bf16_server_matches_the_bf16_reference() {
    let s = Server::start(&["--max-job-seconds", "5", "--dtype", "bf16"]);
    let g = golden("tiny_bf16");
    let req = json!({
        "block_hash": g["block_hash"], "public_key": g["public_key"], "params": g["params"],
        "block_height": 1, "r_target": 10.0, "batch_size": 16, "start_nonce": 0,
    });
    let st = post_stream(s.port, "/generate", &req);
    let line = st.next(10 * SECS).expect("a line");
    st.disconnect();
    for (got, want) in line["dist"]
        .as_array()
        .unwrap()
        .iter()
        .zip(g["dist"].as_array().unwrap())
    {
        assert!((got.as_f64().unwrap() - want.as_f64().unwrap()).abs() <= 1e-4);
    }
    assert_eq!(s.health()["dtype"], "bf16");
}

#[test]
fn lines_stream_while_the_job_runs_and_it_ends_at_the_time_limit() {
    let s = Server::start(&["--max-job-seconds", "1.5"]);
    let st = post_stream(s.port, "/generate", &generate_request(1.4, 8, 0));
    let first = st.next(10 * SECS).expect("first line");
    let first_at = st.started.elapsed();
    assert!(
        first_at < Duration::from_millis(1000),
        "first line after {first_at:?}"
    );
    assert!(s.busy());
    let mut lines = vec![first];
    lines.extend(st.collect(10 * SECS));
    let took = st.started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Every line has a valid nonce; counters are consistent.
    let mut last_total = 0;
    let mut next_start = 0;
    for (i, l) in lines.iter().enumerate() {
        assert!(l.get("error").is_none(), "{l}");
        let nonces = l["nonces"].as_array().unwrap();
        assert!(!nonces.is_empty());
        assert!(nonces.iter().all(|n| n.as_u64().unwrap() >= next_start));
        assert!(l["dist"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d.as_f64().unwrap() < 1.4));
        assert_eq!(l["aggregated_batch_number"], json!(i + 1));
        assert_eq!(l["batch_number"], json!(i + 1));
        let total = l["aggregated_total_computed"].as_u64().unwrap();
        assert!(total > last_total);
        last_total = total;
        next_start = l["next_nonce"].as_u64().unwrap();
        assert_eq!(l["batch_computed"], 8);
    }
    assert!(wait_until(2 * SECS, || !s.busy()));
    s.assert_clean_log();
}

#[test]
fn a_client_that_disconnects_stops_its_job() {
    let s = Server::start(&["--max-job-seconds", "60"]);
    // A tiny r_target: no line is ever written, so only the closed socket tells.
    let st = post_stream(s.port, "/generate", &generate_request(1e-9, 4, 0));
    assert_eq!(st.status, 200);
    assert!(wait_until(5 * SECS, || s.health()["job"] == "generate"));
    assert!(st.next(Duration::from_millis(300)).is_none());
    let t = Instant::now();
    st.disconnect();
    assert!(
        wait_until(2 * SECS, || !s.busy()),
        "still busy 2 s after the disconnect"
    );
    eprintln!("job stopped {:?} after the disconnect", t.elapsed());
    assert!(s.wait_log("client disconnected", SECS));
    // And with lines flowing.
    let st = post_stream(s.port, "/generate", &generate_request(1.4, 4, 0));
    st.next(5 * SECS).expect("a line");
    st.disconnect();
    assert!(wait_until(2 * SECS, || !s.busy()));
    s.assert_clean_log();
}

#[test]
fn a_new_request_preempts_the_running_one() {
    let s = Server::start(&["--max-job-seconds", "60"]);
    let a = post_stream(s.port, "/generate", &generate_request(1.4, 4, 0));
    a.next(5 * SECS).expect("a line from the first job");
    let b = post_stream(s.port, "/generate", &generate_request(1.4, 4, 1_000_000));
    let rest = a.collect(5 * SECS);
    let last = rest.last().expect("the preemption line");
    assert_eq!(
        last,
        &json!({"error": "preempted by a newer request", "error_type": "Preempted"})
    );
    assert!(rest[..rest.len() - 1]
        .iter()
        .all(|l| l.get("error").is_none()));
    let l = b.next(5 * SECS).expect("the new job streams");
    assert!(l["nonces"][0].as_u64().unwrap() >= 1_000_000);
    assert_eq!(s.health()["job"], "generate");
    b.disconnect();
    assert!(wait_until(2 * SECS, || !s.busy()));
    assert_eq!(s.health()["jobs_started"], 2);
    s.assert_clean_log();
}

#[test]
fn models_are_cached_across_requests() {
    let s = Server::start(&["--max-job-seconds", "0.3"]);
    for _ in 0..2 {
        post_stream(s.port, "/generate", &generate_request(1.4, 4, 0)).collect(5 * SECS);
    }
    let log = s.log();
    let ready: Vec<&String> = log.iter().filter(|l| l.contains("model ready")).collect();
    assert_eq!(ready.len(), 2, "{log:#?}");
    assert!(ready[0].contains("cached=false"));
    assert!(ready[1].contains("cached=true"));
    assert_eq!(s.health()["models_cached"], 1);
    s.assert_clean_log();
}

#[test]
fn sigterm_ends_streams_and_exits_cleanly() {
    let mut s = Server::start(&["--max-job-seconds", "60"]);
    let st = post_stream(s.port, "/generate", &generate_request(1.4, 4, 0));
    st.next(5 * SECS).expect("a line");
    s.terminate();
    let rest = st.collect(5 * SECS);
    assert_eq!(rest.last().unwrap()["error_type"], "Shutdown");
    let status = s.wait_exit(5 * SECS).expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(s.wait_log("shut down cleanly", SECS));
    s.assert_clean_log();
}

#[test]
fn device_cuda_is_refused_at_start_up() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llama-pow"))
        .args(["serve", "--port", "0", "--device", "cuda"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--device cuda: cannot compute on CUDA"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(READY_LINE));
    // The environment variable works too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llama-pow"))
        .args(["serve", "--port", "0"])
        .env("LLAMA_POW_DEVICE", "cuda")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot compute on CUDA"));
}
