//! The server against hostile peers and huge requests, on loopback: callback and orchestrator
//! URLs that answer endlessly or redirect, params whose one nonce would not fit in memory,
//! stops that must act inside a long batch, request bodies that trickle in, working memory
//! after a job, SIGHUP, and the messages of bad requests. Memory figures are the server
//! process's VmHWM / VmRSS, asserted against bounds; each test prints what it measured.

mod http_support;

use http_support::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const SECS: Duration = Duration::from_secs(1);
const MB: u64 = 1 << 20;

fn mb(bytes: u64) -> f64 {
    bytes as f64 / MB as f64
}

// ---------------------------------------------------------------------------------------------
// Replies from outside: bounded, and never followed elsewhere

#[test]
fn an_endless_callback_reply_is_cut_at_the_reply_limit() {
    let cb = Stub::start(|r| match r.path.as_str() {
        "/warmup/params" => Reply::Endless,
        _ => ok(json!({"status": "ok"})),
    });
    let s = Server::start(&[
        "--warmup-poll-seconds",
        "0.2",
        "--client-timeout-seconds",
        "20",
    ]);
    let idle = s.memory("VmRSS");
    let t0 = Instant::now();
    let st = post_stream(
        s.port,
        "/warmup",
        &json!({"callback_url": cb.url(), "job_id": "endless"}),
    );
    // Each poll reads 1 MiB, gives up and polls again 0.2 s later: five polls come quickly
    // (the 20 s call timeout never comes into it).
    st.until(15 * SECS, |l| l["poll_count"].as_u64() >= Some(5));
    let took = t0.elapsed();
    assert!(took < 10 * SECS, "{took:?}");
    assert!(cb.requests_to("/warmup/params").len() >= 5);
    let peak = s.memory("VmHWM");
    println!(
        "endless callback: peak RSS {:.1} MB (idle {:.1} MB) over 5 polls in {:.2} s",
        mb(peak),
        mb(idle),
        took.as_secs_f64()
    );
    assert!(peak < idle + 64 * MB, "peak {peak} from {idle}");
    assert!(s.wait_log("larger than 1048576 bytes", 5 * SECS));
    st.disconnect();
    s.assert_clean_log();
}

#[test]
fn an_endless_orchestrator_reply_is_cut_at_the_reply_limit() {
    let config_polls = Arc::new(AtomicUsize::new(0));
    let polls = config_polls.clone();
    let orch = Stub::start(move |r| {
        if r.path == "/api/workers/connect" {
            return ok(json!({"status": "ok"}));
        }
        if r.path.ends_with("/config") {
            polls.fetch_add(1, Ordering::SeqCst);
            return Reply::Endless;
        }
        ok(json!({"status": "ok"}))
    });
    let s = Server::start(&[
        "--pooled-poll-seconds",
        "0.2",
        "--client-timeout-seconds",
        "25",
        // A smaller limit, set by its option.
        "--max-reply-bytes",
        "262144",
    ]);
    let idle = s.memory("VmRSS");
    let t0 = Instant::now();
    let st = post_stream(s.port, "/pooled", &json!({"orchestrator_url": orch.url()}));
    st.until(10 * SECS, |l| l["status"] == "waiting_block_hash");
    assert!(
        wait_until(15 * SECS, || config_polls.load(Ordering::SeqCst) >= 8),
        "config polls: {}",
        config_polls.load(Ordering::SeqCst)
    );
    let took = t0.elapsed();
    let peak = s.memory("VmHWM");
    println!(
        "endless orchestrator: peak RSS {:.1} MB (idle {:.1} MB) over 8 config polls in {:.2} s",
        mb(peak),
        mb(idle),
        took.as_secs_f64()
    );
    assert!(peak < idle + 64 * MB, "peak {peak} from {idle}");
    st.disconnect();
    s.assert_clean_log();
}

