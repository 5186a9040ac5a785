"""The real Vast.ai PyWorker (worker/worker.py on the pinned vastai SDK) in front of a real
llama-pow server, with a stub autoscaler, warmup callback and orchestrator on loopback.

The tests run in file order and share one server and one PyWorker; the last one checks the
PyWorker's status reports over the whole session.
"""

import threading
import time
from pathlib import Path

from conftest import (
    MAX_JOB_SECONDS,
    READY_LINE,
    Stream,
    Stub,
    check_against_golden,
    loaded_reports,
    post_json,
    tiny_request,
    wait_until,
)


def results(lines):
    return [l.obj for l in lines if "nonces" in l.obj]


def assert_streamed_as_made(lines, sent_at, slack=2.5):
    """Each result line reached the client within `slack` seconds of when the server made it
    (`elapsed_seconds` into its job, which started when the request was sent, or when warmup
    params arrived): a proxy that held lines back until the job's end would be late by up to
    the whole job. The slack covers the server's whole-second `elapsed_seconds` and a 2-core
    machine where the server, the PyWorker and this client share the cores."""
    timed = [l for l in lines if "elapsed_seconds" in l.obj and "nonces" in l.obj]
    assert len(timed) >= 2
    lags = [(l.at - sent_at) - l.obj["elapsed_seconds"] for l in timed]
    print(f"line lag: first {lags[0]:.3f} s, max {max(lags):.3f} s over {len(lags)} lines")
    assert max(lags) < slack, f"a line arrived {max(lags):.2f} s after it was made"


def test_worker_reported_loaded_with_the_configured_perf(pyworker, autoscaler):
    report = loaded_reports(autoscaler)[0]
    assert report["max_perf"] == float(pyworker.perf)
    assert report["id"] == 4242
    assert report["url"] == f"http://127.0.0.1:{pyworker.port}"
    # WORKER_PERF went to .has_benchmark in the worker's working directory before it started.
    assert (Path(pyworker.workdir) / ".has_benchmark").read_text().strip() == "0.01"
    # ... so the SDK took the figure from there instead of benchmarking the server.
    assert "Already ran benchmark for perf score of 0.01" in pyworker.output()


def test_health_through_the_pyworker(pyworker):
    idx, body = pyworker.envelope({}, "/health")
    status, obj = post_json(pyworker.port, "/health", body)
    assert status == 200
    assert obj["status"] == "healthy" and obj["cuda_broken"] is False


def test_generate_streams_golden_results_as_they_are_made(pyworker, golden):
    idx, body = pyworker.envelope(tiny_request(golden), "/generate")
    stream = Stream(pyworker.port, "/generate", body)
    assert stream.status == 200
    assert stream.content_type.startswith("application/x-ndjson")
    lines = stream.rest(timeout=MAX_JOB_SECONDS + 20)
    stream.close()
    found = results(lines)
    assert found, "no result lines"
    assert not [l.obj for l in lines if "error" in l.obj]
    # The job ran to its time limit, and its lines came while it ran, not at its end.
    assert lines[-1].at - lines[0].at > MAX_JOB_SECONDS / 2
    assert lines[0].at - stream.sent_at < 2.0
    assert_streamed_as_made(lines, stream.sent_at)
    for obj in found:
        assert obj["block_hash"] == golden["block_hash"]
        assert obj["public_key"] == golden["public_key"]
    assert [o["batch_number"] for o in found] == sorted(o["batch_number"] for o in found)
    assert check_against_golden(golden, found, golden["r_target"]) > 0


def test_bad_request_is_answered_by_the_server(pyworker):
    idx, body = pyworker.envelope({"block_hash": "ab"}, "/generate")
    status, obj = post_json(pyworker.port, "/generate", body)
    assert status == 400
    assert "error" in obj


