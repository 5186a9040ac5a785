#!/usr/bin/env python3
"""Figures of the server against hostile peers and huge requests, on loopback, printed as JSON.

    scripts/probe_limits.py [replies] [huge_nonce] [stops] [bodies] [idle]   (default: all)

Starts target/release/llama-pow (LLAMA_POW_BIN overrides) with default options unless a probe
says otherwise, and reads the server process's VmRSS / VmHWM from /proc.

- replies:    a callback and an orchestrator that answer an endless body: /warmup for 12 s
              (default options), /pooled for 17 s with --client-timeout-seconds 25.
- huge_nonce: /generate with params whose one nonce needs 30 GiB (dim 16384, seq_len 32768).
- stops:      a 5 GB model (dim 2048, 16 layers, vocab 128256, seq_len 1024; about 6 GB of
              memory) in batches of 10 on the CPU: how long after it should stop a job stops,
              for the time limit (--max-job-seconds 10), a newer request, a disconnect and
              SIGTERM, each 20 s into a batch. Takes minutes.
- bodies:     /health latency while 500, then 1500 connections trickle a body in.
- idle:       RSS after a job with 3.8 GB of working memory (dim 2048, seq_len 32768).
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = os.environ.get("LLAMA_POW_BIN", str(REPO / "target/release/llama-pow"))


class Server:
    """The server on a free loopback port, its log lines with their arrival times."""

    def __init__(self, *extra):
        self.log = []
        self.p = subprocess.Popen(
            [BIN, "serve", "--host", "127.0.0.1", "--port", "0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.port = None
        t0 = time.time()
        while not any("startup complete" in l for _, l in self.log):
            if time.time() - t0 > 60:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        for _, l in self.log:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", l)
            if m:
                self.port = int(m.group(1))

    def _read(self):
        for l in self.p.stdout:
            self.log.append((time.time(), l.rstrip()))

    def when(self, needle, nth=1, timeout=1200):
        """When the `nth` log line containing `needle` arrived."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            hits = [t for t, l in self.log if needle in l]
            if len(hits) >= nth:
                return hits[nth - 1]
            time.sleep(0.05)
        raise RuntimeError(f"no log line {needle!r} x{nth}")

    def mem(self):
        status = Path(f"/proc/{self.p.pid}/status").read_text()
        get = lambda k: int(re.search(rf"^{k}:\s+(\d+)", status, re.M).group(1)) / 1024
        return {"rss_MB": round(get("VmRSS"), 1), "peak_MB": round(get("VmHWM"), 1)}

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            self.p.wait(timeout=60)