#[test]
fn redirects_from_callbacks_and_orchestrators_are_not_followed() {
    let elsewhere = Stub::start(|_| ok(json!({"status": "ready", "params": {}})));
    let target = format!("{}/steal", elsewhere.url());
    let to = target.clone();
    let cb = Stub::start(move |r| match r.path.as_str() {
        "/warmup/params" => Reply::Redirect(307, to.clone()),
        _ => ok(json!({"status": "ok"})),
    });
    let to = target.clone();
    let orch = Stub::start(move |r| {
        if r.path == "/api/workers/connect" {
            return ok(json!({"status": "ok"}));
        }
        if r.path.ends_with("/config") {
            return Reply::Redirect(302, to.clone());
        }
        ok(json!({"status": "ok"}))
    });
    let s = Server::start(&[
        "--warmup-poll-seconds",
        "0.1",
        "--pooled-poll-seconds",
        "0.1",
    ]);
    let w = post_stream(
        s.port,
        "/warmup",
        &json!({"callback_url": cb.url(), "job_id": "r"}),
    );
    w.until(10 * SECS, |l| l["poll_count"].as_u64() >= Some(3));
    let p = post_stream(s.port, "/pooled", &json!({"orchestrator_url": orch.url()}));
    p.until(10 * SECS, |l| l["status"] == "waiting_block_hash");
    assert!(wait_until(10 * SECS, || orch.requests_to("/config").len() >= 3));
    assert!(elsewhere.requests.lock().unwrap().is_empty(), "followed");
    assert!(s.wait_log("redirects are not followed", 5 * SECS));
    assert!(
        s.log().iter().any(|l| l.contains(&target)),
        "the Location is named"
    );
    w.disconnect();
    p.disconnect();
    s.assert_clean_log();
}

// ---------------------------------------------------------------------------------------------
// One nonce's working memory is part of the model-size check

/// Roughly what the CPU check asks for `p` in the server's f16 (a little more: the pool and
/// one nonce together).
fn cpu_need(p: &Value) -> u64 {
    let params = llama_pow::pow::request::parse_params(p).unwrap();
    let f16 = llama_pow::pow::dtype::Dtype::F16;
    let weights = llama_pow::backend::cpu::model_bytes(&params, f16);
    weights + llama_pow::backend::cpu::working_bytes_per_nonce(&params)
}

fn mem_available() -> u64 {
    llama_pow::backend::cpu::mem_available_bytes().unwrap()
}

