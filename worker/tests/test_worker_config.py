"""worker/worker.py's configuration as the SDK receives it, and its fatal-line handling with
the real SDK."""

import importlib.util
import os
import subprocess
import sys

from conftest import die_with_parent, LOOPBACK, WORKER_DIR, Stub, free_port, stop_process, wait_until

FATAL = [
    "Traceback (most recent call last):",
    "Error:",
    "CUDA error",
    "RuntimeError:",
    "OutOfMemoryError",
]


def load_worker_module():
    spec = importlib.util.spec_from_file_location("pyworker_config", WORKER_DIR / "worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults(monkeypatch):
    for name in (
        "MODEL_SERVER_URL",
        "MODEL_SERVER_PORT",
        "MODEL_LOG",
        "WORKER_JOB_WORKLOAD",
        "WORKER_VALIDATE_NONCE_WORKLOAD",
    ):
        monkeypatch.delenv(name, raising=False)
    config = load_worker_module().build_config()
    assert config.model_server_url == "http://127.0.0.1"
    assert config.model_server_port == 18000
    assert config.model_log_file == "/var/log/model/server.log"
    assert config.model_healthcheck_url == "/health"
    assert config.log_action_config.on_load == ["Application startup complete."]
    assert config.log_action_config.on_error == FATAL
    routes = {h.route: h for h in config.handlers}
    assert sorted(routes) == ["/generate", "/health", "/pooled", "/validate", "/warmup"]
    assert [r for r, h in routes.items() if h.benchmark_config] == ["/health"]
    for route in ("/generate", "/warmup", "/pooled", "/validate"):
        h = routes[route]
        assert h.max_queue_time is None, route
        assert h.allow_parallel_requests is False, route
    for route in ("/generate", "/warmup", "/pooled"):
        assert routes[route].workload_calculator({"batch_size": 7}) == 100.0
    assert routes["/health"].workload_calculator({}) == 1.0
    # A validation weighs what its nonces do: 1000 of them as much as a compute job.
    validate = routes["/validate"].workload_calculator
    assert validate({"nonces": list(range(1000)), "dist": [1.0] * 1000}) == 100.0
    assert validate({"nonces": [1, 2], "dist": [1.0, 1.0]}) == 0.2
    assert validate({"nonces": []}) == 0.1
    assert validate({"nonces": "junk"}) == 0.1


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("MODEL_SERVER_URL", "http://127.0.0.2")
    monkeypatch.setenv("MODEL_SERVER_PORT", "18123")
    monkeypatch.setenv("MODEL_LOG", "/tmp/elsewhere.log")
    monkeypatch.setenv("WORKER_JOB_WORKLOAD", "40")
    monkeypatch.setenv("WORKER_VALIDATE_NONCE_WORKLOAD", "2")
    config = load_worker_module().build_config()
    assert config.model_server_url == "http://127.0.0.2"
    assert config.model_server_port == 18123
    assert config.model_log_file == "/tmp/elsewhere.log"
    routes = {h.route: h for h in config.handlers}
    assert routes["/generate"].workload_calculator({}) == 40.0
    assert routes["/validate"].workload_calculator({"nonces": [1, 2, 3]}) == 6.0


def test_a_bad_worker_perf_stops_the_worker_before_it_starts(tmp_path):
    env = dict(os.environ, WORKER_PERF="fast", PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(
        [sys.executable, str(WORKER_DIR / "worker.py")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "WORKER_PERF must be a positive number" in done.stderr
    assert not (tmp_path / ".has_benchmark").exists()


def test_a_fatal_log_line_is_reported_to_the_autoscaler(tmp_path):
    """The line start_server.sh leaves when the server fails makes the PyWorker report an
    error (with the real SDK reading a log it tails)."""
    statuses = []

    def route(method, path, _query, body):
        if path == "/worker_status/":
            statuses.append(body)
        if path == "/pubkey/":
            return 404, "no key"
        return 200, {"ok": True}

    stub = Stub(route)
    log = tmp_path / "server.log"
    log.write_text("starting\nError: llama-pow serve exited with status 1\n")
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "UNSECURED": "true",
            "WORKER_PORT": str(port),
            "WORKER_HTTP_PORT": str(free_port()),
            "CONTAINER_ID": "7",
            "PUBLIC_IPADDR": LOOPBACK,
            f"VAST_TCP_PORT_{port}": str(port),
            "REPORT_ADDR": stub.url,
            "MODEL_SERVER_PORT": str(free_port()),
            "MODEL_LOG": str(log),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    out = tmp_path / "worker.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER_DIR / "worker.py")],
            env=env,
            cwd=tmp_path,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
    try:
        errored = wait_until(
            30, lambda: [s for s in statuses if s and s.get("error_msg")], interval=0.2
        )
        assert errored, out.read_text()[-3000:]
        assert errored[0]["error_msg"] == "Error:"
    finally:
        stop_process(proc)
        stub.close()
