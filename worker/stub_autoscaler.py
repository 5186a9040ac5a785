"""A stand-in for the Vast.ai autoscaler, to run the PyWorker (worker.py) on your own machine.

The PyWorker reports to the autoscaler at REPORT_ADDR: it fetches a public key (GET /pubkey/,
used to check request signatures when UNSECURED is not set), and posts its status
(POST /worker_status/: load time, which is above 0 once the server is ready, current load,
throughput, errors) and the requests
it dropped (POST /delete_requests/). This stub answers all three on loopback, prints one line
per report, and keeps every report for GET /reports.

    python worker/stub_autoscaler.py                 # on 127.0.0.1:8050
    python worker/stub_autoscaler.py --port 0        # any free port (printed)
    python worker/stub_autoscaler.py --log reports.ndjson

Then start the PyWorker with REPORT_ADDR=http://127.0.0.1:8050 (see docs/vast.md). The first
line printed is `stub autoscaler listening on http://HOST:PORT`.
"""

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The status fields worth a glance, in the order printed.
# loadtime is above 0 once the PyWorker saw the server's ready line: the worker is loaded.
SHOWN = ("id", "loadtime", "cur_load", "max_perf", "cur_perf", "num_requests_working", "error_msg")


def public_key_pem():
    """A fresh RSA public key in PEM, from PyCryptodome (a dependency of the PyWorker SDK)."""
    try:
        from Crypto.PublicKey import RSA
    except ImportError:
        sys.exit(
            "stub_autoscaler.py: PyCryptodome is missing; install the PyWorker's requirements "
            "(pip install -r worker/requirements.txt)"
        )
    return RSA.generate(2048).publickey().export_key().decode()


class StubAutoscaler:
    """The stub on its own thread: `url`, `reports()`, `close()`."""

    def __init__(self, host="127.0.0.1", port=0, log=None, echo=None):
        self.pem = public_key_pem()
        self.lock = threading.Lock()
        self.received = []  # every POST: method, path, body, at (time.monotonic()), in order
        self.log = log
        self.echo = echo
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status, body, content_type="application/json"):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/pubkey/":
                    self.answer(200, stub.pem, "text/plain")
                elif self.path == "/reports":
                    self.answer(200, [{"path": r["path"], "body": r["body"]} for r in stub.reports()])
                else:
                    self.answer(404, {"error": f"no such path {self.path}"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                if self.path not in ("/worker_status/", "/delete_requests/"):
                    self.answer(404, {"error": f"no such path {self.path}"})
                    return
                stub.record(self.path, body)
                self.answer(200, {"ok": True})

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def record(self, path, body):
        entry = {"method": "POST", "path": path, "body": body, "at": time.monotonic()}
        with self.lock:
            self.received.append(entry)
            if self.log is not None:
                self.log.write(json.dumps({"path": path, "body": body}) + "\n")
                self.log.flush()
        if self.echo is not None:
            self.echo(summary(path, body))

    def reports(self, path=None):
        """Every POST received (method, path, body, at), optionally only those to `path`."""
        with self.lock:
            return [dict(e) for e in self.received if path is None or e["path"] == path]

    def recorded(self, method=None, path=None):
        """As `reports`, filtered by method too (only POSTs are recorded)."""
        return [r for r in self.reports(path) if method is None or r["method"] == method]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def summary(path, body):
    """One line for a report: its path and the status fields that matter."""
    if path == "/worker_status/" and isinstance(body, dict):
        fields = " ".join(f"{k}={body[k]!r}" for k in SHOWN if k in body)
        return f"worker_status: {fields}"
    return f"{path.strip('/')}: {json.dumps(body)}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8050, help="port, 0 for any (default 8050)")
    parser.add_argument("--log", help="also append every report to this file, one JSON per line")
    args = parser.parse_args(argv)
    log = open(args.log, "a", encoding="utf-8") if args.log else None

    def echo(line):
        print(line, flush=True)

    stub = StubAutoscaler(args.host, args.port, log=log, echo=echo)
    print(f"stub autoscaler listening on {stub.url}", flush=True)
    try:
        stub.thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        stub.close()
        if log is not None:
            log.close()


if __name__ == "__main__":
    main()
