//! Figures of `llama-pow serve`, measured against the release binary on loopback:
//!
//! - `health`: /health latency (p50 / p99 / max) at a fixed request rate from a few
//!   keep-alive connections, while a /generate job keeps every core busy. Latency is counted
//!   from each request's scheduled send time, so a stalled server is not hidden.
//! - `first-line`: time from POST /generate to the first NDJSON line (batch of one nonce), for
//!   a model that is not built yet and then for the same model again (cached), for the golden
//!   tiny, v2_shaped and deep64 shapes.
//! - `pooled-rss`: resident memory of a /pooled session whose orchestrator stops answering
//!   (connections refused) for a while, sampled every second, and whether every result
//!   arrives once it is back.
//!
//! `cargo build --release && cargo run --release --example serve_figures -- all`
//! Options: `--bin PATH` (default target/release/llama-pow), `--rate N` (500), `--seconds N`
//! (10), `--down-seconds N` (60), `--dim N` (256: the width of the 4-layer model the /health
//! figure's background job computes; 64 selects the golden tiny shape).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const BLOCK_HASH: &str = "5f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";

struct Opts {
    bin: String,
    rate: f64,
    seconds: f64,
    down_seconds: f64,
    dim: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = Opts {
        bin: "target/release/llama-pow".into(),
        rate: 500.0,
        seconds: 10.0,
        down_seconds: 60.0,
        dim: 256,
    };
    let mut what = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().expect("a value").clone();
        match a.as_str() {
            "--bin" => opts.bin = val(),
            "--rate" => opts.rate = val().parse().unwrap(),
            "--seconds" => opts.seconds = val().parse().unwrap(),
            "--down-seconds" => opts.down_seconds = val().parse().unwrap(),
            "--dim" => opts.dim = val().parse().unwrap(),
            other => what.push(other.to_owned()),
        }
    }
    if what.is_empty() || what.iter().any(|w| w == "all") {
        what = vec!["health".into(), "first-line".into(), "pooled-rss".into()];
    }
    for w in what {
        match w.as_str() {
            "health" => health(&opts),
            "first-line" => first_line(&opts),
            "pooled-rss" => pooled_rss(&opts),
            other => panic!("unknown figure {other:?}: health, first-line, pooled-rss or all"),
        }
    }
}

fn params(dim: u64) -> String {
    if dim == 64 {
        r#"{"dim":64,"n_layers":2,"n_heads":4,"n_kv_heads":4,"vocab_size":100,"ffn_dim_multiplier":1.3,"multiple_of":32,"norm_eps":1e-05,"rope_theta":10000.0,"seq_len":8}"#.into()
    } else {
        format!(
            r#"{{"dim":{dim},"n_layers":4,"n_heads":8,"n_kv_heads":8,"vocab_size":1000,"multiple_of":256,"seq_len":32}}"#
        )
    }
}

fn generate_body(block_hash: &str, dim: u64, batch: u64) -> String {
    format!(
        r#"{{"block_hash":"{block_hash}","block_height":1,"public_key":"figures","r_target":1.4,"batch_size":{batch},"start_nonce":0,"params":{}}}"#,
        params(dim)
    )
}

// ---------------------------------------------------------------------------------------------

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(bin: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(bin)
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}): build it with cargo build --release")
            });
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut port = 0;
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(p) = line.split("listening on 127.0.0.1:").nth(1) {
                    port = p.trim().parse().unwrap_or(0);
                }
                if line == "Application startup complete." {
                    let _ = tx.send(port);
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server ready");
        Server { child, port }
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POST a body and hand back a reader positioned at the start of the (chunked) body.
fn post_stream(port: u16, path: &str, body: &str) -> (TcpStream, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l == "\r\n" || l.is_empty() {
            break;
        }
    }
    (s, r)
}