def test_warmup_waits_for_params_then_streams_and_completes(pyworker, golden):
    polls = []
    params = tiny_request(golden, batch_size=64)

    def route(method, path, query, body):
        if method == "GET" and path == "/warmup/params":
            polls.append(query.get("job_id"))
            if len(polls) < 3:
                return 200, {"status": "waiting"}
            return 200, {"status": "ready", "params": params}
        if method == "POST" and path == "/warmup/complete":
            return 200, {"ok": True}
        return 404, {"error": "unknown"}

    callback = Stub(route)
    try:
        idx, body = pyworker.envelope(
            {"callback_url": callback.url, "job_id": "job-e2e"}, "/warmup"
        )
        stream = Stream(pyworker.port, "/warmup", body)
        assert stream.status == 200
        lines = stream.rest(timeout=MAX_JOB_SECONDS + 30)
        stream.close()
        statuses = [l.obj.get("status") for l in lines if "status" in l.obj]
        assert statuses[0] == "warmup_ready"
        assert lines[0].obj["job_id"] == "job-e2e"
        assert statuses.count("warmup_waiting") >= 1
        assert "warmup_params_received" in statuses
        assert set(polls) == {"job-e2e"}
        found = results(lines)
        assert check_against_golden(golden, found, golden["r_target"]) > 0
        received = next(l for l in lines if l.obj.get("status") == "warmup_params_received")
        assert_streamed_as_made(lines, received.at)
        completes = wait_until(5, lambda: callback.recorded("POST", "/warmup/complete"))
        assert len(completes) == 1
        done = completes[0]["body"]
        assert done["job_id"] == "job-e2e"
        assert done["total_batches"] >= len(found)
        assert done["total_computed"] >= 64
        assert done["total_valid"] == sum(len(o["nonces"]) for o in found)
    finally:
        callback.close()


def test_pooled_session_computes_the_orchestrators_range(pyworker, golden):
    state = {"config": {"status": "wait"}, "worker_id": None}
    lock = threading.Lock()
    block = {
        "block_hash": golden["block_hash"],
        "block_height": 7,
        "r_target": golden["r_target"],
        "params": golden["params"],
        "batch_size": 16,
    }

    def route(method, path, _query, body):
        with lock:
            if path == "/api/workers/connect":
                state["worker_id"] = body["worker_id"]
                return 200, {"status": "ok"}
            prefix = f"/api/workers/{state['worker_id']}"
            if not path.startswith(prefix):
                return 404, {"detail": "unknown worker"}
            rest = path[len(prefix):]
            if rest == "/config":
                return 200, state["config"]
            if rest == "/ready":
                return 200, {
                    "status": "ok",
                    "public_key": golden["public_key"],
                    "nonce_range_start": 0,
                    "nonce_range_end": 63,
                }
            if rest in ("/results", "/results/batch", "/heartbeat", "/shutdown"):
                return 200, {"status": "ok"}
            return 404, {}

    orch = Stub(route)

    def delivered():
        out = []
        for r in orch.recorded("POST"):
            if r["path"].endswith("/results"):
                out.append(r["body"])
            elif r["path"].endswith("/results/batch"):
                out.extend(r["body"]["results"])
        return out

    try:
        idx, body = pyworker.envelope({"orchestrator_url": orch.url}, "/pooled")
        stream = Stream(pyworker.port, "/pooled", body)
        assert stream.status == 200
        head = stream.until(lambda o: o.get("status") == "waiting_block_hash", 15)
        assert [l.obj.get("status") for l in head] == [
            "registering",
            "registered",
            "waiting_block_hash",
        ]
        with lock:
            state["config"] = block
        stream.until(lambda o: o.get("status") == "computing", 15)
        assert wait_until(
            20, lambda: sum(r["batch_computed"] for r in delivered()) >= 64
        ), "the orchestrator did not get the whole range"
        with lock:
            state["config"] = {"type": "shutdown"}
        rest = stream.rest(timeout=20)
        stream.close()
        assert rest[-1].obj["status"] == "shutdown"
        assert rest[-1].obj["pending_results"] == 0
        got = delivered()
        assert sum(r["batch_computed"] for r in got) == 64
        for r in got:
            assert r["block_hash"] == golden["block_hash"]
            assert r["public_key"] == golden["public_key"]
        assert check_against_golden(golden, got, golden["r_target"]) == len(
            golden["valid_nonces"]
        )
        assert len(orch.recorded("POST", f"/api/workers/{state['worker_id']}/shutdown")) == 1
    finally:
        orch.close()


