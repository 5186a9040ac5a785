//! /pooled against a stub orchestrator on loopback that answers 500, hangs past the client
//! timeout and refuses connections at times: every computed nonce reaches it exactly once;
//! registration retries, heartbeats, switch_job, shutdown commands, the bounded backlog,
//! preemption, disconnects and SIGTERM.

mod http_support;

use http_support::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECS: Duration = Duration::from_secs(1);

/// What the stub orchestrator has seen and will say.
#[derive(Default)]
struct Orch {
    worker_id: Option<String>,
    connects: usize,
    polls: usize,
    result_posts: usize,
    /// Every result the orchestrator accepted (answered 200 to), in arrival order.
    accepted: Vec<Value>,
    heartbeats: Vec<Value>,
    shutdowns: Vec<Value>,
    readies: usize,
    /// Answer to GET config.
    config: Value,
    /// Answer to POST ready.
    ready: Value,
    /// Answer every result post with 500 while set.
    fail_results: bool,
    /// Fail the first connects with 500.
    fail_connects: usize,
}

type Shared = Arc<Mutex<Orch>>;
type Flaky = dyn Fn(usize) -> Option<Reply> + Send + Sync;

fn orchestrator(shared: Shared, flaky: Box<Flaky>) -> Stub {
    Stub::start(move |r| {
        let mut o = shared.lock().unwrap();
        let p = r.path.as_str();
        if p == "/api/workers/connect" {
            o.connects += 1;
            o.worker_id = r.body["worker_id"].as_str().map(str::to_owned);
            assert!(r.body["gpu_count"].as_u64().unwrap() >= 1);
            if o.connects <= o.fail_connects {
                return Reply::Json(500, json!({"detail": "not yet"}));
            }
            return ok(json!({"status": "ok"}));
        }
        let id = o.worker_id.clone().expect("connect first");
        let Some(rest) = p.strip_prefix(&format!("/api/workers/{id}")) else {
            return Reply::Json(404, json!({"detail": "unknown worker"}));
        };
        match rest {
            "/config" => {
                o.polls += 1;
                ok(o.config.clone())
            }
            "/ready" => {
                o.readies += 1;
                ok(o.ready.clone())
            }
            "/results" | "/results/batch" => {
                o.result_posts += 1;
                if o.fail_results {
                    return Reply::Json(500, json!({"detail": "down"}));
                }
                if let Some(reply) = flaky(o.result_posts) {
                    return reply;
                }
                if rest == "/results" {
                    o.accepted.push(r.body.clone());
                } else {
                    o.accepted
                        .extend(r.body["results"].as_array().unwrap().iter().cloned());
                }
                ok(json!({"status": "ok"}))
            }
            "/heartbeat" => {
                o.heartbeats.push(r.body.clone());
                ok(json!({"status": "ok"}))
            }
            "/shutdown" => {
                o.shutdowns.push(r.body.clone());
                ok(json!({"status": "ok"}))
            }
            _ => Reply::Json(404, json!({})),
        }
    })
}

fn steady() -> Box<Flaky> {
    Box::new(|_| None)
}

fn block_config(batch_size: u64) -> Value {
    json!({"block_hash": BLOCK_HASH, "block_height": 5, "r_target": 10.0, "params": tiny_params(),
           "batch_size": batch_size})
}