#[test]
fn params_whose_one_nonce_does_not_fit_are_refused_everywhere() {
    // One layer, 15.6 GB of weights, 30 GB of working memory per nonce.
    let mut huge = json!({"dim": 16384, "n_layers": 1, "n_heads": 128, "n_kv_heads": 128,
                          "vocab_size": 8192, "seq_len": 32768});
    if cpu_need(&huge) < 2 * mem_available() {
        // A machine this large: twice the width.
        huge = json!({"dim": 32768, "n_layers": 1, "n_heads": 256, "n_kv_heads": 256,
                      "vocab_size": 8192, "seq_len": 32768});
    }
    if cpu_need(&huge) < 2 * mem_available() {
        println!("SKIPPED: this machine has room for a 120 GB nonce");
        return;
    }
    let s = Server::start(&[
        "--warmup-poll-seconds",
        "0.1",
        "--pooled-poll-seconds",
        "0.1",
    ]);
    let idle = s.memory("VmRSS");
    let check = |msg: &str| {
        for want in [
            "params:",
            "seq_len 32768",
            "working memory for one nonce",
            "of memory is available",
        ] {
            assert!(msg.contains(want), "{want:?} in {msg}");
        }
    };

    let mut req = generate_request(10.0, 1, 0);
    req["params"] = huge.clone();
    let (status, v) = post(s.port, "/generate", &req);
    assert_eq!(status, 400, "{v}");
    check(v["error"].as_str().unwrap());

    let params = req.clone();
    let cb = Stub::start(move |r| match r.path.as_str() {
        "/warmup/params" => ok(json!({"status": "ready", "params": params.clone()})),
        _ => ok(json!({"status": "ok"})),
    });
    let w = post_stream(
        s.port,
        "/warmup",
        &json!({"callback_url": cb.url(), "job_id": "huge"}),
    );
    let lines = w.collect(20 * SECS);
    let err = lines.last().unwrap();
    assert_eq!(err["error_type"], "ValidationError", "{lines:?}");
    check(err["error"].as_str().unwrap());

    let config = json!({"block_hash": BLOCK_HASH, "block_height": 5, "r_target": 10.0,
                        "params": huge});
    let orch = Stub::start(move |r| {
        if r.path.ends_with("/config") {
            return ok(config.clone());
        }
        ok(json!({"status": "ok"}))
    });
    let p = post_stream(s.port, "/pooled", &json!({"orchestrator_url": orch.url()}));
    let lines = p.collect(20 * SECS);
    let err = lines
        .iter()
        .find(|l| l["error_type"] == "ValidationError")
        .unwrap_or_else(|| panic!("{lines:?}"));
    check(err["error"].as_str().unwrap());

    let peak = s.memory("VmHWM");
    println!(
        "a nonce of {:.1} GiB: refused three ways, peak RSS {:.1} MB (idle {:.1} MB)",
        cpu_need(&req["params"]) as f64 / (1u64 << 30) as f64,
        mb(peak),
        mb(idle)
    );
    assert!(peak < idle + 64 * MB, "peak {peak} from {idle}");
    assert!(!s.busy());
    s.assert_clean_log();
}

// ---------------------------------------------------------------------------------------------
// Stops act inside a batch

/// 64 thin layers: a batch of many nonces takes many seconds on the CPU, one of its layers a
/// 64th of that.
fn slow_request(batch_size: u64) -> Value {
    let mut r = generate_request(10.0, batch_size, 0);
    r["params"] = json!({"dim": 128, "n_layers": 64, "n_heads": 2, "n_kv_heads": 2,
                         "vocab_size": 64, "multiple_of": 128, "seq_len": 512});
    r
}

/// Wait until `s` has logged `nth` jobs' models as ready.
fn model_ready(s: &Server, nth: usize) {
    assert!(
        wait_until(60 * SECS, || s
            .log()
            .iter()
            .filter(|l| l.contains("model ready"))
            .count()
            >= nth),
        "{:#?}",
        s.log()
    );
}

