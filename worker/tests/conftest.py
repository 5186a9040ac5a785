"""Fixtures for the SDK end-to-end tests: the llama-pow server (through start_server.sh), stub
HTTP services on loopback, and the real PyWorker in front of the server.

Every process started here is ended by its own PID at teardown, and every wait is bounded.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER_DIR = REPO / "worker"
READY_LINE = "Application startup complete."
LOOPBACK = "127.0.0.1"

# Server options that keep jobs short (each is also a LLAMA_POW_* variable, which is how
# start_server.sh passes them on).
MAX_JOB_SECONDS = 5.0
SERVER_ENV = {
    "LLAMA_POW_MAX_JOB_SECONDS": str(MAX_JOB_SECONDS),
    "LLAMA_POW_WARMUP_POLL_SECONDS": "0.2",
    "LLAMA_POW_WARMUP_MAX_SECONDS": "30",
    "LLAMA_POW_POOLED_POLL_SECONDS": "0.05",
    "LLAMA_POW_POOLED_HEARTBEAT_SECONDS": "0.5",
    "LLAMA_POW_POOLED_MAX_SECONDS": "30",
    "LLAMA_POW_CLIENT_TIMEOUT_SECONDS": "2",
    "LLAMA_POW_SHUTDOWN_GRACE_SECONDS": "5",
    "LLAMA_POW_LOG": "info",
}


def die_with_parent():
    """preexec_fn: the child gets SIGTERM when this test process dies, even if it is killed
    before its fixtures' teardown runs (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def llama_pow_bin():
    path = Path(os.environ.get("LLAMA_POW_BIN") or REPO / "target/release/llama-pow")
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} missing: run `cargo build --release` first (scripts/test.sh does)")
    return path


def free_port():
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_until(timeout, predicate, interval=0.05):
    """Poll `predicate` until it is truthy (returning its value) or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def read_text(path):
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def stop_process(proc, sig=signal.SIGTERM, timeout=15):
    """End a process this suite started, by its PID: `sig`, then SIGKILL if it lingers."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode


