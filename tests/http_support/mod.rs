//! Shared helpers of the HTTP tests: the server binary on a free loopback port, a raw
//! HTTP/1.1 client that reads NDJSON line by line, and a scriptable stub server that plays
//! the warmup callback or the orchestrator (and can stop listening to refuse connections).
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const READY_LINE: &str = "Application startup complete.";
pub const FATAL_MARKERS: [&str; 5] = [
    "Traceback (most recent call last):",
    "Error:",
    "CUDA error",
    "RuntimeError:",
    "OutOfMemoryError",
];

pub fn golden(name: &str) -> Value {
    let path = format!("{}/tests/golden/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The tiny golden model's parameters (2 layers, dim 64): milliseconds per batch on a CPU.
pub fn tiny_params() -> Value {
    golden("tiny_f16")["params"].clone()
}

pub const BLOCK_HASH: &str = "5f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";

/// A complete /generate request on the tiny model.
pub fn generate_request(r_target: f64, batch_size: u64, start_nonce: u64) -> Value {
    json!({
        "block_hash": BLOCK_HASH,
        "block_height": 7,
        "public_key": "gonka1testkey",
        "r_target": r_target,
        "batch_size": batch_size,
        "start_nonce": start_nonce,
        "params": tiny_params(),
    })
}

// ---------------------------------------------------------------------------------------------
// The server under test

pub struct Server {
    child: Child,
    pub port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Start `llama-pow serve` on a free loopback port with `extra` options and wait until it
    /// prints the ready line.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_with_env(extra, &[])
    }

    /// [`Server::start`] with these environment variables set for the server.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_with(extra, env, None)
    }

    /// [`Server::start`] with the server's open-file limit (soft and hard) set to `files`.
    pub fn start_with_file_limit(extra: &[&str], files: u64) -> Server {
        Self::start_with(extra, &[], Some(files))
    }

    fn start_with(extra: &[&str], env: &[(&str, &str)], file_limit: Option<u64>) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llama-pow"));
        if let Some(files) = file_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs in the child between fork and exec and only calls
            // setrlimit(2), which is async-signal-safe, on a limit struct on its own stack.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: files as libc::rlim_t,
                        rlim_max: files as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(extra)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .env("LLAMA_POW_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start the server binary");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = mpsc::channel();
        for (i, pipe) in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ]
        .into_iter()
        .enumerate()
        {
            let log = log.clone();
            let port_tx = port_tx.clone();
            thread::spawn(move || {
                let mut port = None;
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
                        port = rest.trim().parse::<u16>().ok();
                    }
                    let ready = line == READY_LINE;
                    log.lock().unwrap().push(line);
                    if i == 0 && ready {
                        let _ = port_tx.send(port);
                    }
                }
                let _ = port_tx.send(None);
            });
        }
        let port = port_rx
            .recv_timeout(Duration::from_secs(20))
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("the server did not get ready: {:?}", log.lock().unwrap()));
        Server { child, port, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Wait until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().iter().any(|l| l.contains(needle)))
    }

    /// The ready line exactly once and no line the PyWorker would take for a fatal error.
    pub fn assert_clean_log(&self) {
        let log = self.log();
        assert_eq!(
            log.iter().filter(|l| *l == READY_LINE).count(),
            1,
            "{log:#?}"
        );
        for l in &log {
            for m in FATAL_MARKERS {
                assert!(!l.contains(m), "log line with {m:?}: {l}");
            }
        }
    }

    pub fn health(&self) -> Value {
        let (status, v) = request(self.port, "GET", "/health", None);
        assert_eq!(status, 200);
        v
    }

    pub fn busy(&self) -> bool {
        self.health()["busy"].as_bool().unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send SIGTERM to the server (a child this test started).
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Send `sig` to the server (a child this test started).
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) with a PID we own (our child, not yet reaped) and a valid signal
        // number has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill");
    }

    /// A memory figure of the server process from /proc/PID/status, in bytes: `VmRSS` (now)
    /// or `VmHWM` (the peak so far).
    pub fn memory(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"));
        let kib: u64 = line[field.len() + 1..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        kib * 1024
    }

    /// Open files of the server process.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::env::var_os("HTTP_TEST_SHOW_LOG").is_some() {
            eprintln!("---- server log ----\n{}", self.log().join("\n"));
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client

fn write_request(sock: &mut TcpStream, port: u16, method: &str, path: &str, body: Option<&[u8]>) {
    let body = body.unwrap_or(b"");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).unwrap();
    sock.write_all(body).unwrap();
}