/// The next NDJSON line of a chunked body (chunks are whole lines here).
fn next_line(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut size = String::new();
    r.read_line(&mut size).ok()?;
    let n = usize::from_str_radix(size.trim(), 16).ok()?;
    if n == 0 {
        return None;
    }
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

// ---------------------------------------------------------------------------------------------

fn health(o: &Opts) {
    let server = Server::start(&o.bin, &["--max-job-seconds", "600"]);
    let port = server.port;
    // A job that keeps every core busy, read and discarded on its own thread.
    let (job_sock, mut job_r) =
        post_stream(port, "/generate", &generate_body(BLOCK_HASH, o.dim, 8));
    let lines = Arc::new(Mutex::new(0u64));
    {
        let lines = lines.clone();
        thread::spawn(move || {
            while next_line(&mut job_r).is_some() {
                *lines.lock().unwrap() += 1;
            }
        });
    }
    thread::sleep(Duration::from_millis(500));
    let conns = 4;
    let per_conn = o.rate / conns as f64;
    let total = Duration::from_secs_f64(o.seconds);
    let start = Instant::now() + Duration::from_millis(100);
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_nodelay(true).unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut lat = Vec::new();
                let interval = Duration::from_secs_f64(1.0 / per_conn);
                let mut k = 0u32;
                loop {
                    // Stagger the connections across one interval.
                    let due = start + interval * k + interval.mul_f64(c as f64 / conns as f64);
                    if due >= start + total {
                        break;
                    }
                    let now = Instant::now();
                    if due > now {
                        thread::sleep(due - now);
                    }
                    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                        .unwrap();
                    let mut len = 0usize;
                    loop {
                        let mut l = String::new();
                        r.read_line(&mut l).unwrap();
                        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        if l == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    lat.push(due.elapsed().as_secs_f64() * 1000.0);
                    k += 1;
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<f64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let busy_lines = *lines.lock().unwrap();
    let _ = job_sock.shutdown(Shutdown::Both);
    println!(
        "{{\"figure\":\"health_latency_under_load\",\"requests\":{},\"rate_per_s\":{},\"seconds\":{},\
         \"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3},\"job_lines_meanwhile\":{busy_lines},\"job_dim\":{}}}",
        lat.len(),
        o.rate,
        o.seconds,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
        o.dim
    );
}

/// The golden shapes by name (tiny: 2 layers of dim 64; v2_shaped: dim 224, FFN 8192,
/// vocab 8196; deep64: v2_shaped with 64 layers, 369 M parameters).
fn named_params(name: &str) -> String {
    let path = format!(
        "{}/tests/golden/{name}_f16.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let start = text.find("\"params\": ").expect("params") + "\"params\": ".len();
    let end = start + text[start..].find('}').expect("end of params") + 1;
    text[start..end].to_owned()
}

fn first_line(o: &Opts) {
    let server = Server::start(&o.bin, &["--max-job-seconds", "600"]);
    for model in ["tiny", "v2_shaped", "deep64"] {
        let params = named_params(model);
        // A block hash no earlier run used: the first request builds the model.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let hash = format!("{nanos:064x}");
        let body = format!(
            r#"{{"block_hash":"{hash}","block_height":1,"public_key":"figures","r_target":10.0,"batch_size":1,"start_nonce":0,"params":{params}}}"#
        );
        for label in ["uncached", "cached"] {
            let t = Instant::now();
            let (s, mut r) = post_stream(server.port, "/generate", &body);
            let line = next_line(&mut r).expect("a line");
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            assert!(line.contains("\"nonces\""), "{line}");
            let _ = s.shutdown(Shutdown::Both);
            println!(
                "{{\"figure\":\"first_line\",\"model\":\"{model}\",\"build\":\"{label}\",\"ms\":{ms:.2}}}"
            );
            // Let the job see the disconnect before the next request (else it preempts).
            thread::sleep(Duration::from_millis(500));
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// A stub orchestrator: registers, hands out one long range, accepts results unless down.
struct Orch {
    accepted: BTreeSet<u64>,
    duplicates: u64,
    results: u64,
}

fn pooled_rss(o: &Opts) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let down = Arc::new(AtomicBool::new(false));
    let orch = Arc::new(Mutex::new(Orch {
        accepted: BTreeSet::new(),
        duplicates: 0,
        results: 0,
    }));
    {
        let (down, orch) = (down.clone(), orch.clone());
        thread::spawn(move || stub_orchestrator(listener, port, down, orch));
    }
    let server = Server::start(
        &o.bin,
        &[
            "--pooled-max-seconds",
            "100000",
            "--client-timeout-seconds",
            "2",
            "--pooled-max-backlog",
            "1000",
        ],
    );
    let body = format!(r#"{{"orchestrator_url":"http://127.0.0.1:{port}"}}"#);
    let (sock, mut r) = post_stream(server.port, "/pooled", &body);
    thread::spawn(move || while next_line(&mut r).is_some() {});
    thread::sleep(Duration::from_secs(3));
    let before = server.rss_kib();
    let accepted_before = orch.lock().unwrap().accepted.len();
    down.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let mut max = before;
    let mut samples = Vec::new();
    while t.elapsed() < Duration::from_secs_f64(o.down_seconds) {
        thread::sleep(Duration::from_secs(1));
        let rss = server.rss_kib();
        max = max.max(rss);
        samples.push(rss);
    }
    down.store(false, Ordering::SeqCst);
    thread::sleep(Duration::from_secs(8));
    let after = server.rss_kib();
    let _ = sock.shutdown(Shutdown::Both);
    thread::sleep(Duration::from_secs(2));
    let g = orch.lock().unwrap();
    let contiguous = g.accepted.iter().copied().eq(0..g.accepted.len() as u64);
    println!(
        "{{\"figure\":\"pooled_rss_orchestrator_down\",\"down_seconds\":{},\"rss_kib_before\":{before},\
         \"rss_kib_max_while_down\":{max},\"rss_kib_after\":{after},\"rss_kib_samples\":{:?},\
         \"nonces_accepted_before_down\":{accepted_before},\"nonces_accepted_total\":{},\
         \"duplicates\":{},\"contiguous_from_0\":{contiguous}}}",
        o.down_seconds,
        samples,
        g.accepted.len(),
        g.duplicates
    );
}

fn stub_orchestrator(
    listener: TcpListener,
    port: u16,
    down: Arc<AtomicBool>,
    orch: Arc<Mutex<Orch>>,
) {
    let mut listener = Some(listener);
    loop {
        if down.load(Ordering::SeqCst) {
            listener = None;
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        if listener.is_none() {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => listener = Some(l),
                Err(_) => {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
            listener.as_ref().unwrap().set_nonblocking(true).unwrap();
        }
        let l = listener.as_ref().unwrap();
        l.set_nonblocking(true).unwrap();
        match l.accept() {
            Ok((s, _)) => {
                let orch = orch.clone();
                thread::spawn(move || answer(s, orch));
            }
            Err(_) => thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn answer(s: TcpStream, orch: Arc<Mutex<Orch>>) {
    s.set_nonblocking(false).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut first = String::new();
    if r.read_line(&mut first).unwrap_or(0) == 0 {
        return;
    }
    let path = first.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut len = 0;
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
            break;
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    let _ = r.read_exact(&mut body);
    let body = String::from_utf8_lossy(&body);
    let reply = if path.ends_with("/config") {
        format!(
            r#"{{"block_hash":"{BLOCK_HASH}","block_height":1,"r_target":10.0,"batch_size":8,"params":{}}}"#,
            params(64)
        )
    } else if path.ends_with("/ready") {
        r#"{"public_key":"figures","nonce_range_start":0,"nonce_range_end":1000000000}"#.to_owned()
    } else if path.ends_with("/results") || path.ends_with("/results/batch") {
        let mut g = orch.lock().unwrap();
        // Every result carries its nonces after "nonces":[ ... ].
        for part in body.split("\"nonces\":[").skip(1) {
            g.results += 1;
            let list = part.split(']').next().unwrap_or("");
            for n in list.split(',').filter_map(|x| x.trim().parse::<u64>().ok()) {
                if !g.accepted.insert(n) {
                    g.duplicates += 1;
                }
            }
        }
        r#"{"status":"ok"}"#.to_owned()
    } else {
        r#"{"status":"ok"}"#.to_owned()
    };
    let _ = write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    );
}