def test_validate_through_the_pyworker(pyworker, golden):
    # The reference's own proofs, then the same batch with every nonce of the case claimed.
    batch = {
        "block_hash": golden["block_hash"],
        "block_height": 7,
        "public_key": golden["public_key"],
        "params": golden["params"],
        "r_target": golden["r_target"],
        "nonces": golden["valid_nonces"],
        "dist": golden["valid_dist"],
    }
    idx, body = pyworker.envelope(batch, "/validate")
    stream = Stream(pyworker.port, "/validate", body)
    assert stream.status == 200
    assert stream.content_type.startswith("application/x-ndjson")
    lines = stream.rest(timeout=60)
    stream.close()
    *progress, verdict = [l.obj for l in lines]
    assert progress and progress[-1]["validated"] == len(golden["valid_nonces"])
    assert verdict["n_invalid"] == 0 and verdict["fraud_detected"] is False
    assert verdict["nonces"] == golden["valid_nonces"]
    assert verdict["max_abs_dist_diff"] <= 1e-5

    falsified = dict(batch, nonces=golden["nonces"], dist=[golden["r_target"] - 0.01] * len(golden["nonces"]))
    idx, body = pyworker.envelope(falsified, "/validate")
    stream = Stream(pyworker.port, "/validate", body)
    verdict = stream.rest(timeout=60)[-1].obj
    stream.close()
    want = [n for n, d in zip(golden["nonces"], golden["dist"]) if d > golden["r_target"]]
    assert verdict["invalid_nonces"] == want
    assert verdict["fraud_detected"] is True

    # A bad batch is the server's 400, naming the field.
    idx, body = pyworker.envelope(dict(batch, dist=batch["dist"][:-1]), "/validate")
    status, obj = post_json(pyworker.port, "/validate", body)
    assert status == 400
    assert obj["error"].startswith("dist: ")


def test_a_client_that_leaves_gets_499_and_the_next_request_gets_the_gpu(
    pyworker, autoscaler, golden, server
):
    # A long job through the PyWorker; its client reads a line, then goes away.
    idx_a, body_a = pyworker.envelope(tiny_request(golden, start_nonce=1_000_000), "/generate")
    a = Stream(pyworker.port, "/generate", body_a)
    assert a.status == 200
    assert a.next() is not None
    # A second request queues behind it in the PyWorker (one job at a time).
    idx_b, body_b = pyworker.envelope(tiny_request(golden), "/generate")
    box = {}

    def second():
        s = Stream(pyworker.port, "/generate", body_b)
        box["status"] = s.status
        first = s.next()
        box["first_at"] = first.at if first else None
        box["lines"] = [first] + s.rest(timeout=MAX_JOB_SECONDS + 20) if first else []
        s.close()

    t = threading.Thread(target=second, daemon=True)
    t.start()
    time.sleep(0.5)
    # Queued, not rejected: with perf 0.01 the SDK estimates hours of waiting.
    assert "status" not in box or box["status"] == 200, box
    assert "first_at" not in box, "the second request was not queued behind the first"
    left_at = time.monotonic()
    a.abandon()
    t.join(timeout=MAX_JOB_SECONDS + 30)
    assert not t.is_alive()
    assert box["status"] == 200
    # The next request was sent and computed at once: the first job's time limit was far off.
    assert box["first_at"] is not None
    assert box["first_at"] - left_at < min(2.5, MAX_JOB_SECONDS - 1)
    found = results(box["lines"])
    assert check_against_golden(golden, found, golden["r_target"]) > 0
    # The PyWorker counted the first request as cancelled by its client (a 499).
    deleted = wait_until(
        5,
        lambda: [
            r
            for d in autoscaler.recorded("POST", "/delete_requests/")
            for r in d["body"]["requests"]
            if r["request_idx"] == idx_a
        ],
    )
    assert deleted and deleted[0]["status"] == "Cancelled"
    assert '"POST /generate HTTP/1.1" 499' in pyworker.output()


def test_status_reports_never_carry_an_error(pyworker, autoscaler, server):
    # One more report after everything above, then look at all of them.
    since = time.monotonic()
    assert wait_until(
        15, lambda: [r for r in autoscaler.recorded("POST", "/worker_status/") if r["at"] > since]
    )
    reports = [r["body"] for r in autoscaler.recorded("POST", "/worker_status/")]
    assert reports
    assert [r["error_msg"] for r in reports if r["error_msg"]] == []
    # The server printed its ready line exactly once into the log the PyWorker tails.
    log = server.log.read_text().splitlines()
    assert log.count(READY_LINE) == 1