/// Status and headers (lower-case names).
fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    (status, headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Read a chunked body chunk by chunk, handing each to `f` (false from `f` stops).
fn read_chunked(r: &mut impl BufRead, mut f: impl FnMut(&[u8]) -> bool) {
    loop {
        let mut size = String::new();
        if r.read_line(&mut size).unwrap_or(0) == 0 {
            return;
        }
        let Ok(n) = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16) else {
            return;
        };
        if n == 0 {
            return;
        }
        let mut buf = vec![0u8; n + 2];
        if r.read_exact(&mut buf).is_err() {
            return;
        }
        if !f(&buf[..n]) {
            return;
        }
    }
}

fn read_body(r: &mut impl BufRead, headers: &[(String, String)]) -> Vec<u8> {
    let mut body = Vec::new();
    if header(headers, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        read_chunked(r, |c| {
            body.extend_from_slice(c);
            true
        });
    } else if let Some(n) = header(headers, "content-length").and_then(|v| v.parse::<usize>().ok())
    {
        body.resize(n, 0);
        r.read_exact(&mut body).unwrap();
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    body
}

/// One request, the whole answer: status and JSON body (Null when not JSON).
pub fn request(port: u16, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
    let (status, _, body) = request_raw(port, method, path, body);
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

pub fn request_raw(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write_request(&mut sock, port, method, path, body);
    let mut r = BufReader::new(sock);
    let (status, headers) = read_head(&mut r);
    let body = read_body(&mut r, &headers);
    (status, headers, body)
}

pub fn post(port: u16, path: &str, body: &Value) -> (u16, Value) {
    request(port, "POST", path, Some(body.to_string().as_bytes()))
}

/// A streaming answer read line by line on its own thread.
pub struct NdStream {
    pub status: u16,
    pub content_type: String,
    lines: mpsc::Receiver<Value>,
    sock: TcpStream,
    pub started: Instant,
}

pub fn post_stream(port: u16, path: &str, body: &Value) -> NdStream {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let started = Instant::now();
    write_request(
        &mut sock,
        port,
        "POST",
        path,
        Some(body.to_string().as_bytes()),
    );
    let mut r = BufReader::new(sock.try_clone().unwrap());
    let (status, headers) = read_head(&mut r);
    let content_type = header(&headers, "content-type").unwrap_or("").to_owned();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut pending = Vec::new();
        let mut emit = |c: &[u8]| {
            pending.extend_from_slice(c);
            while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                let v: Value = serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!("not a JSON line ({e}): {}", String::from_utf8_lossy(&line))
                });
                if tx.send(v).is_err() {
                    return false;
                }
            }
            true
        };
        if header(&headers, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            read_chunked(&mut r, emit);
        } else {
            let body = read_body(&mut r, &headers);
            emit(&body);
        }
    });
    NdStream {
        status,
        content_type,
        lines: rx,
        sock,
        started,
    }
}

impl NdStream {
    /// The next line, or None when the stream ended or nothing came within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Value> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Every line until the stream ends (panics after `timeout`).
    pub fn collect(&self, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => out.push(v),
                Err(mpsc::RecvTimeoutError::Disconnected) => return out,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("stream still open after {timeout:?}; got {out:?}")
                }
            }
        }
    }

    /// Read lines until one satisfies `f`; every line read, that one last.
    pub fn until(&self, timeout: Duration, mut f: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    let done = f(&v);
                    out.push(v);
                    if done {
                        return out;
                    }
                }
                Err(e) => panic!("no matching line ({e:?}); got {out:?}"),
            }
        }
    }

    /// Close the connection as a client that gives up would.
    pub fn disconnect(self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

// ---------------------------------------------------------------------------------------------
// A stub server

/// A request the stub received.
#[derive(Debug, Clone)]
pub struct StubRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
}

