"""scripts/gpu-acceptance.sh off the GPU: the bundle it builds (contents, size, stripped and
working executables, filters that name real tests), its exit on a machine without an NVIDIA
GPU, and the summary it makes from a results folder (fed here with the outputs the checks
leave on a GPU host, made up)."""

import glob
import json
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu-acceptance.sh"
LIMIT = 64 * 1024 * 1024


def has_nvidia_gpu():
    return bool(glob.glob("/dev/nvidia[0-9]*")) or shutil.which("nvidia-smi") is not None


def section_names(path):
    """The section names of a 64-bit little-endian ELF file."""
    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, path
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    strtab = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)[0]
    names = []
    for i in range(shnum):
        name_off = struct.unpack_from("<I", data, shoff + i * shentsize)[0]
        end = data.index(b"\0", strtab + name_off)
        names.append(data[strtab + name_off:end].decode())
    return names


@pytest.mark.skipif(has_nvidia_gpu(), reason="this machine has an NVIDIA GPU")
def test_without_a_gpu_it_exits_at_once_saying_why():
    started = time.monotonic()
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 5
    assert done.returncode == 3, done
    assert done.stderr.startswith("gpu-acceptance: no NVIDIA GPU on this machine"), done.stderr
    assert "--bundle" in done.stderr
    assert done.stdout == ""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    if shutil.which("cargo") is None:
        pytest.skip("no cargo: the bundle is built with the Rust toolchain")
    out = tmp_path_factory.mktemp("acceptance") / "bundle"
    # Reuses the release build and the test executables the test command already made.
    done = subprocess.run(
        [str(SCRIPT), "--bundle", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"bundle: {out} (" in done.stdout
    return out


def test_the_bundle_holds_everything_the_gpu_host_needs_under_64_mib(bundle):
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size < LIMIT, size
    assert (bundle / "gpu-acceptance.sh").read_bytes() == SCRIPT.read_bytes()
    assert os.access(bundle / "gpu-acceptance.sh", os.X_OK)
    golden = sorted(p.name for p in (REPO / "tests" / "golden").iterdir())
    assert sorted(p.name for p in (bundle / "golden").iterdir()) == golden
    assert re.search(r"^commit \S+$", (bundle / "BUNDLE").read_text(), re.M)
    for exe in ("bin/llama-pow", "tests/gpu_parity", "tests/unit"):
        path = bundle / exe
        assert os.access(path, os.X_OK), exe
        names = section_names(path)
        assert ".text" in names, exe
        assert ".symtab" not in names and ".debug_info" not in names, (exe, names)
    version = subprocess.run(
        [str(bundle / "bin/llama-pow"), "--version"], capture_output=True, text=True, timeout=30
    )
    assert version.returncode == 0 and version.stdout.startswith("llama-pow "), version


def test_the_bundled_test_filters_name_real_gpu_tests(bundle):
    listed = subprocess.run(
        [str(bundle / "tests/unit"), "--list"], capture_output=True, text=True, timeout=60
    ).stdout
    tests = [line.split(": test")[0] for line in listed.splitlines() if line.endswith(": test")]
    # The filters the script hands the unit tests: each must select at least one test.
    line = next(l for l in SCRIPT.read_text().splitlines() if "on_the_gpu" in l)
    filters = line.split()
    assert "on_the_gpu" in filters
    for f in filters:
        assert any(f in t for t in tests), f
    assert "backend::cuda::gemm::tests::linear_matches_a_reference_on_the_gpu" in tests
    parity = subprocess.run(
        [str(bundle / "tests/gpu_parity"), "--list"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "cuda_graphs_replay_the_same_distances: test" in parity


def test_the_bundled_parity_tests_find_the_bundled_golden_files(bundle, tmp_path):
    # Run away from the source tree, with the golden files where the script points to them.
    env = dict(os.environ, LLAMA_POW_GOLDEN_DIR=str(bundle / "golden"))
    done = subprocess.run(
        [str(bundle / "tests/gpu_parity"), "tiny_f16", "--exact"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    env["LLAMA_POW_GOLDEN_DIR"] = str(tmp_path / "nowhere")
    missing = subprocess.run(
        [str(bundle / "tests/gpu_parity"), "tiny_f16", "--exact"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode != 0


@pytest.mark.skipif(has_nvidia_gpu(), reason="this machine has an NVIDIA GPU")
def test_the_bundled_script_exits_at_once_without_a_gpu(bundle):
    done = subprocess.run(
        [str(bundle / "gpu-acceptance.sh")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3 and "no NVIDIA GPU" in done.stderr, done


def write(folder, name, value):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value if isinstance(value, str) else json.dumps(value))


def distances(dist, r_target=1.3931):
    nonces = list(range(len(dist)))
    valid = [n for n, d in zip(nonces, dist) if d < r_target]
    return {"nonces": nonces, "dist": dist, "valid_nonces": valid, "valid_dist": [dist[n] for n in valid]}


def results(folder, gpu_shift=0.0):
    """A results folder as the checks leave it on a GPU host (the figures made up)."""
    steps = [
        ("gpu_unit_tests", "passed", 41, 0, ""),
        ("gpu_parity_tests", "passed", 95, 0, ""),
        ("selftest_f16", "passed", 9, 0, ""),
        ("selftest_bf16", "passed", 9, 0, ""),
        ("selftest_fp8", "passed", 9, 0, ""),
        ("v2_gpu", "passed", 20, 0, ""),
        ("v2_gpu_split", "passed", 25, 0, ""),
        ("v2_cpu", "passed", 150, 0, ""),
        ("bench", "passed", 120, 0, ""),
        ("bench_graphs", "passed", 40, 0, ""),
        ("agreement", "skipped", 0, "", "out of time (the checks get 540 s in all)"),
    ]
    write(folder, "steps.tsv", "".join("\t".join(map(str, s)) + "\n" for s in steps))
    write(folder, "host.txt", "cores 64\nmem_available_gib 900\ngpu 0, NVIDIA H100 80GB HBM3, 580.65.06, 81559 MiB\n")
    write(folder, "gpu_unit_tests.log", "test result: ok. 5 passed; 0 failed; 0 ignored\n")
    write(folder, "gpu_parity_tests.log", "test result: ok. 15 passed; 0 failed; 0 ignored\n")
    for dtype in ("f16", "bf16", "fp8"):
        device = {"device": "cuda:0", "passed": True, "max_abs_diff": 3e-7, "cases": [{"failure": None}]}
        write(folder, f"selftest_{dtype}.json", {"passed": True, "devices": [device]})
    write(folder, "v2_request.json", {"r_target": 1.3931})
    cpu = [1.401, 1.389, 1.420, 1.3925]
    write(folder, "v2_cpu.json", distances(cpu))
    write(folder, "v2_gpu.json", distances([d + 1e-6 + gpu_shift for d in cpu]))
    write(folder, "v2_gpu_split.json", distances([d + 2e-6 for d in cpu] + [1.41] * 188))
    result = lambda dtype, bs, nps: {"dtype": dtype, "batch_size": bs, "nonces_per_second": nps}
    write(folder, "bench/report.json", {
        "results": [result("f16", 64, 50.0), result("f16", 192, 70.0), result("bf16", 64, 52.0)],
        "start": {"f16": {"cold_seconds": 4.2, "cached_seconds": 0.21}},
        "ceiling": {"f16": {"ceiling_nonces_per_second": 80.0, "fraction_of_ceiling": 0.875}},
        "cuda_graph_events": {"captures": 0, "replays": 0, "fallbacks": 0, "dropped": 0},
    })
    write(folder, "bench_graphs/report.json", {
        "results": [result("f16", 64, 51.0), result("f16", 192, 73.5)],
        "cuda_graph_events": {"captures": 2, "replays": 60, "fallbacks": 0, "dropped": 1},
    })


def summarize(folder):
    return subprocess.run(
        [str(SCRIPT), "--summarize", str(folder)], capture_output=True, text=True, timeout=60
    )


def test_the_summary_holds_every_figure_and_ends_with_the_table(tmp_path):
    results(tmp_path)
    done = summarize(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout.strip().splitlines()
    assert table[0].split() == ["check", "result", "figures"]
    assert table[-1].split()[:2] == ["overall", "PASSED"]
    assert (tmp_path / "table.txt").read_text().strip() == done.stdout.strip()
    rows = {line[:18].strip(): line for line in table}
    assert "unit 5 passed 0 failed, parity 15 passed 0 failed" in rows["GPU tests"]
    assert "GPU vs CPU max |diff| 1.0e-06 (4 nonces), batch 192 vs CPU 2.0e-06" in rows["V2 full size"]
    assert "70.0 nonces/s at 192, cold 4.2 s, cached 0.21 s, 0.88 of ceiling" in rows["bench f16"]
    assert "73.5 nonces/s (+5.0%), 2 captures, 60 replays, 0 fallbacks" in rows["bench f16 graphs"]
    assert "skipped" in rows["agreement"]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["passed"] is True and s["failed_checks"] == []
    assert s["steps"]["agreement"]["reason"].startswith("out of time")
    v2 = s["figures"]["v2_full_size"]
    assert v2["gpu_vs_cpu"]["passed"] and v2["gpu_batch_192_vs_cpu"]["passed"]
    assert v2["gpu_vs_cpu"]["flips"] == []
    assert s["figures"]["bench"]["sweep"]["f16"]["fraction_of_ceiling"] == 0.875
    assert s["figures"]["bench"]["cuda_graphs"]["f16"]["events"]["replays"] == 60
    assert s["figures"]["selftest"]["fp8"]["max_abs_diff"] == 3e-7
    assert s["host"]["gpus"] == ["0, NVIDIA H100 80GB HBM3, 580.65.06, 81559 MiB"]


def test_a_gpu_distance_off_by_more_than_the_tolerance_fails_the_acceptance(tmp_path):
    # 3e-5 moves no nonce across r_target here, but is beyond 2e-5.
    results(tmp_path, gpu_shift=3e-5)
    done = summarize(tmp_path)
    assert done.returncode == 1
    assert done.stdout.strip().splitlines()[-1].split()[:2] == ["overall", "FAILED"]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["passed"] is False and s["failed_checks"] == ["v2_full_size"]
    # A flip fails it too: nonce 3 lies 6e-4 below r_target.
    results(tmp_path, gpu_shift=7e-4)
    s = summarize(tmp_path)
    assert s.returncode == 1
    flips = json.loads((tmp_path / "summary.json").read_text())["figures"]["v2_full_size"]["gpu_vs_cpu"]["flips"]
    assert flips == [3]


# A GPU host as the script sees it: an nvidia-smi that lists a GPU, and a bundle whose
# executables answer as the real ones do (canned, at once, or after `delay` seconds).
FAKE_SMI = """#!/usr/bin/env bash
case "$1" in
    -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)" ;;
    *) echo "0, NVIDIA H100 80GB HBM3, 580.65.06, 81559 MiB" ;;
esac
"""

FAKE_TESTS = """#!/usr/bin/env python3
import os, sys, time
time.sleep(float(os.environ.get("FAKE_TEST_SECONDS", "0")))
print("golden files in", os.environ["LLAMA_POW_GOLDEN_DIR"])
print("test result: ok. 3 passed; 0 failed; 0 ignored")
"""

FAKE_LLAMA_POW = """#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
cmd = args[0]
def opt(name, default=None):
    return args[args.index(name) + 1] if name in args else default
if cmd == "selftest":
    print(json.dumps({"passed": True, "devices": [{"device": "cuda:0", "passed": True,
          "max_abs_diff": 2e-7, "cases": [{"failure": None}]}]}))
elif cmd == "compute":
    req = json.load(open(opt("--request")))
    n = req["count"]
    dist = [1.40 + 0.001 * (i % 7) for i in range(n)]
    valid = [i for i in range(n) if dist[i] < req["r_target"]]
    print(json.dumps({"nonces": list(range(n)), "dist": dist, "valid_nonces": valid,
                      "valid_dist": [dist[i] for i in valid]}))
elif cmd == "bench":
    out = opt("--out")
    os.makedirs(out, exist_ok=True)
    dtypes = opt("--dtypes").split(",")
    if "--agreement" in args:
        rows = [{"dtype": d, "max_abs_diff": 1e-4, "flips": 0, "flip_rate": 0.0} for d in dtypes[1:]]
        report = {"agreement": {"baseline": dtypes[0], "nonces": int(opt("--nonces")), "rows": rows}}
    else:
        sizes = [int(b) for b in opt("--batch-sizes").split(",")]
        report = {"results": [{"dtype": d, "batch_size": b, "nonces_per_second": 10.0 * b}
                              for d in dtypes for b in sizes],
                  "cuda_graph_events": {"captures": int("--cuda-graphs" in args), "replays": 0,
                                        "fallbacks": 0, "dropped": 0}}
    json.dump(report, open(os.path.join(out, "report.json"), "w"))
    print(json.dumps(report))
"""


def fake_gpu_host(tmp_path, bundle_dir):
    """A PATH with a fake nvidia-smi, and a bundle of fake executables around the script."""
    bin_dir = tmp_path / "path"
    bin_dir.mkdir()
    for name, text in [("nvidia-smi", FAKE_SMI)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    for rel, text in [("bin/llama-pow", FAKE_LLAMA_POW), ("tests/unit", FAKE_TESTS),
                      ("tests/gpu_parity", FAKE_TESTS)]:
        path = bundle_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    (bundle_dir / "golden").mkdir()
    shutil.copy(SCRIPT, bundle_dir / "gpu-acceptance.sh")
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def test_on_a_gpu_host_every_check_runs_and_the_table_comes_last(tmp_path):
    bundle_dir = tmp_path / "bundle"
    env = fake_gpu_host(tmp_path, bundle_dir)
    out = tmp_path / "results"
    started = time.monotonic()
    done = subprocess.run([str(bundle_dir / "gpu-acceptance.sh"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - started < 60
    s = json.loads((out / "summary.json").read_text())
    want = ["gpu_unit_tests", "gpu_parity_tests", "selftest_f16", "selftest_bf16", "selftest_fp8",
            "v2_gpu", "v2_gpu_split", "bench", "bench_graphs", "agreement"]
    for name in want:
        assert s["steps"][name]["status"] == "passed", (name, s["steps"][name])
    # The CPU half of V2 runs only with about 40 GB free: either it ran, or it says why not.
    cpu = s["steps"]["v2_cpu"]
    assert cpu["status"] == "passed" or "needs about 40 GB" in cpu["reason"], cpu
    assert s["passed"] is True
    # The GPU tests found the bundled golden files, and showed their output.
    assert f"golden files in {bundle_dir}/golden" in (out / "gpu_parity_tests.log").read_text()
    assert "test result: ok. 3 passed" in done.stdout
    # The table is the last thing printed.
    last = done.stdout.strip().splitlines()
    assert last[-1].split()[:2] == ["overall", "PASSED"]
    assert "\n".join(last[-len((out / "table.txt").read_text().strip().splitlines()):]) == \
        (out / "table.txt").read_text().strip()
    assert s["figures"]["bench"]["cuda_graphs"]["f16"]["events"]["captures"] == 1
    assert s["figures"]["v2_full_size"]["gpu_batch_192_vs_batch_4"]["passed"] is True


def test_checks_that_do_not_fit_the_time_are_stopped_or_skipped(tmp_path):
    bundle_dir = tmp_path / "bundle"
    env = fake_gpu_host(tmp_path, bundle_dir)
    # 38 s in all, 20 of them kept for the summary: the first check (which would take 60 s)
    # is stopped after 18, and nothing else fits.
    env.update(LLAMA_POW_ACCEPTANCE_SECONDS="38", FAKE_TEST_SECONDS="60")
    out = tmp_path / "results"
    started = time.monotonic()
    done = subprocess.run([str(bundle_dir / "gpu-acceptance.sh"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert took < 38, took
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"]["gpu_unit_tests"]["status"] == "failed"
    assert s["steps"]["gpu_unit_tests"]["reason"].startswith("stopped after")
    assert s["steps"]["agreement"]["status"] == "skipped"
    assert s["steps"]["agreement"]["reason"].startswith("out of time")
    assert done.stdout.strip().splitlines()[-1].split()[:2] == ["overall", "FAILED"]
