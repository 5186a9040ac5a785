//! /warmup against a stub callback server on loopback: statuses as they happen, failed polls
//! retried, generation lines streamed, completion posted; the timeout; bad params; bad
//! requests.

mod http_support;

use http_support::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SECS: Duration = Duration::from_secs(1);

fn server() -> Server {
    Server::start(&[
        "--max-job-seconds",
        "1",
        "--warmup-poll-seconds",
        "0.1",
        "--warmup-max-seconds",
        "20",
        "--client-timeout-seconds",
        "0.5",
    ])
}

#[test]
fn the_whole_warmup_flow() {
    let polls = Arc::new(AtomicUsize::new(0));
    let p = polls.clone();
    let stub = Stub::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/cb/warmup/params") => {
            assert_eq!(r.query, "job_id=job-42");
            match p.fetch_add(1, Ordering::SeqCst) {
                0 => ok(json!({"status": "waiting"})),
                1 => Reply::Json(500, json!({"detail": "boom"})),
                2 => Reply::Hang(Duration::from_millis(800)),
                _ => ok(json!({"status": "ready", "params": generate_request(1.4, 8, 100)})),
            }
        }
        ("POST", "/cb/warmup/complete") => ok(json!({"status": "ok"})),
        _ => Reply::Json(404, json!({})),
    });
    let s = server();
    let body = json!({"auth_data": {"x": 1}, "payload": {"callback_url": format!("{}/cb/", stub.url()), "job_id": "job-42"}});
    let st = post_stream(s.port, "/warmup", &body);
    assert_eq!(st.status, 200);
    let head = st.until(10 * SECS, |l| l["status"] == "warmup_params_received");
    assert_eq!(
        head[0],
        json!({"status": "warmup_ready", "job_id": "job-42"})
    );
    let waiting: Vec<&Value> = head
        .iter()
        .filter(|l| l["status"] == "warmup_waiting")
        .collect();
    assert_eq!(waiting.len(), 3, "{head:?}");
    for (i, w) in waiting.iter().enumerate() {
        assert_eq!(w["poll_count"], json!(i + 1));
        assert!(w["elapsed"].is_u64());
    }
    assert!(head.last().unwrap()["elapsed"].is_u64());
    // Generation lines as they are made, until the job's time limit.
    let first = st.next(5 * SECS).expect("a generation line");
    assert!(first["nonces"][0].as_u64().unwrap() >= 100);
    let mut lines = vec![first];
    lines.extend(st.collect(10 * SECS));
    assert!(
        lines.iter().all(|l| l.get("nonces").is_some()),
        "{:?}",
        lines.last()
    );
    // The completion notice matches what streamed.
    assert!(wait_until(5 * SECS, || !stub
        .requests_to("/warmup/complete")
        .is_empty()));
    let done = &stub.requests_to("/warmup/complete")[0].body;
    let last = lines.last().unwrap();
    assert_eq!(done["job_id"], "job-42");
    assert_eq!(done["total_batches"], json!(lines.len()));
    assert!(
        done["total_computed"].as_u64().unwrap()
            >= last["aggregated_total_computed"].as_u64().unwrap()
    );
    assert!(
        done["total_valid"].as_u64().unwrap() >= last["aggregated_total_valid"].as_u64().unwrap()
    );
    assert_eq!(polls.load(Ordering::SeqCst), 4);
    s.assert_clean_log();
}

#[test]
fn warmup_times_out_without_params() {
    let stub = Stub::start(|_| ok(json!({"status": "waiting"})));
    let s = Server::start(&[
        "--warmup-poll-seconds",
        "0.1",
        "--warmup-max-seconds",
        "0.5",
    ]);
    let st = post_stream(
        s.port,
        "/warmup",
        &json!({"input": {"callback_url": stub.url()}}),
    );
    let lines = st.collect(10 * SECS);
    assert_eq!(
        lines[0],
        json!({"status": "warmup_ready", "job_id": "unknown"})
    );
    let last = lines.last().unwrap();
    assert_eq!(last["status"], "warmup_timeout");
    assert!(last["elapsed"].is_u64());
    assert!(lines.len() >= 4);
    assert!(stub.requests_to("/warmup/complete").is_empty());
    assert_eq!(s.health()["jobs_started"], 0);
    s.assert_clean_log();
}

