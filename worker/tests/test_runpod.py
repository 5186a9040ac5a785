"""worker/runpod_handler.py on the pinned runpod SDK against a real llama-pow server."""

import ast
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import die_with_parent, WORKER_DIR, check_against_golden, tiny_request


def load_handler_module():
    spec = importlib.util.spec_from_file_location(
        "runpod_handler", WORKER_DIR / "runpod_handler.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_local_test(server, job, timeout=90):
    """The SDK's local test mode: one job from --test_input, then the process exits."""
    env = dict(os.environ)
    env.update(
        {
            "MODEL_SERVER_URL": "http://127.0.0.1",
            "MODEL_SERVER_PORT": str(server.port),
            "SERVER_WAIT_SECONDS": "10",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    env.pop("RUNPOD_WEBHOOK_GET_JOB", None)
    return subprocess.run(
        [sys.executable, str(WORKER_DIR / "runpod_handler.py"), "--test_input", json.dumps(job)],
        env=env,
        cwd=WORKER_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=die_with_parent,
    )


def first_outputs(stdout):
    """The leading output objects of the SDK's `Job result: {'output': [...]}` log line, which
    its logger cuts at 4096 characters: every object that is complete before the cut."""
    line = next(l for l in stdout.splitlines() if "Job result: " in l)
    text = line.split("Job result: ", 1)[1]
    start = text.index("[") + 1
    out, depth, begin = [], 0, None
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            if depth == 0:
                begin = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                out.append(ast.literal_eval(text[begin : i + 1]))
    return out


def test_local_test_mode_runs_a_generate_job(short_server, golden):
    job = {"input": tiny_request(golden, batch_size=64)}
    started = time.monotonic()
    done = run_local_test(short_server, job)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Job local_test completed successfully." in done.stdout
    assert time.monotonic() - started < 60
    outputs = first_outputs(done.stdout)
    assert outputs, done.stdout[-2000:]
    # The first batch (nonces 0..63) is the golden one.
    assert outputs[0]["nonces"][0] < 64
    assert check_against_golden(golden, outputs[:1], golden["r_target"]) == len(
        golden["valid_nonces"]
    )


def test_local_test_mode_runs_a_validation(short_server, golden):
    job = {
        "input": {
            "block_hash": golden["block_hash"],
            "block_height": 1,
            "public_key": golden["public_key"],
            "params": golden["params"],
            "r_target": golden["r_target"],
            "nonces": golden["valid_nonces"],
            "dist": golden["valid_dist"],
        }
    }
    done = run_local_test(short_server, job)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Job local_test completed successfully." in done.stdout
    outputs = first_outputs(done.stdout)
    verdicts = [o for o in outputs if "probability_honest" in o]
    assert len(verdicts) == 1, done.stdout[-2000:]
    assert verdicts[0]["n_invalid"] == 0 and verdicts[0]["fraud_detected"] is False


def test_local_test_mode_fails_the_job_on_a_bad_request(short_server):
    done = run_local_test(short_server, {"input": {"block_hash": "ab"}})
    assert done.returncode == 1
    assert "answered 400" in done.stdout + done.stderr


def test_the_handler_yields_each_line_as_the_server_makes_it(short_server, golden, monkeypatch):
    monkeypatch.setenv("MODEL_SERVER_URL", "http://127.0.0.1")
    monkeypatch.setenv("MODEL_SERVER_PORT", str(short_server.port))
    handler = load_handler_module()
    assert handler.route_for({"orchestrator_url": "x"}) == "/pooled"
    assert handler.route_for({"callback_url": "x"}) == "/warmup"
    assert handler.route_for(tiny_request(golden)) == "/generate"
    assert handler.route_for({"nonces": [1], "dist": [1.0]}) == "/validate"
    # A request that merely mentions nonces is still a generation.
    assert handler.route_for(dict(tiny_request(golden), nonces=[1])) == "/generate"

    async def consume():
        out = []
        started = time.monotonic()
        gen = handler.handler({"id": "t", "input": tiny_request(golden, batch_size=64)})
        async for obj in gen:
            out.append((time.monotonic() - started, obj))
        return out

    got = asyncio.run(asyncio.wait_for(consume(), timeout=60))
    objs = [o for _, o in got]
    assert len(objs) >= 2
    assert all(isinstance(o, dict) for o in objs)
    assert [o["batch_number"] for o in objs] == sorted(o["batch_number"] for o in objs)
    # Yielded while the one-second job ran, not all at its end.
    assert got[0][0] < got[-1][0] - 0.3
    check_against_golden(golden, objs, golden["r_target"])


def test_the_handler_gives_up_on_an_absent_server(monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("MODEL_SERVER_PORT", str(free_port()))
    monkeypatch.setenv("SERVER_WAIT_SECONDS", "1")
    handler = load_handler_module()

    async def consume():
        return [o async for o in handler.handler({"id": "t", "input": {}})]

    with pytest.raises(handler.ServerError, match="not ready"):
        asyncio.run(asyncio.wait_for(consume(), timeout=20))