def send_post(port, path, body):
    s = socket.create_connection(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


class Stream:
    """A POST whose answer is read on a thread: JSON lines with arrival times, and its end."""

    def __init__(self, port, path, body):
        self.sock = send_post(port, path, body)
        self.status, self.lines, self.ended = None, [], None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, buf = buf.split(b"\r\n\r\n", 1)
            self.status = int(head.split(b" ", 2)[1])
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if length:
                while len(buf) < int(length.group(1)):
                    buf += self.sock.recv(65536)
                self.lines.append((time.time(), json.loads(buf)))
                return
            # Chunked NDJSON: every complete line, as it comes.
            while not buf.endswith(b"0\r\n\r\n"):
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                for m in re.finditer(rb"\{[^\n]*\}\n", buf):
                    self.lines.append((time.time(), json.loads(m.group(0))))
                if b"}\n" in buf:
                    buf = buf[buf.rfind(b"}\n") + 2:]
        except OSError:
            pass
        finally:
            self.ended = time.time()

    def wait(self, timeout=1200):
        t0 = time.time()
        while self.ended is None and time.time() - t0 < timeout:
            time.sleep(0.05)
        return self.ended

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def generate(params, batch_size=1):
    return {"block_hash": "ab" * 32, "block_height": 1, "public_key": "pk", "r_target": 10.0,
            "batch_size": batch_size, "start_nonce": 0, "params": params}


class Endless(BaseHTTPRequestHandler):
    """Answers /warmup/params and .../config with a body that never ends; the rest with ok."""
    protocol_version = "HTTP/1.1"
    calls = 0

    def log_message(self, *_):
        pass

    def do_GET(self):
        if "/warmup/params" in self.path or self.path.endswith("/config"):
            Endless.calls += 1
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"10000\r\n" + b"a" * 0x10000 + b"\r\n"
            try:
                self.wfile.write(b'2\r\n["\r\n')
                while True:
                    self.wfile.write(chunk)
            except OSError:
                return
        self.ok()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.ok()

    def ok(self):
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def probe_replies():
    stub = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    url = f"http://127.0.0.1:{stub.server_address[1]}"
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    out = {}
    for name, extra, path, body, seconds in [
        ("warmup", [], "/warmup", {"callback_url": url, "job_id": "x"}, 12),
        ("pooled", ["--client-timeout-seconds", "25"], "/pooled", {"orchestrator_url": url}, 17),
    ]:
        s = Server(*extra)
        idle = s.mem()
        Endless.calls = 0
        st = Stream(s.port, path, body)
        time.sleep(seconds)
        out[name] = {"idle": idle, f"after_{seconds}s": s.mem(), "endless_replies": Endless.calls}
        st.close()
        s.stop()
    stub.shutdown()
    return out


def probe_huge_nonce():
    s = Server()
    t = time.time()
    st = Stream(s.port, "/generate", generate(
        {"dim": 16384, "n_layers": 1, "n_heads": 128, "n_kv_heads": 128, "vocab_size": 8192,
         "seq_len": 32768}))
    st.wait()
    out = {"status": st.status, "answered_in_ms": round((st.ended - t) * 1000, 1),
           "error": st.lines[0][1]["error"] if st.lines else None, **s.mem()}
    s.stop()
    return out


def probe_stops():
    params = {"dim": 2048, "n_layers": 16, "n_heads": 16, "n_kv_heads": 16,
              "vocab_size": 128256, "seq_len": 1024}
    req = generate(params, 10)
    out = {}
    s = Server("--max-job-seconds", "10")
    st = Stream(s.port, "/generate", req)
    ready = s.when("model ready")
    out["time_limit_10s_ended_s_after_model_ready"] = round(st.wait() - ready, 1)
    out["memory_after_that_job"] = s.mem()
    s.stop()

    s = Server()
    a = Stream(s.port, "/generate", req)
    s.when("model ready", 1)
    time.sleep(20)
    t = time.time()
    b = Stream(s.port, "/generate", req)
    out["preempted_stream_ended_s_after_the_newer_request"] = round(a.wait() - t, 1)
    out["preempted_last_line"] = a.lines[-1][1] if a.lines else None
    out["newer_job_computing_s_after_its_request"] = round(s.when("model ready", 2) - t, 1)
    time.sleep(20)
    t = time.time()
    b.close()
    out["disconnected_job_ended_s_after"] = round(s.when("ended: client gone") - t, 1)
    c = Stream(s.port, "/generate", req)
    s.when("model ready", 3)
    time.sleep(20)
    t = time.time()
    s.p.send_signal(signal.SIGTERM)
    out["sigterm_stream_ended_s_after"] = round(c.wait() - t, 1)
    out["sigterm_last_line"] = c.lines[-1][1] if c.lines else None
    s.p.wait(timeout=120)
    out["sigterm_exited_s_after"] = round(time.time() - t, 1)
    return out


def health_ms(port):
    t = time.time()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    s.settimeout(600)
    head = s.recv(4096)
    s.close()
    assert head.startswith(b"HTTP/1.1 200"), head[:40]
    return round((time.time() - t) * 1000, 2)


def probe_bodies():
    out = {}
    for n in [500, 1500]:
        s = Server()
        socks = []
        for _ in range(n):
            c = socket.create_connection(("127.0.0.1", s.port))
            c.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                      b"application/json\r\nContent-Length: 100000\r\n\r\n{")
            socks.append(c)
        done = threading.Event()

        def trickle():
            while not done.is_set():
                for c in socks:
                    try:
                        c.send(b" ")
                    except OSError:
                        pass
                time.sleep(1)

        threading.Thread(target=trickle, daemon=True).start()
        out[f"{n}_trickling_health_ms"] = [health_ms(s.port) for _ in range(5)]
        done.set()
        for c in socks:
            c.close()
        s.stop()
    return out


def probe_idle():
    s = Server("--max-job-seconds", "5")
    before = s.mem()
    st = Stream(s.port, "/generate", generate(
        {"dim": 2048, "n_layers": 1, "n_heads": 16, "n_kv_heads": 16, "vocab_size": 8192,
         "seq_len": 32768}))
    st.wait()
    time.sleep(2)
    out = {"before": before, "after_job": s.mem()}
    s.stop()
    return out


PROBES = {"replies": probe_replies, "huge_nonce": probe_huge_nonce, "stops": probe_stops,
          "bodies": probe_bodies, "idle": probe_idle}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(PROBES):
        print(json.dumps({name: PROBES[name]()}, indent=1), flush=True)
