"""scripts/compare_distances.py, the tool that compares a GPU run's distances with the
reference's: fed with real `llama-pow compute` output."""

import json
import subprocess
import sys

from conftest import REPO, llama_pow_bin

SCRIPT = REPO / "scripts" / "compare_distances.py"


def run_compute(binary, tmp_path, dtype):
    req = json.loads((REPO / "examples" / "tiny.json").read_text())
    req["dtype"] = dtype
    path = tmp_path / f"req_{dtype}.json"
    path.write_text(json.dumps(req))
    out = subprocess.run(
        [str(binary), "compute", "--request", str(path)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    ours = tmp_path / f"ours_{dtype}.json"
    ours.write_text(out.stdout)
    return ours, json.loads(out.stdout)


def compare(a, b, r_target):
    p = subprocess.run(
        [sys.executable, str(SCRIPT), str(a), str(b), "--r-target", str(r_target)],
        capture_output=True, text=True, timeout=60,
    )
    return p.returncode, (json.loads(p.stdout) if p.stdout else None), p.stderr


def test_identical_runs_meet_the_goals(tmp_path):
    ours, data = run_compute(llama_pow_bin(), tmp_path, "f16")
    code, result, _ = compare(ours, ours, 1.4)
    assert code == 0
    assert result["nonces_compared"] == len(data["nonces"]) == 16
    assert result["max_abs_diff"] == 0.0 and result["flips"] == []


def test_f32_against_f16_measures_the_difference_and_the_flips(tmp_path):
    f16, d16 = run_compute(llama_pow_bin(), tmp_path, "f16")
    f32, d32 = run_compute(llama_pow_bin(), tmp_path, "f32")
    diffs = [abs(a - b) for a, b in zip(d16["dist"], d32["dist"])]
    # An r_target right between the two runs' distances of the first nonce flips it.
    r = (d16["dist"][0] + d32["dist"][0]) / 2
    code, result, _ = compare(f16, f32, r)
    assert result["max_abs_diff"] == max(diffs) > 0
    assert result["p99_abs_diff"] <= result["max_abs_diff"]
    assert any(f["nonce"] == d16["nonces"][0] for f in result["flips"])
    assert code == 1


def test_reference_style_list_and_bad_input(tmp_path):
    theirs = tmp_path / "theirs.json"
    theirs.write_text(json.dumps([{"nonce": 1, "dist": 1.40}, {"nonce": 2, "dist": 1.42}]))
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"nonces": [1, 2, 3], "dist": [1.40000001, 1.42, 1.3]}))
    code, result, _ = compare(ours, theirs, 1.41)
    assert code == 0, result
    assert result["nonces_compared"] == 2 and result["only_ours"] == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nonces": [1, 2], "dist": [1.4]}))
    code, result, err = compare(bad, theirs, 1.41)
    assert code == 2 and "differ in length" in err
