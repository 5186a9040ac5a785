"""worker/stub_autoscaler.py as a user runs it: a process that prints where it listens, hands
out a public key, records and prints each report, and lists them at /reports. (The PyWorker
end-to-end tests in test_pyworker.py report to the same stub, in process.)"""

import json
import subprocess
import sys
import urllib.request

from conftest import WORKER_DIR, die_with_parent, post_json, stop_process


def test_the_stub_autoscaler_answers_the_pyworker_calls(tmp_path):
    log = tmp_path / "reports.ndjson"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER_DIR / "stub_autoscaler.py"), "--port", "0", "--log", str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        preexec_fn=die_with_parent,
    )
    try:
        first = proc.stdout.readline().strip()
        assert first.startswith("stub autoscaler listening on http://127.0.0.1:"), first
        url = first.rsplit(" ", 1)[1]
        port = int(url.rsplit(":", 1)[1])
        with urllib.request.urlopen(f"{url}/pubkey/", timeout=10) as r:
            assert r.status == 200
            assert r.read().decode().startswith("-----BEGIN PUBLIC KEY-----")
        status = {"id": 7, "loadtime": 3.5, "cur_load": 0.0, "max_perf": 100.0, "error_msg": ""}
        assert post_json(port, "/worker_status/", status)[0] == 200
        assert post_json(port, "/delete_requests/", {"requests": []})[0] == 200
        assert post_json(port, "/elsewhere/", {})[0] == 404
        printed = proc.stdout.readline()
        assert "worker_status:" in printed and "loadtime=3.5" in printed and "max_perf=100.0" in printed
        with urllib.request.urlopen(f"{url}/reports", timeout=10) as r:
            reports = json.loads(r.read())
        assert [x["path"] for x in reports] == ["/worker_status/", "/delete_requests/"]
        assert reports[0]["body"] == status
        logged = [json.loads(l) for l in log.read_text().splitlines()]
        assert logged == reports
    finally:
        stop_process(proc)