#[test]
fn preemption_disconnect_time_limit_and_sigterm_act_inside_a_batch() {
    let mut s = Server::start(&["--max-job-seconds", "4"]);
    // How long a batch of sixteen takes here: one nonce, timed, on the server itself.
    let one = post_stream(s.port, "/generate", &slow_request(1));
    let first = one.next(120 * SECS).expect("a line for the first nonce");
    assert_eq!(first["batch_computed"], 1);
    model_ready(&s, 1);
    let t = Instant::now();
    let second = one.next(60 * SECS).expect("a second line");
    let per_nonce = t.elapsed();
    assert_eq!(second["batch_computed"], 1);
    // Batches of at least 12 s (and 16 nonces), far past the time limit.
    let n = ((12.0 / per_nonce.as_secs_f64()).ceil() as u64).clamp(16, 400);
    let batch = per_nonce * n as u32;
    one.disconnect();
    assert!(wait_until(30 * SECS, || !s.busy()));

    // Preemption: a newer request while a long batch computes.
    let a = post_stream(s.port, "/generate", &slow_request(n));
    model_ready(&s, 2);
    thread::sleep(SECS);
    let t0 = Instant::now();
    let b = post_stream(s.port, "/generate", &slow_request(n));
    let lines = a.collect(batch + 30 * SECS);
    let preempted_after = t0.elapsed();
    assert_eq!(
        lines.last().unwrap()["error_type"],
        "Preempted",
        "{lines:?}"
    );
    assert!(
        lines.iter().all(|l| l.get("nonces").is_none()),
        "the batch in flight is dropped: {lines:?}"
    );

    // The time limit (4 s) of the newer one, whose first batch would take far longer.
    model_ready(&s, 3);
    let t1 = Instant::now();
    let lines = b.collect(batch + 30 * SECS);
    let limit_after = t1.elapsed();
    assert!(lines.is_empty(), "no batch finished in time: {lines:?}");

    // A client that goes away.
    let c = post_stream(s.port, "/generate", &slow_request(n));
    model_ready(&s, 4);
    thread::sleep(SECS);
    let t2 = Instant::now();
    c.disconnect();
    assert!(wait_until(batch + 30 * SECS, || !s.busy()));
    let gone_after = t2.elapsed();

    // SIGTERM: the stream ends with the shutdown line, the process exits.
    let d = post_stream(s.port, "/generate", &slow_request(n));
    model_ready(&s, 5);
    thread::sleep(SECS);
    let t3 = Instant::now();
    s.terminate();
    let lines = d.collect(batch + 30 * SECS);
    let shutdown_after = t3.elapsed();
    assert_eq!(lines.last().unwrap()["error_type"], "Shutdown", "{lines:?}");
    let status = s.wait_exit(30 * SECS).expect("the server exits");
    assert!(status.success(), "{status:?}");
    let exited_after = t3.elapsed();

    println!(
        "a nonce takes {per_nonce:.2?}, a batch of {n} about {batch:.2?}: preempted after \
         {preempted_after:.2?}, time limit 4 s reached after {limit_after:.2?}, client gone \
         stopped after {gone_after:.2?}, SIGTERM: shutdown line after {shutdown_after:.2?}, \
         exit after {exited_after:.2?}"
    );
    // Each well within the batch they interrupted (about a 64th of it when the cores are
    // free).
    for (what, took) in [
        ("preemption", preempted_after),
        ("disconnect", gone_after),
        ("SIGTERM", shutdown_after),
    ] {
        assert!(
            took < batch / 3,
            "{what} took {took:?}, the batch {batch:?}"
        );
    }
    assert!(
        limit_after < 4 * SECS + batch / 3,
        "{limit_after:?}, the batch {batch:?}"
    );
    s.assert_clean_log();
}

// ---------------------------------------------------------------------------------------------
// Request bodies that trickle in

/// `n` connections that each send a /generate head announcing a 100 kB body and then one
/// byte of it per second.
struct Tricklers {
    socks: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Tricklers {
    fn open(port: u16, n: usize) -> Tricklers {
        let mut socks = Vec::new();
        for _ in 0..n {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            let head = format!(
                "POST /generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: \
                 application/json\r\nContent-Length: 100000\r\n\r\n{{"
            );
            s.write_all(head.as_bytes()).unwrap();
            socks.push(s);
        }
        let socks = Arc::new(Mutex::new(socks));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (socks, stop) = (socks.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    for s in socks.lock().unwrap().iter_mut() {
                        let _ = s.write_all(b" ");
                    }
                    thread::sleep(SECS);
                }
            });
        }
        Tricklers { socks, stop }
    }

    /// How many have been answered (a 408) or closed by the server.
    fn ended(&self) -> usize {
        let mut n = 0;
        for s in self.socks.lock().unwrap().iter_mut() {
            let mut buf = [0u8; 512];
            match s.read(&mut buf) {
                Ok(0) => n += 1,
                Ok(k) => {
                    let text = String::from_utf8_lossy(&buf[..k]);
                    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
                    n += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => n += 1,
            }
        }
        n
    }
}

impl Drop for Tricklers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// How long GET /health takes.
fn health_latency(port: u16) -> Duration {
    let t0 = Instant::now();
    let (status, v) = request(port, "GET", "/health", None);
    assert_eq!(status, 200, "{v}");
    t0.elapsed()
}