/// How the stub answers.
pub enum Reply {
    Json(u16, Value),
    /// Say nothing for this long, then close (a client with a shorter timeout gives up).
    Hang(Duration),
    /// 200 with a chunked body that never ends (a JSON string that never closes), for as
    /// long as the client reads.
    Endless,
    /// This 3xx status with this Location.
    Redirect(u16, String),
}

pub fn ok(v: Value) -> Reply {
    Reply::Json(200, v)
}

type Handler = dyn Fn(&StubRequest) -> Reply + Send + Sync;

pub struct Stub {
    pub port: u16,
    listening: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    pub requests: Arc<Mutex<Vec<StubRequest>>>,
}

impl Stub {
    pub fn start(handler: impl Fn(&StubRequest) -> Reply + Send + Sync + 'static) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let listening = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        {
            let (listening, stop, requests) = (listening.clone(), stop.clone(), requests.clone());
            thread::spawn(move || {
                accept_loop(Some(listener), port, listening, stop, requests, handler)
            });
        }
        Stub {
            port,
            listening,
            stop,
            requests,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stop listening: connections are refused until [`Stub::listen`].
    pub fn refuse(&self) {
        self.listening.store(false, Ordering::SeqCst);
        // Let the accept loop drop the listener.
        thread::sleep(Duration::from_millis(30));
    }

    pub fn listen(&self) {
        self.listening.store(true, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(30));
    }

    pub fn requests_to(&self, path_suffix: &str) -> Vec<StubRequest> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path.ends_with(path_suffix))
            .cloned()
            .collect()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(
    mut listener: Option<TcpListener>,
    port: u16,
    listening: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<StubRequest>>>,
    handler: Arc<Handler>,
) {
    if let Some(l) = &listener {
        l.set_nonblocking(true).unwrap();
    }
    while !stop.load(Ordering::SeqCst) {
        let want = listening.load(Ordering::SeqCst);
        if !want && listener.is_some() {
            listener = None;
        }
        if want && listener.is_none() {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => {
                    l.set_nonblocking(true).unwrap();
                    listener = Some(l);
                }
                Err(_) => {
                    thread::sleep(Duration::from_millis(5));
                    continue;
                }
            }
        }
        let Some(l) = &listener else {
            thread::sleep(Duration::from_millis(2));
            continue;
        };
        match l.accept() {
            Ok((sock, _)) => {
                let (requests, handler) = (requests.clone(), handler.clone());
                thread::spawn(move || serve_one(sock, requests, handler));
            }
            Err(_) => thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn serve_one(sock: TcpStream, requests: Arc<Mutex<Vec<StubRequest>>>, handler: Arc<Handler>) {
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut w = sock.try_clone().unwrap();
    let mut r = BufReader::new(sock);
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("").to_owned();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (target.clone(), String::new()),
    };
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let has_body = header(&headers, "content-length").is_some()
        || header(&headers, "transfer-encoding").is_some();
    let body = if has_body {
        read_body(&mut r, &headers)
    } else {
        Vec::new()
    };
    let req = StubRequest {
        method,
        path,
        query,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    match handler(&req) {
        Reply::Endless => {
            requests.lock().unwrap().push(req);
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                        Transfer-Encoding: chunked\r\n\r\n2\r\n[\"\r\n";
            let chunk = format!("10000\r\n{}\r\n", "a".repeat(0x10000));
            if w.write_all(head.as_bytes()).is_ok() {
                while w.write_all(chunk.as_bytes()).is_ok() {}
            }
        }
        Reply::Redirect(status, location) => {
            requests.lock().unwrap().push(req);
            let resp = format!(
                "HTTP/1.1 {status} Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\n\
                 Connection: close\r\n\r\n"
            );
            let _ = w.write_all(resp.as_bytes());
        }
        Reply::Json(status, v) => {
            requests.lock().unwrap().push(req);
            let body = v.to_string();
            let resp = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = w.write_all(resp.as_bytes());
        }
        Reply::Hang(d) => {
            thread::sleep(d);
        }
    }
    let _ = w.shutdown(Shutdown::Both);
}
