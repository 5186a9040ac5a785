"""PyWorker configuration for running llama-pow on a Vast.ai serverless endpoint.

The PyWorker (the `vastai` SDK's `Worker`) sits in front of the llama-pow server on the same
machine. It checks each client request, forwards the request's `payload` to the server, streams
the server's NDJSON answer back line for line, and reports load and readiness to the
autoscaler. Readiness and failure come from the server's log file, which start_server.sh writes.

Environment:
    MODEL_SERVER_URL   where the server listens (default http://127.0.0.1)
    MODEL_SERVER_PORT  its port (default 18000, the server's default)
    MODEL_LOG          the server's log file (default /var/log/model/server.log)
    WORKER_PERF        the throughput reported to the autoscaler, in workload units per second
                       (default 100: one running compute job, 100 units, keeps a worker busy).
                       Written to .has_benchmark in the working directory before the worker
                       starts, so the SDK reports it instead of benchmarking the server.
    WORKER_JOB_WORKLOAD  workload of one /generate, /warmup or /pooled request (default 100)
    WORKER_VALIDATE_NONCE_WORKLOAD
                       workload of one nonce of a /validate request (default 0.1: a batch of
                       1000 nonces weighs as much as a compute job)

The SDK itself reads WORKER_PORT, REPORT_ADDR, CONTAINER_ID, PUBLIC_IPADDR, VAST_TCP_PORT_<port>,
UNSECURED, USE_SSL and MASTER_TOKEN, which the Vast.ai platform sets.
"""

import math
import os
import sys

from vastai import BenchmarkConfig, HandlerConfig, LogActionConfig, Worker, WorkerConfig

# The file the SDK reads its throughput from instead of running a benchmark; it resolves the
# name against the working directory.
BENCHMARK_FILE = ".has_benchmark"

# The bare line llama-pow prints once it listens and its backend is ready.
READY_LINE = "Application startup complete."

# Log line prefixes that mean the server failed for good (llama-pow prints them only then).
FATAL_PATTERNS = [
    "Traceback (most recent call last):",
    "Error:",
    "CUDA error",
    "RuntimeError:",
    "OutOfMemoryError",
]

HEALTH_WORKLOAD = 1.0


def positive_float(name, default):
    """The environment variable `name` as a finite positive float, or exit naming it."""
    raw = os.environ.get(name, "").strip() or default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        sys.exit(f"worker.py: {name} must be a positive number, got {raw!r}")
    return value


def job_workload(_payload):
    """A compute request occupies the devices for its whole session, whatever its batch size:
    every one costs the same."""
    return positive_float("WORKER_JOB_WORKLOAD", "100")


def validate_workload(payload):
    """A validation recomputes each nonce of its batch once: its cost grows with their number
    (at least one nonce's worth, for an empty or malformed batch, which the server answers at
    once)."""
    per_nonce = positive_float("WORKER_VALIDATE_NONCE_WORKLOAD", "0.1")
    nonces = payload.get("nonces") if isinstance(payload, dict) else None
    n = len(nonces) if isinstance(nonces, list) else 0
    return per_nonce * max(n, 1)


def health_workload(_payload):
    return HEALTH_WORKLOAD


def build_config():
    """The WorkerConfig, with the server location taken from the environment."""
    server_url = os.environ.get("MODEL_SERVER_URL", "").strip() or "http://127.0.0.1"
    server_port = int(os.environ.get("MODEL_SERVER_PORT", "").strip() or "18000")
    model_log = os.environ.get("MODEL_LOG", "").strip() or "/var/log/model/server.log"

    def compute_route(route, workload=job_workload):
        # One job owns the devices, so requests queue in arrival order (a request whose
        # client leaves is answered 499 and the next one is sent). A job runs for minutes:
        # never reject a request for waiting, and never time one out.
        return HandlerConfig(
            route=route,
            allow_parallel_requests=False,
            max_queue_time=None,
            workload_calculator=workload,
        )

    return WorkerConfig(
        model_server_url=server_url,
        model_server_port=server_port,
        model_log_file=model_log,
        model_healthcheck_url="/health",
        handlers=[
            # The SDK wants exactly one handler with a benchmark. Its measurement is skipped
            # (WORKER_PERF is written to .has_benchmark), so a health probe stands in for it.
            HandlerConfig(
                route="/health",
                allow_parallel_requests=True,
                max_queue_time=None,
                workload_calculator=health_workload,
                benchmark_config=BenchmarkConfig(
                    generator=lambda: {},
                    runs=1,
                    concurrency=1,
                ),
            ),
            compute_route("/generate"),
            compute_route("/warmup"),
            compute_route("/pooled"),
            compute_route("/validate", validate_workload),
        ],
        log_action_config=LogActionConfig(
            on_load=[READY_LINE],
            on_error=list(FATAL_PATTERNS),
        ),
    )


def write_benchmark_file():
    """Write WORKER_PERF where the SDK looks for a finished benchmark."""
    perf = positive_float("WORKER_PERF", "100")
    with open(BENCHMARK_FILE, "w", encoding="utf-8") as f:
        f.write(f"{perf}\n")
    print(
        f"worker.py: reporting perf {perf} from {os.path.abspath(BENCHMARK_FILE)}",
        flush=True,
    )


def main():
    config = build_config()
    # Fail now on a bad WORKER_JOB_WORKLOAD or WORKER_VALIDATE_NONCE_WORKLOAD, not on the
    # first request.
    job_workload(None)
    validate_workload(None)
    write_benchmark_file()
    Worker(config).run()


if __name__ == "__main__":
    main()