#[test]
fn health_answers_while_500_bodies_trickle_in_and_they_are_cut_off() {
    let s = Server::start(&["--body-timeout-seconds", "3"]);
    let t0 = Instant::now();
    let slow = Tricklers::open(s.port, 500);
    let lat: Vec<Duration> = (0..5)
        .map(|_| {
            thread::sleep(Duration::from_millis(200));
            health_latency(s.port)
        })
        .collect();
    let worst = *lat.iter().max().unwrap();
    // Every one of them is answered 408 (or closed) once its body is 3 s late.
    let mut ended = 0;
    assert!(
        wait_until(20 * SECS, || {
            ended = ended.max(slow.ended());
            ended == 500
        }),
        "{ended} of 500 cut off"
    );
    let cut_after = t0.elapsed();
    println!(
        "500 trickling bodies: /health answered in {lat:.2?} (worst {worst:.2?}); all cut off \
         after {cut_after:.2?}"
    );
    assert!(worst < SECS, "{lat:?}");
    assert!(cut_after < 15 * SECS);
    // The server is none the worse.
    assert!(health_latency(s.port) < SECS);
    s.assert_clean_log();
}

#[test]
fn connections_stay_below_the_open_file_limit() {
    // 256 files: the server serves at most 192 connections at once, and the rest wait.
    let s = Server::start_with_file_limit(&["--body-timeout-seconds", "2"], 256);
    let slow = Tricklers::open(s.port, 400);
    let most = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let (m, pid_files) = (most.clone(), format!("/proc/{}/fd", s.pid()));
    let watcher = thread::spawn(move || {
        while t0.elapsed() < 12 * SECS {
            let n = std::fs::read_dir(&pid_files)
                .map(|d| d.count())
                .unwrap_or(0);
            m.fetch_max(n, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(20));
        }
    });
    // /health waits behind them, but it is answered once the body timeout frees room.
    let (status, _) = request(s.port, "GET", "/health", None);
    let answered_after = t0.elapsed();
    assert_eq!(status, 200);
    watcher.join().unwrap();
    let most = most.load(Ordering::SeqCst);
    println!(
        "400 trickling bodies, 256 files: at most {most} open, /health answered after \
         {answered_after:.2?}; {} cut off",
        slow.ended()
    );
    assert!(most < 256, "{most} files open");
    assert!(answered_after < 15 * SECS);
    assert!(!s
        .log()
        .iter()
        .any(|l| l.contains("Too many open files") || l.contains("os error 24")));
    s.assert_clean_log();
}

// ---------------------------------------------------------------------------------------------
// Working memory after a job

#[test]
fn idle_memory_after_a_job_is_the_cached_model_and_little_more() {
    // One layer of dim 1024: 50 MB of weights, held in f16 (the default dtype); about 100 MB
    // of working memory per nonce.
    let mut req = generate_request(10.0, 2, 0);
    req["params"] = json!({"dim": 1024, "n_layers": 1, "n_heads": 8, "n_kv_heads": 8,
                           "vocab_size": 8192, "seq_len": 2048});
    let params = llama_pow::pow::request::parse_params(&req["params"]).unwrap();
    let weights = {
        let total = llama_pow::pow::weights::total_params(&params);
        2 * (total - 8192 * 1024)
    };
    let s = Server::start(&["--max-job-seconds", "3"]);
    let before = s.memory("VmRSS");
    let st = post_stream(s.port, "/generate", &req);
    let lines = st.collect(120 * SECS);
    assert!(!lines.is_empty(), "batches were computed");
    assert!(wait_until(10 * SECS, || !s.busy()));
    thread::sleep(Duration::from_millis(500));
    let idle = s.memory("VmRSS");
    let peak = s.memory("VmHWM");
    println!(
        "after a job: idle RSS {:.1} MB (before {:.1} MB, cached model {:.1} MB), peak {:.1} MB",
        mb(idle),
        mb(before),
        mb(weights),
        mb(peak)
    );
    // The job did hold its buffers (two nonces' worth) while it ran...
    assert!(peak > before + weights + 200 * MB, "peak {peak}");
    // ...and gave them back.
    assert!(
        idle <= before + weights + 64 * MB,
        "idle {idle}, before {before}, model {weights}"
    );
    s.assert_clean_log();
}