fn server(extra: &[&str]) -> Server {
    let mut args = vec![
        "--pooled-poll-seconds",
        "0.05",
        "--pooled-heartbeat-seconds",
        "0.2",
        "--client-timeout-seconds",
        "0.4",
        "--shutdown-grace-seconds",
        "10",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn accepted_nonces(o: &Orch) -> Vec<u64> {
    o.accepted
        .iter()
        .flat_map(|r| {
            r["nonces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap())
        })
        .collect()
}

/// Nonces accepted for `key`: no duplicates, and exactly the first `count` of the range.
fn assert_exactly_once(o: &Orch, key: &str, start: u64, count: u64) {
    let mine: Vec<u64> = o
        .accepted
        .iter()
        .filter(|r| r["public_key"] == key)
        .flat_map(|r| {
            r["nonces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap())
        })
        .collect();
    let set: BTreeSet<u64> = mine.iter().copied().collect();
    assert_eq!(set.len(), mine.len(), "duplicates for {key}");
    assert_eq!(
        set.into_iter().collect::<Vec<_>>(),
        (start..start + count).collect::<Vec<_>>(),
        "{key}"
    );
}

fn statuses(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l["status"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn the_whole_pooled_flow_delivers_every_nonce_exactly_once() {
    let o: Shared = Arc::default();
    {
        let mut g = o.lock().unwrap();
        g.fail_connects = 1;
        g.config = json!({"status": "wait"});
        g.ready = json!({"status": "ok", "public_key": "pk-one", "nonce_range_start": 1000, "nonce_range_end": 1299});
    }
    // Every fifth post answers 500, the one two later hangs past the client timeout.
    let stub = orchestrator(
        o.clone(),
        Box::new(|n| match n % 5 {
            1 => Some(Reply::Json(500, json!({"detail": "flaky"}))),
            3 => Some(Reply::Hang(Duration::from_millis(700))),
            _ => None,
        }),
    );
    let s = server(&["--pooled-max-backlog", "6"]);
    let st = post_stream(
        s.port,
        "/pooled",
        &json!({"payload": {"orchestrator_url": stub.url()}}),
    );
    assert_eq!(st.status, 200);
    let head = st.until(10 * SECS, |l| l["status"] == "waiting_block_hash");
    assert_eq!(
        statuses(&head),
        ["registering", "registered", "waiting_block_hash"]
    );
    let worker_id = head[0]["worker_id"].as_str().unwrap().to_owned();
    assert_eq!(head[1]["worker_id"], worker_id.as_str());
    assert_eq!(o.lock().unwrap().connects, 2, "registration is retried");
    o.lock().unwrap().config = block_config(4);
    let more = st.until(10 * SECS, |l| l["status"] == "computing");
    assert_eq!(
        statuses(&more),
        [
            "received_block_hash",
            "loading_model",
            "model_loaded",
            "ready",
            "computing"
        ]
    );
    assert_eq!(more[0]["block_hash"], &BLOCK_HASH[..16]);
    assert_eq!(more[3]["public_key"], "pk-one");
    // Refuse connections for a while once results flow.
    assert!(wait_until(10 * SECS, || accepted_nonces(
        &o.lock().unwrap()
    )
    .len()
        >= 40));
    stub.refuse();
    std::thread::sleep(SECS);
    stub.listen();
    assert!(wait_until(20 * SECS, || accepted_nonces(
        &o.lock().unwrap()
    )
    .len()
        >= 300));
    o.lock().unwrap().config = json!({"type": "shutdown"});
    let rest = st.collect(10 * SECS);
    let last = rest.last().unwrap();
    assert_eq!(last["status"], "shutdown");
    assert_eq!(last["pending_results"], 0);

    let g = o.lock().unwrap();
    assert_exactly_once(&g, "pk-one", 1000, 300);
    for r in &g.accepted {
        assert_eq!(r["block_hash"], BLOCK_HASH);
        assert_eq!(r["block_height"], 5);
        assert_eq!(r["batch_computed"], 4);
        assert_eq!(
            r["nonces"].as_array().unwrap().len(),
            r["dist"].as_array().unwrap().len()
        );
    }
    assert_eq!(last["total_batches_sent"], json!(g.accepted.len()));
    assert_eq!(g.readies, 1);
    assert!(!g.heartbeats.is_empty());
    assert!(g.heartbeats.iter().all(|h| h["pending_results"].is_u64()));
    assert_eq!(g.shutdowns.len(), 1);
    let stats = &g.shutdowns[0]["stats"];
    assert_eq!(stats["total_computed"], 300);
    assert_eq!(stats["total_batches_sent"], json!(g.accepted.len()));
    assert_eq!(stats["pending_results"], 0);
    // Result lines streamed too (empty batches included: r_target 10 makes all valid here).
    let streamed: usize = more
        .iter()
        .chain(&rest)
        .filter(|l| l.get("nonces").is_some())
        .count();
    assert!(streamed > 0);
    drop(g);
    assert!(wait_until(2 * SECS, || !s.busy()));
    s.assert_clean_log();
}

#[test]
fn computing_pauses_while_results_wait_and_nothing_is_dropped() {
    let o: Shared = Arc::default();
    {
        let mut g = o.lock().unwrap();
        g.config = block_config(2);
        g.ready =
            json!({"public_key": "pk-b", "nonce_range_start": 0, "nonce_range_end": 9_999_999});
        g.fail_results = true;
    }
    let stub = orchestrator(o.clone(), steady());
    let s = server(&["--pooled-max-backlog", "5"]);
    let st = post_stream(s.port, "/pooled", &json!({"orchestrator_url": stub.url()}));
    st.until(10 * SECS, |l| l["status"] == "computing");
    assert!(s.wait_log("computing paused", 5 * SECS));
    // While paused, hardly any batch is computed.
    let mut during = 0;
    while let Some(l) = st.next(Duration::from_millis(800)) {
        during += l.get("nonces").is_some() as usize;
    }
    assert!(
        during <= 5 + 64 + 4,
        "{during} batches while the orchestrator was down"
    );
    assert!(o.lock().unwrap().accepted.is_empty());
    o.lock().unwrap().fail_results = false;
    assert!(s.wait_log("computing again", 10 * SECS));
    assert!(wait_until(10 * SECS, || o.lock().unwrap().accepted.len() >= 100));
    o.lock().unwrap().config = json!({"type": "shutdown"});
    let rest = st.collect(10 * SECS);
    assert_eq!(rest.last().unwrap()["status"], "shutdown");
    let g = o.lock().unwrap();
    let computed = g.shutdowns[0]["stats"]["total_computed"].as_u64().unwrap();
    assert_exactly_once(&g, "pk-b", 0, computed);
    s.assert_clean_log();
}

#[test]
fn switch_job_restarts_the_range_with_the_new_key() {
    let o: Shared = Arc::default();
    {
        let mut g = o.lock().unwrap();
        g.config = block_config(4);
        g.ready =
            json!({"public_key": "pk-old", "nonce_range_start": 0, "nonce_range_end": 9_999_999});
    }
    let stub = orchestrator(o.clone(), steady());
    let s = server(&[]);
    let st = post_stream(
        s.port,
        "/pooled",
        &json!({"input": {"orchestrator_url": stub.url()}}),
    );
    st.until(10 * SECS, |l| l["status"] == "computing");
    assert!(wait_until(10 * SECS, || o.lock().unwrap().accepted.len() >= 10));
    // The command stays in the config answer: it must be applied once.
    o.lock().unwrap().config = json!({"type": "switch_job", "public_key": "pk-new", "nonce_range_start": 500, "nonce_range_end": 579});
    let lines = st.until(10 * SECS, |l| l["status"] == "switched_public_key");
    assert_eq!(lines.last().unwrap()["public_key"], "pk-new");
    assert!(wait_until(10 * SECS, || {
        o.lock()
            .unwrap()
            .accepted
            .iter()
            .filter(|r| r["public_key"] == "pk-new")
            .count()
            >= 20
    }));
    std::thread::sleep(Duration::from_millis(300));
    o.lock().unwrap().config = json!({"type": "shutdown"});
    let rest = st.collect(10 * SECS);
    assert_eq!(
        statuses(&rest)
            .iter()
            .filter(|s| *s == "switched_public_key")
            .count(),
        0
    );
    let g = o.lock().unwrap();
    assert_exactly_once(&g, "pk-new", 500, 80);
    let old: Vec<u64> = g
        .accepted
        .iter()
        .filter(|r| r["public_key"] == "pk-old")
        .flat_map(|r| {
            r["nonces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap())
        })
        .collect();
    assert_exactly_once(&g, "pk-old", 0, old.len() as u64);
    // Counters start over with the new key.
    let first_new = g
        .accepted
        .iter()
        .find(|r| r["public_key"] == "pk-new")
        .unwrap();
    assert_eq!(first_new["batch_number"], 1);
    assert_eq!(first_new["total_computed"], 4);
    assert_eq!(g.shutdowns.len(), 1);
    s.assert_clean_log();
}

#[test]
fn sigterm_flushes_pending_results_and_notifies() {
    let o: Shared = Arc::default();
    {
        let mut g = o.lock().unwrap();
        g.config = block_config(4);
        g.ready =
            json!({"public_key": "pk-t", "nonce_range_start": 0, "nonce_range_end": 9_999_999});
    }
    let stub = orchestrator(o.clone(), steady());
    let mut s = server(&["--pooled-max-backlog", "20"]);
    let st = post_stream(s.port, "/pooled", &json!({"orchestrator_url": stub.url()}));
    st.until(10 * SECS, |l| l["status"] == "computing");
    assert!(wait_until(10 * SECS, || o.lock().unwrap().accepted.len() >= 5));
    // The orchestrator goes away; results pile up; then SIGTERM; then it comes back.
    stub.refuse();
    assert!(s.wait_log("computing paused", 5 * SECS));
    s.terminate();
    std::thread::sleep(Duration::from_millis(500));
    stub.listen();
    let rest = st.collect(15 * SECS);
    let last = rest.last().unwrap();
    assert_eq!(last["status"], "shutdown");
    assert_eq!(last["reason"], "server shutting down");
    assert_eq!(last["pending_results"], 0);
    let status = s.wait_exit(15 * SECS).expect("the server exits");
    assert!(status.success(), "{status:?}");
    let g = o.lock().unwrap();
    assert_eq!(g.shutdowns.len(), 1);
    let stats = &g.shutdowns[0]["stats"];
    assert_eq!(stats["pending_results"], 0);
    let computed = stats["total_computed"].as_u64().unwrap();
    assert!(computed >= 20);
    assert_exactly_once(&g, "pk-t", 0, computed);
    assert_eq!(stats["total_batches_sent"], json!(g.accepted.len()));
    drop(g);
    s.assert_clean_log();
}

#[test]
fn registration_waits_for_a_refusing_orchestrator() {
    let o: Shared = Arc::default();
    o.lock().unwrap().config = json!({"status": "wait"});
    let stub = orchestrator(o.clone(), steady());
    stub.refuse();
    let s = server(&[]);
    let st = post_stream(s.port, "/pooled", &json!({"orchestrator_url": stub.url()}));
    assert_eq!(st.next(5 * SECS).unwrap()["status"], "registering");
    std::thread::sleep(Duration::from_millis(1200));
    stub.listen();
    let lines = st.until(10 * SECS, |l| l["status"] == "waiting_block_hash");
    assert_eq!(statuses(&lines), ["registered", "waiting_block_hash"]);
    // A shutdown command before any block hash ends the session politely.
    o.lock().unwrap().config = json!({"type": "shutdown"});
    let rest = st.collect(10 * SECS);
    assert_eq!(rest.last().unwrap()["status"], "shutdown");
    let g = o.lock().unwrap();
    assert_eq!(g.connects, 1);
    assert_eq!(g.shutdowns.len(), 1);
    assert_eq!(g.shutdowns[0]["stats"]["reason"], "shutdown command");
    s.assert_clean_log();
}

#[test]
fn no_block_hash_in_time_is_a_timeout() {
    let o: Shared = Arc::default();
    o.lock().unwrap().config = json!({"status": "wait"});
    let stub = orchestrator(o.clone(), steady());
    let s = server(&["--pooled-max-seconds", "0.5"]);
    let st = post_stream(s.port, "/pooled", &json!({"orchestrator_url": stub.url()}));
    let lines = st.collect(10 * SECS);
    let timeout = lines
        .iter()
        .find(|l| l["status"] == "timeout")
        .expect("a timeout line");
    assert_eq!(timeout["message"], "No block_hash received");
    assert_eq!(lines.last().unwrap()["status"], "shutdown");
    assert_eq!(
        o.lock().unwrap().shutdowns[0]["stats"]["reason"],
        "timeout_waiting_block_hash"
    );
    s.assert_clean_log();
}

#[test]
fn generate_preempts_a_pooled_session_which_still_delivers() {
    let o: Shared = Arc::default();
    {
        let mut g = o.lock().unwrap();
        g.config = block_config(4);
        g.ready =
            json!({"public_key": "pk-p", "nonce_range_start": 0, "nonce_range_end": 9_999_999});
    }
    let stub = orchestrator(o.clone(), steady());
    let s = server(&["--max-job-seconds", "0.5"]);
    let st = post_stream(s.port, "/pooled", &json!({"orchestrator_url": stub.url()}));
    st.until(10 * SECS, |l| l["status"] == "computing");
    assert!(wait_until(10 * SECS, || o.lock().unwrap().accepted.len() >= 3));
    let g = post_stream(s.port, "/generate", &generate_request(1.4, 4, 0));
    let rest = st.collect(10 * SECS);
    assert_eq!(
        rest.last().unwrap(),
        &json!({"error": "preempted by a newer request", "error_type": "Preempted"})
    );
    g.next(5 * SECS).expect("the generate job runs");
    assert!(wait_until(5 * SECS, || o.lock().unwrap().shutdowns.len() == 1));
    let o = o.lock().unwrap();
    let stats = &o.shutdowns[0]["stats"];
    assert_eq!(stats["reason"], "preempted by a newer request");
    assert_exactly_once(&o, "pk-p", 0, stats["total_computed"].as_u64().unwrap());
    s.assert_clean_log();
}

#[test]
fn a_pooled_client_that_disconnects_stops_computing() {
    let o: Shared = Arc::default();
    {
        let mut g = o.lock().unwrap();
        g.config = block_config(4);
        g.ready =
            json!({"public_key": "pk-d", "nonce_range_start": 0, "nonce_range_end": 9_999_999});
    }
    let stub = orchestrator(o.clone(), steady());
    let s = server(&[]);
    let st = post_stream(s.port, "/pooled", &json!({"orchestrator_url": stub.url()}));
    st.until(10 * SECS, |l| l["status"] == "computing");
    assert!(wait_until(10 * SECS, || o.lock().unwrap().accepted.len() >= 3));
    st.disconnect();
    assert!(
        wait_until(2 * SECS, || !s.busy()),
        "still computing 2 s after the disconnect"
    );
    assert!(wait_until(5 * SECS, || o.lock().unwrap().shutdowns.len() == 1));
    let o = o.lock().unwrap();
    let stats = &o.shutdowns[0]["stats"];
    assert_eq!(stats["reason"], "client disconnected");
    assert_exactly_once(&o, "pk-d", 0, stats["total_computed"].as_u64().unwrap());
    s.assert_clean_log();
}

#[test]
fn pooled_request_errors() {
    let s = server(&[]);
    for (body, want) in [
        (json!({}), "orchestrator_url: missing required field"),
        (
            json!({"orchestrator_url": ""}),
            "orchestrator_url: must not be empty",
        ),
        (
            json!({"orchestrator_url": "mailto:x@y"}),
            "orchestrator_url: expected an http:// or https:// URL",
        ),
        (
            json!({"payload": {"orchestrator_url": ["http://x"]}}),
            "orchestrator_url: expected a string",
        ),
    ] {
        let (status, v) = post(s.port, "/pooled", &body);
        assert_eq!(status, 400, "{body}");
        assert!(v["error"].as_str().unwrap().contains(want), "{v}");
    }
    s.assert_clean_log();
}

#[test]
fn bad_params_from_the_orchestrator_end_the_session() {
    let o: Shared = Arc::default();
    {
        let mut g = o.lock().unwrap();
        let mut c = block_config(4);
        c["params"]["dims"] = json!(3);
        g.config = c;
    }
    let stub = orchestrator(o.clone(), steady());
    let s = server(&[]);
    let st = post_stream(s.port, "/pooled", &json!({"orchestrator_url": stub.url()}));
    let lines = st.collect(10 * SECS);
    let err = lines
        .iter()
        .find(|l| l.get("error").is_some())
        .expect("an error line");
    assert_eq!(err["error_type"], "ValidationError");
    assert!(err["error"].as_str().unwrap().contains("params.dims"));
    assert_eq!(lines.last().unwrap()["status"], "shutdown");
    assert_eq!(o.lock().unwrap().shutdowns.len(), 1);
    s.assert_clean_log();
}