class Server:
    """llama-pow serve started through start_server.sh, output in `log` and `stdout_path`."""

    def __init__(self, workdir, extra_env=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.workdir / "log" / "server.log"
        self.stdout_path = self.workdir / "start_server.out"
        env = dict(os.environ)
        env.update(SERVER_ENV)
        env.update(
            {
                "LLAMA_POW_BIN": str(llama_pow_bin()),
                "LLAMA_POW_HOST": LOOPBACK,
                "LLAMA_POW_PORT": str(self.port),
                "MODEL_LOG": str(self.log),
            }
        )
        env.update(extra_env or {})
        self.env = env
        self.proc = None

    def inode(self):
        try:
            return self.log.stat().st_ino
        except FileNotFoundError:
            return None

    def start(self, timeout=30):
        """Start start_server.sh and wait for the ready line in a new log file."""
        before = self.inode()
        with open(self.stdout_path, "ab") as out:
            self.proc = subprocess.Popen(
                [str(REPO / "start_server.sh")],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                preexec_fn=die_with_parent,
            )
        ready = wait_until(
            timeout,
            lambda: (self.inode() not in (None, before)
                     and READY_LINE in read_text(self.log).splitlines())
            or self.proc.poll() is not None,
        )
        if self.proc.poll() is not None or not ready:
            out = read_text(self.stdout_path)
            self.stop()
            pytest.fail(f"server did not become ready:\n{out[-3000:]}")
        return self

    def stop(self):
        if self.proc is not None:
            return stop_process(self.proc)
        return None

    @property
    def url(self):
        return f"http://{LOOPBACK}:{self.port}"


class Stub:
    """A threaded HTTP server on loopback. `route(method, path, query, body)` returns
    (status, object) and is called for every request; all requests are recorded."""

    def __init__(self, route):
        self.route = route
        self.requests = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_any(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                with stub.lock:
                    stub.requests.append(
                        {
                            "method": method,
                            "path": parts.path,
                            "query": query,
                            "body": body,
                            "at": time.monotonic(),
                        }
                    )
                status, obj = stub.route(method, parts.path, query, body)
                if isinstance(obj, str):
                    data, ctype = obj.encode(), "text/plain"
                else:
                    data, ctype = json.dumps(obj).encode(), "application/json"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.handle_any("GET")

            def do_POST(self):
                self.handle_any("POST")

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://{LOOPBACK}:{self.port}"

    def recorded(self, method=None, path=None):
        with self.lock:
            return [
                r
                for r in self.requests
                if (method is None or r["method"] == method)
                and (path is None or r["path"] == path)
            ]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Line:
    def __init__(self, obj, at):
        self.obj = obj
        self.at = at


class Stream:
    """A POST whose NDJSON answer is read line by line, each line with its arrival time."""

    def __init__(self, port, path, body, timeout=60):
        self.sent_at = time.monotonic()
        self.conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
        data = json.dumps(body).encode()
        self.conn.request(
            "POST", path, body=data, headers={"Content-Type": "application/json"}
        )
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.content_type = self.resp.getheader("Content-Type", "")

    def next(self):
        """The next line, or None at the end of the stream."""
        while True:
            raw = self.resp.readline()
            if not raw:
                return None
            if raw.strip():
                return Line(json.loads(raw), time.monotonic())

    def until(self, predicate, timeout):
        """Lines up to and including the first one for which `predicate` holds."""
        deadline = time.monotonic() + timeout
        out = []
        while time.monotonic() < deadline:
            line = self.next()
            if line is None:
                break
            out.append(line)
            if predicate(line.obj):
                return out
        raise AssertionError(
            f"no matching line within {timeout} s; last lines: {[l.obj for l in out[-3:]]}"
        )

    def rest(self, timeout):
        """Every remaining line; the stream must end within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        out = []
        while True:
            assert time.monotonic() < deadline, f"stream still open after {timeout} s"
            line = self.next()
            if line is None:
                return out
            out.append(line)

    def abandon(self):
        """Go away as a client does: close the connection mid-stream."""
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conn.close()

    def close(self):
        self.conn.close()


def post_json(port, path, body, timeout=30):
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request(
            "POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode("utf-8", "replace")
    finally:
        conn.close()


@pytest.fixture(scope="session")
def golden():
    return json.loads((REPO / "tests/golden/tiny_f16.json").read_text())


def tiny_request(golden, **overrides):
    """A /generate request for the golden tiny f16 model."""
    request = {
        "block_hash": golden["block_hash"],
        "block_height": 1,
        "public_key": golden["public_key"],
        "r_target": golden["r_target"],
        "batch_size": 32,
        "start_nonce": 0,
        "params": golden["params"],
    }
    request.update(overrides)
    return request


def check_against_golden(golden, result_lines, r_target, first=64):
    """Every (nonce, dist) pair with nonce < `first` equals the golden distance within 1e-5,
    and together they are exactly the golden nonces closer than `r_target`. Returns how many
    pairs were checked."""
    got = {}
    for obj in result_lines:
        assert len(obj["nonces"]) == len(obj["dist"]), obj
        for nonce, dist in zip(obj["nonces"], obj["dist"]):
            if nonce < first:
                assert nonce not in got, f"nonce {nonce} reported twice"
                got[nonce] = dist
    expected = {
        n: d for n, d in zip(golden["nonces"], golden["dist"]) if n < first and d < r_target
    }
    assert sorted(got) == sorted(expected), "valid nonces differ from the golden ones"
    for nonce, dist in got.items():
        assert abs(dist - expected[nonce]) <= 1e-5, (nonce, dist, expected[nonce])
    return len(got)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sdk-e2e")


@pytest.fixture(scope="session")
def server(session_dir):
    s = Server(session_dir / "server").start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def short_server(session_dir):
    """A server whose jobs last one second (for handlers that collect a whole job)."""
    s = Server(session_dir / "short-server", {"LLAMA_POW_MAX_JOB_SECONDS": "1"}).start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def autoscaler():
    """The autoscaler the PyWorker reports to: worker/stub_autoscaler.py, the stub the
    repository gives users for running the PyWorker locally."""
    sys.path.insert(0, str(WORKER_DIR))
    try:
        from stub_autoscaler import StubAutoscaler
    finally:
        sys.path.remove(str(WORKER_DIR))
    stub = StubAutoscaler(LOOPBACK, 0)
    yield stub
    stub.close()


class PyWorker:
    def __init__(self, proc, port, workdir, out_path, perf):
        self.proc = proc
        self.port = port
        self.workdir = workdir
        self.out_path = out_path
        self.perf = perf
        self.next_idx = 1000

    def envelope(self, payload, endpoint):
        """A client request as the Vast.ai router hands it over: auth_data and payload."""
        self.next_idx += 1
        auth = {
            "cost": "100",
            "endpoint": endpoint,
            "reqnum": self.next_idx,
            "request_idx": self.next_idx,
            "signature": "",
            "url": f"http://{LOOPBACK}:{self.port}{endpoint}",
        }
        return self.next_idx, {"auth_data": auth, "payload": payload}

    def output(self):
        return read_text(self.out_path)


def loaded_reports(autoscaler):
    return [
        r["body"]
        for r in autoscaler.recorded("POST", "/worker_status/")
        if (r["body"] or {}).get("loadtime", 0) > 0
    ]


@pytest.fixture(scope="session")
def pyworker(session_dir, server, autoscaler):
    """worker/worker.py in front of the session server, reporting to the stub autoscaler."""
    workdir = session_dir / "pyworker"
    workdir.mkdir()
    port, http_port = free_port(), free_port()
    # A throughput so low that the SDK's queue-time estimate for a request waiting behind a
    # running job (workload / perf) is hours: any finite max_queue_time would reject it.
    perf = "0.01"
    env = dict(os.environ)
    env.update(
        {
            "UNSECURED": "true",
            "WORKER_PORT": str(port),
            "WORKER_HTTP_PORT": str(http_port),
            "CONTAINER_ID": "4242",
            "PUBLIC_IPADDR": LOOPBACK,
            f"VAST_TCP_PORT_{port}": str(port),
            "REPORT_ADDR": autoscaler.url,
            "MODEL_SERVER_URL": f"http://{LOOPBACK}",
            "MODEL_SERVER_PORT": str(server.port),
            "MODEL_LOG": str(server.log),
            "WORKER_PERF": perf,
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    out_path = workdir / "worker.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER_DIR / "worker.py")],
            env=env,
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
    worker = PyWorker(proc, port, workdir, out_path, perf)
    # The SDK reports a loaded model with its next status after the first health check
    # succeeds: at most about ten seconds after it sees the ready line.
    if not wait_until(40, lambda: loaded_reports(autoscaler) or proc.poll() is not None):
        stop_process(proc)
        pytest.fail(f"PyWorker never reported loaded:\n{worker.output()[-4000:]}")
    if proc.poll() is not None:
        pytest.fail(f"PyWorker exited with {proc.returncode}:\n{worker.output()[-4000:]}")
    yield worker
    stop_process(proc)
