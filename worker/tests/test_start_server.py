"""start_server.sh: a fresh log at every start (renamed, never truncated), the server's output
in the log and on stdout, environment options honoured, signals passed on."""

import http.client
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import (
    die_with_parent,
    READY_LINE,
    REPO,
    Server,
    free_port,
    read_text,
    stop_process,
    wait_until,
)


def health(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_each_start_gets_a_fresh_log_and_old_logs_are_renamed(tmp_path):
    s = Server(tmp_path, {"MODEL_LOG_KEEP": "2"})
    try:
        s.start()
        assert health(s.port)[0] == 200
        first_inode = s.log.stat().st_ino
        first_text = s.log.read_text()
        assert first_text.splitlines().count(READY_LINE) == 1
        # Keep the first log open, as the PyWorker's tail does.
        held = open(s.log, "rb")
        try:
            assert s.stop() == 0
            s.start()
            # The old file was renamed, not truncated: same inode, same bytes, new name.
            old = Path(f"{s.log}.1")
            assert old.stat().st_ino == first_inode
            assert held.read().decode() == old.read_text()
            assert s.log.stat().st_ino != first_inode
            # Give a repeating ready line a chance to show up: it must not.
            time.sleep(1.5)
            assert s.log.read_text().splitlines().count(READY_LINE) == 1
            assert s.stop() == 0
        finally:
            held.close()
        # Older logs move up, and no more than MODEL_LOG_KEEP are kept.
        s.start()
        assert s.stop() == 0
        s.start()
        assert s.stop() == 0
        logs = sorted(p.name for p in s.log.parent.iterdir())
        assert logs == ["server.log", "server.log.1", "server.log.2"]
        for p in s.log.parent.iterdir():
            assert p.read_text().splitlines().count(READY_LINE) == 1
        # Everything in the logs also went to standard output, as it was made.
        out = read_text(s.stdout_path)
        assert out.splitlines().count(READY_LINE) == 4
    finally:
        s.stop()


def test_sigterm_reaches_the_server_and_env_options_apply(tmp_path):
    port = free_port()
    s = Server(tmp_path, {"LLAMA_POW_PORT": str(port), "LLAMA_POW_DTYPE": "bf16"})
    s.port = port
    try:
        s.start()
        status, body = health(port)
        assert status == 200 and body["dtype"] == "bf16"
        server_pids = children(s.proc.pid)
        assert server_pids, "no server process under start_server.sh"
        os.kill(s.proc.pid, signal.SIGTERM)
        assert s.proc.wait(timeout=20) == 0
        assert wait_until(5, lambda: not any(alive(p) for p in server_pids))
        assert "Error:" not in s.log.read_text()
    finally:
        s.stop()


def test_sighup_reaches_the_server_which_shuts_down_cleanly(tmp_path):
    port = free_port()
    s = Server(tmp_path, {"LLAMA_POW_PORT": str(port)})
    s.port = port
    try:
        s.start()
        server_pids = children(s.proc.pid)
        assert server_pids, "no server process under start_server.sh"
        os.kill(s.proc.pid, signal.SIGHUP)
        assert s.proc.wait(timeout=20) == 0
        assert wait_until(5, lambda: not any(alive(p) for p in server_pids))
        text = s.log.read_text()
        assert "SIGHUP received" in text and "shut down cleanly" in text
        assert "Error:" not in text
    finally:
        s.stop()


def test_a_server_that_fails_leaves_a_fatal_line(tmp_path):
    s = Server(tmp_path)
    s.env["LLAMA_POW_DTYPE"] = "f8"
    with open(s.stdout_path, "wb") as out:
        proc = subprocess.Popen(
            [str(REPO / "start_server.sh")],
            env=s.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
    try:
        code = proc.wait(timeout=20)
    finally:
        stop_process(proc)
    assert code != 0
    lines = s.log.read_text().splitlines()
    assert f"Error: llama-pow serve exited with status {code}" in lines
    assert READY_LINE not in lines