#[test]
fn warmup_with_an_unreachable_callback_keeps_polling() {
    // Nothing listens on the stub's port while it refuses.
    let stub =
        Stub::start(|_| ok(json!({"status": "ready", "params": generate_request(1.4, 4, 0)})));
    stub.refuse();
    let s = server();
    let st = post_stream(
        s.port,
        "/warmup",
        &json!({"callback_url": stub.url(), "job_id": 9}),
    );
    let lines = st.until(10 * SECS, |l| l["poll_count"] == 3);
    assert_eq!(lines[0]["job_id"], "9");
    stub.listen();
    st.until(10 * SECS, |l| l["status"] == "warmup_params_received");
    st.next(5 * SECS).expect("generation");
    st.disconnect();
    assert!(wait_until(2 * SECS, || !s.busy()));
    s.assert_clean_log();
}

#[test]
fn warmup_with_bad_params_says_so_in_the_stream() {
    let mut bad = generate_request(1.4, 4, 0);
    bad["params"]["n_heads"] = json!(5);
    let stub = Stub::start(move |_| ok(json!({"status": "ready", "params": bad.clone()})));
    let s = server();
    let st = post_stream(s.port, "/warmup", &json!({"callback_url": stub.url()}));
    let lines = st.collect(10 * SECS);
    let last = lines.last().unwrap();
    assert_eq!(last["error_type"], "ValidationError");
    assert!(last["error"].as_str().unwrap().contains("params.n_heads"));
    s.assert_clean_log();
}

#[test]
fn fatal_looking_request_text_never_reaches_the_log_as_is() {
    let mut bad = generate_request(1.4, 4, 0);
    bad["params"]["Error: x"] = json!(1);
    let stub = Stub::start(move |_| ok(json!({"status": "ready", "params": bad.clone()})));
    let s = server();
    let job_id =
        "RuntimeError: boom Error: Traceback (most recent call last): OutOfMemoryError CUDA error";
    let url = format!("{}/Error:/RuntimeError:", stub.url());
    let st = post_stream(
        s.port,
        "/warmup",
        &json!({"callback_url": url, "job_id": job_id}),
    );
    let lines = st.collect(10 * SECS);
    assert_eq!(lines[0]["job_id"], job_id);
    assert_eq!(lines.last().unwrap()["error_type"], "ValidationError");
    let mut g = generate_request(1.4, 4, 0);
    g["public_key"] = json!("Error: RuntimeError: key");
    g["params"]["OutOfMemoryError"] = json!(1);
    assert_eq!(post(s.port, "/generate", &g).0, 400);
    let st = post_stream(
        s.port,
        "/pooled",
        &json!({"orchestrator_url": "http://127.0.0.1:1/CUDA error"}),
    );
    assert_eq!(st.status, 200);
    assert!(s.wait_log("registration attempt 1 failed", 5 * SECS));
    assert!(
        s.log().iter().any(|l| l.contains("boom")),
        "the job id is logged"
    );
    s.assert_clean_log();
}

#[test]
fn warmup_request_errors() {
    let s = server();
    for (body, want) in [
        (json!({}), "callback_url: missing required field"),
        (
            json!({"callback_url": 3}),
            "callback_url: expected a string",
        ),
        (
            json!({"callback_url": "gopher://x"}),
            "callback_url: expected an http:// or https:// URL",
        ),
        (
            json!({"callback_url": "not a url"}),
            "callback_url: not a valid URL",
        ),
        (
            json!({"payload": {"callback_url": "http://127.0.0.1:1", "job_id": {"a": 1}}}),
            "job_id: expected",
        ),
    ] {
        let (status, v) = post(s.port, "/warmup", &body);
        assert_eq!(status, 400);
        assert!(v["error"].as_str().unwrap().contains(want), "{v}");
    }
    let (status, v) = request(s.port, "POST", "/warmup", Some(b"{nope"));
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("not valid JSON"));
    s.assert_clean_log();
}