// ---------------------------------------------------------------------------------------------
// SIGHUP

#[test]
fn sighup_ends_a_pooled_session_as_sigterm_does() {
    let shutdowns = Arc::new(Mutex::new(Vec::new()));
    let results = Arc::new(AtomicUsize::new(0));
    let (notices, delivered) = (shutdowns.clone(), results.clone());
    let orch = Stub::start(move |r| {
        let p = r.path.as_str();
        if p.ends_with("/config") {
            return ok(
                json!({"block_hash": BLOCK_HASH, "block_height": 5, "r_target": 10.0,
                             "params": tiny_params(), "batch_size": 4}),
            );
        }
        if p.ends_with("/ready") {
            return ok(
                json!({"public_key": "pk-h", "nonce_range_start": 0, "nonce_range_end": 9_999_999}),
            );
        }
        if p.ends_with("/results") || p.ends_with("/results/batch") {
            delivered.fetch_add(1, Ordering::SeqCst);
        }
        if p.ends_with("/shutdown") {
            notices.lock().unwrap().push(r.body.clone());
        }
        ok(json!({"status": "ok"}))
    });
    let mut s = Server::start(&[
        "--pooled-poll-seconds",
        "0.05",
        "--shutdown-grace-seconds",
        "10",
    ]);
    let st = post_stream(s.port, "/pooled", &json!({"orchestrator_url": orch.url()}));
    st.until(10 * SECS, |l| l["status"] == "computing");
    assert!(wait_until(10 * SECS, || results.load(Ordering::SeqCst) >= 3));
    s.signal(libc::SIGHUP);
    let rest = st.collect(15 * SECS);
    let last = rest.last().unwrap();
    assert_eq!(last["status"], "shutdown", "{rest:?}");
    assert_eq!(last["reason"], "server shutting down");
    assert_eq!(last["pending_results"], 0);
    let status = s.wait_exit(15 * SECS).expect("the server exits");
    assert!(status.success(), "{status:?}");
    let notices = shutdowns.lock().unwrap();
    assert_eq!(notices.len(), 1, "the orchestrator was told");
    assert_eq!(notices[0]["stats"]["pending_results"], 0);
    assert!(s.log().iter().any(|l| l.contains("SIGHUP received")));
    s.assert_clean_log();
}

// ---------------------------------------------------------------------------------------------
// Messages

#[test]
fn bad_requests_say_everything_that_is_wrong_once() {
    let s = Server::start(&[]);
    let (status, v) = post(s.port, "/generate", &json!({"r_target": 1.4}));
    assert_eq!(status, 400);
    assert_eq!(
        v["error"],
        "block_hash, block_height, public_key, batch_size, start_nonce, params: missing \
         required fields"
    );
    let (status, headers, body) = request_raw(s.port, "PUT", "/health", None);
    assert_eq!(status, 405);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["error"],
        "method not allowed: this endpoint takes GET and POST"
    );
    assert!(headers
        .iter()
        .any(|(k, v)| k == "allow" && v.contains("GET") && v.contains("POST")));
    let mut req = generate_request(1.4, 1, 0);
    req["params"]["dim"] = json!(u64::MAX);
    let (status, v) = post(s.port, "/generate", &req);
    assert_eq!(status, 400);
    assert_eq!(
        v["error"],
        "params.dim: must be at most 65536 (got 18446744073709551615)"
    );
    s.assert_clean_log();
}
