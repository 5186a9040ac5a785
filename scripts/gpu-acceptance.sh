#!/usr/bin/env bash
# Check a GPU machine before serving from it: one command that says whether llama-pow's GPU
# path works there, and how fast it is.
#
#   scripts/gpu-acceptance.sh --bundle DIR   on any x86-64 machine with the Rust toolchain:
#                                            build DIR, a self-contained bundle (under 64 MiB)
#   DIR/gpu-acceptance.sh [--out RESULTS]    on the GPU host (NVIDIA driver, Python with the
#                                            CUDA 13 pip wheels; no Rust, no network needed):
#                                            run every check, at most 9 minutes
#   gpu-acceptance.sh --summarize RESULTS    rebuild RESULTS/summary.json and the table
#
# The bundle holds the stripped release binary (bin/llama-pow), the stripped GPU test
# executables of `cargo test --release --no-run` (tests/gpu_parity, tests/unit), the golden
# files (golden/) and this script. On the GPU host the checks are, in this order, each within
# what is left of the 9 minutes (a check that would not fit is skipped, saying so):
#   1. the GPU tests, with their output: the library's GPU unit tests (cuBLASLt products
#      against a reference, the ceiling, discovery, every kernel compiled), then every GPU
#      parity test (golden cases on each GPU and on a group of two, CUDA graphs, FP8);
#   2. the start-up self-test in f16, bf16 and fp8 (`llama-pow selftest --device cuda`);
#   3. PARAMS_V2 at full size, GPU against CPU: 4 nonces in batches of 4 on both, and the
#      same nonces inside a batch of 192 on the GPU (whose FFN products are split below 2^31
#      elements); the CPU side needs about 40 GB of free memory (V2 in f16) and is skipped,
#      saying so, when the host has less; it runs in the background from the start, beside
#      1 and 2, and is waited for before 4;
#   4. `llama-pow bench` on V2: f16, bf16 and fp8 at batches of 64 and 192 (cold and cached
#      start, the cuBLASLt ceiling), then f16 again with CUDA graphs; and the agreement run
#      (2,000 nonces in each dtype, flips at an r_target making 1 nonce in 500 valid).
# Results go to one folder (default: ./gpu-acceptance-<UTC time>): each check's log and
# output, summary.json (every figure, every pass or fail) and a short table, printed last.
# Exit status: 0 when every check that ran passed, 1 when one failed, 2 on bad usage, 3 when
# this machine has no NVIDIA GPU (nothing is run then).
#
# The CUDA 13 libraries (NVRTC, cuBLASLt) are taken from LD_LIBRARY_PATH, or else from the
# NVIDIA pip wheels of the Python on PATH (site-packages/nvidia/*/lib).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/$(basename "${BASH_SOURCE[0]}")"
# All the checks together (LLAMA_POW_ACCEPTANCE_SECONDS shortens it, for tests of this
# script), and what is kept back for the summary at the end.
TOTAL_SECONDS=${LLAMA_POW_ACCEPTANCE_SECONDS:-540}
SUMMARY_RESERVE=20
# The bundle's size limit.
BUNDLE_LIMIT=$((64 * 1024 * 1024))

usage() {
    sed -n '2,11p' "$self" | sed 's/^# \{0,1\}//'
}

die() {
    echo "gpu-acceptance: $*" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------
# The bundle

make_bundle() {
    local dir="$1" root
    root="$(cd "$here/.." && pwd)"
    [[ -f "$root/Cargo.toml" ]] || die "--bundle runs from the repository (scripts/gpu-acceptance.sh)"
    command -v cargo >/dev/null || die "--bundle needs cargo (the Rust toolchain)"
    command -v python3 >/dev/null || die "--bundle needs python3 (to read cargo's messages)"
    (cd "$root" && cargo build --release --bin llama-pow) || die "cargo build failed"
    local messages
    messages="$(cd "$root" && cargo test --release --no-run --message-format=json)" ||
        die "cargo test --no-run failed"
    # The executables of the GPU parity tests and of the library's unit tests.
    local exes
    exes="$(python3 -c '
import json, sys
found = {}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if not m["profile"]["test"]:
        continue
    t = m["target"]
    if t["name"] == "gpu_parity" and "test" in t["kind"]:
        found["gpu_parity"] = m["executable"]
    elif t["name"] == "llama_pow" and "lib" in t["kind"]:
        found["unit"] = m["executable"]
for name in ("gpu_parity", "unit"):
    print(name, found[name])
' <<<"$messages")" || die "cargo did not name the test executables"
    rm -rf "$dir"
    mkdir -p "$dir/bin" "$dir/tests" "$dir/golden" || die "cannot create $dir"
    strip_to "$root/target/release/llama-pow" "$dir/bin/llama-pow"
    while read -r name exe; do
        strip_to "$exe" "$dir/tests/$name"
    done <<<"$exes"
    cp "$root"/tests/golden/* "$dir/golden/"
    cp "$self" "$dir/gpu-acceptance.sh"
    chmod +x "$dir/gpu-acceptance.sh"
    {
        echo "commit $(cd "$root" && git rev-parse HEAD 2>/dev/null || echo unknown)"
        echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "rustc $(rustc --version 2>/dev/null || echo unknown)"
    } >"$dir/BUNDLE"
    local bytes
    bytes="$(du -sb "$dir" | cut -f1)"
    if ((bytes >= BUNDLE_LIMIT)); then
        die "the bundle is $((bytes / 1024 / 1024)) MiB, over the 64 MiB limit"
    fi
    echo "bundle: $dir ($((bytes / 1024 / 1024)) MiB); on the GPU host run $dir/gpu-acceptance.sh"
}

# Copy an executable without its symbols and debug information.
strip_to() {
    if command -v strip >/dev/null; then
        strip -o "$2" "$1" || die "strip $1 failed"
    else
        cp "$1" "$2" || die "cannot copy $1"
    fi
    chmod +x "$2"
}

# ---------------------------------------------------------------------------------------------
# The checks

has_nvidia_gpu() {
    compgen -G '/dev/nvidia[0-9]*' >/dev/null && return 0
    command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}

# Directories of the NVIDIA pip wheels' libraries that hold a CUDA 13 NVRTC or cuBLASLt.
wheel_lib_dirs() {
    local py
    for py in python3 python; do
        command -v "$py" >/dev/null || continue
        "$py" - <<'EOF' 2>/dev/null && return
import glob, os, site, sysconfig
roots = set(site.getsitepackages() + [site.getusersitepackages(), sysconfig.get_paths()["purelib"]])
dirs = []
for root in sorted(roots):
    for d in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib"))):
        if glob.glob(os.path.join(d, "libnvrtc.so.13")) or glob.glob(os.path.join(d, "libcublasLt.so.13")):
            dirs.append(d)
print(":".join(dirs))
EOF
    done
}

now() { date +%s; }

# step NAME BUDGET COMMAND...: run COMMAND with its output in $out/NAME.log, for at most
# BUDGET seconds or what is left of the total, and record how it went in $out/steps.tsv.
step() {
    local name="$1" budget="$2"
    shift 2
    local left=$((deadline - SUMMARY_RESERVE - $(now)))
    if ((left < 15)); then
        printf '%s\tskipped\t0\t\tout of time (the checks get %d s in all)\n' "$name" "$TOTAL_SECONDS" >>"$out/steps.tsv"
        echo "== $name: skipped, out of time"
        return 1
    fi
    ((budget > left)) && budget=$left
    echo "== $name (at most ${budget} s)"
    local t0 rc
    t0=$(now)
    if [[ "$name" == gpu_*_tests ]]; then
        # The GPU tests' own output on the terminal too.
        timeout --kill-after=10 "$budget" "$@" 2>&1 | tee "$out/$name.log"
        rc=${PIPESTATUS[0]}
    else
        timeout --kill-after=10 "$budget" "$@" >"$out/$name.log" 2>&1
        rc=$?
    fi
    local took=$(($(now) - t0)) status=passed reason=""
    if ((rc == 124 || rc == 137)); then
        status=failed
        reason="stopped after ${budget} s"
    elif ((rc != 0)); then
        status=failed
        reason="exit status $rc"
    fi
    printf '%s\t%s\t%d\t%d\t%s\n' "$name" "$status" "$took" "$rc" "$reason" >>"$out/steps.tsv"
    echo "   $name: $status in ${took} s${reason:+ ($reason)}"
    [[ "$status" == passed ]]
}

skip() {
    printf '%s\tskipped\t0\t\t%s\n' "$1" "$2" >>"$out/steps.tsv"
    echo "== $1: skipped, $2"
}

# A PARAMS_V2 request for `llama-pow compute`: COUNT nonces from 0 in batches of BATCH.
v2_request() {
    cat <<EOF
{"block_hash": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
 "public_key": "gonka1validatorkeyexample000000000000000000",
 "params": {"dim": 1792, "n_layers": 64, "n_heads": 64, "n_kv_heads": 64,
            "vocab_size": 8196, "ffn_dim_multiplier": 10.0, "multiple_of": 8192,
            "rope_theta": 10000.0, "seq_len": 256},
 "start_nonce": 0, "r_target": 1.3931, "count": $1, "batch_size": $2, "dtype": "f16"}
EOF
}

mem_available_gib() {
    awk '/^MemAvailable:/ {printf "%d", $2 / 1048576}' /proc/meminfo 2>/dev/null
}

run_checks() {
    local results="$1"
    if ! has_nvidia_gpu; then
        echo "gpu-acceptance: no NVIDIA GPU on this machine (no /dev/nvidia* device node, and no" \
            "nvidia-smi that lists a GPU): nothing to check. Run it on the GPU host, from a bundle" \
            "made with scripts/gpu-acceptance.sh --bundle DIR." >&2
        exit 3
    fi
    local bin="$here/bin/llama-pow"
    [[ -x "$bin" && -x "$here/tests/gpu_parity" && -x "$here/tests/unit" ]] ||
        die "no bundle next to this script: make one with scripts/gpu-acceptance.sh --bundle DIR and run DIR/gpu-acceptance.sh"
    out="${results:-$PWD/gpu-acceptance-$(date -u +%Y%m%d-%H%M%S)}"
    mkdir -p "$out" || die "cannot create $out"
    out="$(cd "$out" && pwd)"
    : >"$out/steps.tsv"
    deadline=$(($(now) + TOTAL_SECONDS))
    local libs
    libs="$(wheel_lib_dirs)"
    if [[ -n "$libs" ]]; then
        export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    {
        echo "started $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "cuda_libs ${libs:-(LD_LIBRARY_PATH only)}"
        echo "cores $(nproc)"
        echo "mem_available_gib $(mem_available_gib)"
        command -v nvidia-smi >/dev/null &&
            nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader |
            sed 's/^/gpu /'
        [[ -f "$here/BUNDLE" ]] && sed 's/^/bundle_/' "$here/BUNDLE"
    } >"$out/host.txt" 2>&1
    export LLAMA_POW_GOLDEN_DIR="$here/golden"
    export LLAMA_POW_LOG=warn

    # PARAMS_V2 on the CPU takes minutes of every host core and about 40 GB of memory in f16: it
    # starts first and runs in the background, beside the checks of correctness on the GPUs
    # (whose speed is not measured), and it is waited for before speed is.
    v2_request 4 4 >"$out/v2_request.json"
    v2_request 192 192 >"$out/v2_split_request.json"
    local mem cpu_job=""
    mem="$(mem_available_gib)"
    if [[ -n "$mem" ]] && ((mem < 45)); then
        skip v2_cpu "V2 in f16 on the CPU needs about 40 GB of free memory, this host has ${mem} GiB"
    else
        step v2_cpu 300 sh -c "'$bin' compute --device cpu --request '$out/v2_request.json' >'$out/v2_cpu.json'" &
        cpu_job=$!
    fi

    # 1. The GPU tests.
    step gpu_unit_tests 150 "$here/tests/unit" --test-threads=1 --nocapture \
        on_the_gpu discovery_reports this_machine every_family_compiles stack_frame
    step gpu_parity_tests 200 "$here/tests/gpu_parity" --test-threads=1 --nocapture

    # 2. The self-test in every dtype served.
    local dtype
    for dtype in f16 bf16 fp8; do
        step "selftest_$dtype" 90 sh -c "'$bin' selftest --device cuda --dtype $dtype >'$out/selftest_$dtype.json'"
    done

    # 3. PARAMS_V2 at full size on the GPU: 4 nonces in batches of 4 (against the CPU's), and
    # the same nonces inside a batch of 192, whose FFN products are split.
    step v2_gpu 120 sh -c "'$bin' compute --device cuda --request '$out/v2_request.json' >'$out/v2_gpu.json'"
    step v2_gpu_split 120 sh -c "'$bin' compute --device cuda --request '$out/v2_split_request.json' >'$out/v2_gpu_split.json'"
    if [[ -n "$cpu_job" ]]; then
        echo "== waiting for v2_cpu"
        wait "$cpu_job"
    fi

    # 4. Speed: the sweep with the ceiling and the start, f16 again with CUDA graphs (the
    # mechanism is the same in every dtype; one fits the time), the agreement.
    step bench 170 "$bin" bench --params v2 --device cuda --dtypes f16,bf16,fp8 \
        --batch-sizes 64,192 --seconds 5 --json --out "$out/bench"
    step bench_graphs 80 "$bin" bench --params v2 --device cuda --dtypes f16 \
        --batch-sizes 64,192 --seconds 5 --cuda-graphs --json --out "$out/bench_graphs"
    step agreement 170 "$bin" bench --agreement --params v2 --device cuda \
        --dtypes f16,bf16,fp8 --nonces 2000 --batch-sizes 192 --json --out "$out/agreement"

    summarize "$out"
}

# ---------------------------------------------------------------------------------------------
# The summary: summary.json and the table, from what the checks left in the folder.

summarize() {
    local dir="$1"
    [[ -f "$dir/steps.tsv" ]] || die "$dir holds no checks (no steps.tsv)"
    command -v python3 >/dev/null || die "the summary needs python3"
    python3 - "$dir" <<'EOF'
import json, math, os, re, sys

d = sys.argv[1]
TOL = 2e-5


def load(name):
    try:
        with open(os.path.join(d, name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def text(name):
    try:
        with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


steps = {}
for line in text("steps.tsv").splitlines():
    name, status, seconds, rc, reason = (line.split("\t") + [""] * 5)[:5]
    steps[name] = {
        "status": status,
        "seconds": int(seconds or 0),
        "exit_code": int(rc) if rc else None,
        "reason": reason or None,
        "log": name + ".log",
    }

host = {"gpus": []}
for line in text("host.txt").splitlines():
    key, _, value = line.partition(" ")
    if key == "gpu":
        host["gpus"].append(value)
    elif key:
        host[key] = value

figures = {}
rows = []  # (check, result, figure)


def sci(x):
    return f"{x:.1e}" if isinstance(x, (int, float)) else "-" if x is None else str(x)


def result_of(*names):
    got = [steps.get(n, {}).get("status") for n in names]
    if any(g == "failed" for g in got):
        return "FAILED"
    if all(g in (None, "skipped") for g in got):
        return "skipped"
    return "passed"


# 1. The GPU tests: libtest's own counts.
tests = {}
for name in ("gpu_unit_tests", "gpu_parity_tests"):
    log = text(name + ".log")
    counts = [tuple(map(int, m)) for m in re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed", log)]
    tests[name] = {
        "passed": sum(c[0] for c in counts),
        "failed": sum(c[1] for c in counts),
        "skipped_lines": [l.strip() for l in log.splitlines() if "skipped" in l][:10],
    }
figures["gpu_tests"] = tests
rows.append((
    "GPU tests",
    result_of("gpu_unit_tests", "gpu_parity_tests"),
    "unit {p1} passed {f1} failed, parity {p2} passed {f2} failed".format(
        p1=tests["gpu_unit_tests"]["passed"], f1=tests["gpu_unit_tests"]["failed"],
        p2=tests["gpu_parity_tests"]["passed"], f2=tests["gpu_parity_tests"]["failed"]),
))

# 2. The self-tests.
selftest = {}
for dtype in ("f16", "bf16", "fp8"):
    r = load(f"selftest_{dtype}.json")
    if r is None:
        selftest[dtype] = None
        rows.append((f"self-test {dtype}", result_of(f"selftest_{dtype}"), "no report"))
        continue
    devices = [
        {"device": x["device"], "passed": x["passed"], "max_abs_diff": x["max_abs_diff"],
         "failure": next((c["failure"] for c in x["cases"] if c.get("failure")), None)}
        for x in r.get("devices", [])
    ]
    worst = max((x["max_abs_diff"] for x in devices if x["max_abs_diff"] is not None), default=None)
    selftest[dtype] = {"passed": r.get("passed"), "max_abs_diff": worst, "devices": devices}
    fig = f"{len(devices)} device(s), max |diff| {sci(worst)}"
    failed = [x for x in devices if not x["passed"]]
    if failed:
        fig += f"; {failed[0]['device']}: {failed[0]['failure']}"
    rows.append((f"self-test {dtype}", result_of(f"selftest_{dtype}"), fig))
figures["selftest"] = selftest


# 3. V2 at full size: the GPU's distances against the CPU's (or, without the CPU, the batch of
# 192 against the batch of 4 on the GPU).
def dists(name):
    r = load(name)
    if not r or "nonces" not in r:
        return None
    return dict(zip(r["nonces"], r["dist"])), r.get("valid_nonces", [])


r_target = (load("v2_request.json") or {}).get("r_target")
gpu, split, cpu = dists("v2_gpu.json"), dists("v2_gpu_split.json"), dists("v2_cpu.json")
v2 = {"r_target": r_target, "tolerance": TOL}


def number(x):
    # A distance the binary could not write as a number (NaN is written as null).
    return float("inf") if x is None else float(x)


def against(a, b):
    common = sorted(set(a[0]) & set(b[0]))
    diff = max((abs(number(a[0][n]) - number(b[0][n])) for n in common), default=None)
    if diff is not None and not math.isfinite(diff):
        diff = "not a number"
    flips = [n for n in common if (number(a[0][n]) < r_target) != (number(b[0][n]) < r_target)]
    return {"nonces": len(common), "max_abs_diff": diff, "flips": flips}


if gpu and cpu:
    v2["gpu_vs_cpu"] = against(gpu, cpu)
if split and cpu:
    v2["gpu_batch_192_vs_cpu"] = against(split, cpu)
if split and gpu:
    v2["gpu_batch_192_vs_batch_4"] = against(split, gpu)
v2["cpu"] = steps.get("v2_cpu", {}).get("reason") if not cpu else "computed"
v2_ok = True
for key in ("gpu_vs_cpu", "gpu_batch_192_vs_cpu", "gpu_batch_192_vs_batch_4"):
    c = v2.get(key)
    if c is not None:
        diff = c["max_abs_diff"]
        c["passed"] = c["nonces"] >= 4 and isinstance(diff, float) and diff <= TOL and not c["flips"]
        v2_ok = v2_ok and c["passed"]
figures["v2_full_size"] = v2
v2_result = result_of("v2_gpu", "v2_gpu_split", "v2_cpu")
if v2_result == "passed" and not v2_ok:
    v2_result = "FAILED"
if "gpu_vs_cpu" in v2:
    fig = "GPU vs CPU max |diff| {} ({} nonces), batch 192 vs CPU {}".format(
        sci(v2["gpu_vs_cpu"]["max_abs_diff"]), v2["gpu_vs_cpu"]["nonces"],
        sci(v2.get("gpu_batch_192_vs_cpu", {}).get("max_abs_diff")))
elif "gpu_batch_192_vs_batch_4" in v2:
    fig = "CPU skipped ({}); batch 192 vs 4 on the GPU max |diff| {}".format(
        v2["cpu"], sci(v2["gpu_batch_192_vs_batch_4"]["max_abs_diff"]))
else:
    fig = "no distances"
rows.append(("V2 full size", v2_result, fig))

# 4. The sweep, with and without graphs.


def best_per_dtype(report):
    best = {}
    for r in (report or {}).get("results", []):
        dt, nps = r.get("dtype"), r.get("nonces_per_second") or 0
        if dt not in best or nps > best[dt]["nonces_per_second"]:
            best[dt] = {"nonces_per_second": nps, "batch_size": r.get("batch_size")}
    return best


bench = load("bench/report.json")
graphs = load("bench_graphs/report.json")
sweep = {}
for dt, b in best_per_dtype(bench).items():
    start = (bench.get("start") or {}).get(dt) or {}
    ceiling = (bench.get("ceiling") or {}).get(dt) or {}
    sweep[dt] = dict(b, cold_seconds=start.get("cold_seconds"), cached_seconds=start.get("cached_seconds"),
                     ceiling_nonces_per_second=ceiling.get("ceiling_nonces_per_second"),
                     fraction_of_ceiling=ceiling.get("fraction_of_ceiling"),
                     ceiling_error=ceiling.get("error"))
    fig = "{:.1f} nonces/s at {}, cold {} s, cached {} s, {} of ceiling".format(
        b["nonces_per_second"], b["batch_size"],
        "-" if start.get("cold_seconds") is None else f"{start['cold_seconds']:.1f}",
        "-" if start.get("cached_seconds") is None else f"{start['cached_seconds']:.2f}",
        "-" if ceiling.get("fraction_of_ceiling") is None else f"{ceiling['fraction_of_ceiling']:.2f}")
    rows.append((f"bench {dt}", result_of("bench"), fig))
if not sweep:
    rows.append(("bench", result_of("bench"), "no report"))
with_graphs = {}
for dt, b in best_per_dtype(graphs).items():
    without = sweep.get(dt, {}).get("nonces_per_second")
    with_graphs[dt] = dict(b, without_graphs=without, events=(graphs or {}).get("cuda_graph_events"))
    ev = with_graphs[dt]["events"] or {}
    gain = "" if not without else f" ({(b['nonces_per_second'] / without - 1) * 100:+.1f}%)"
    rows.append((f"bench {dt} graphs", result_of("bench_graphs"),
                 "{:.1f} nonces/s{}, {} captures, {} replays, {} fallbacks".format(
                     b["nonces_per_second"], gain, ev.get("captures"), ev.get("replays"), ev.get("fallbacks"))))
if not with_graphs:
    rows.append(("bench graphs", result_of("bench_graphs"), "no report"))
figures["bench"] = {"sweep": sweep, "cuda_graphs": with_graphs,
                    "sweep_graph_events": (bench or {}).get("cuda_graph_events")}

# The agreement of the dtypes.
agreement = {}
a = (load("agreement/report.json") or {}).get("agreement") or {}
for r in a.get("rows", []):
    keep = ("max_abs_diff", "p99_abs_diff", "mean_diff", "flips", "flip_rate", "meets_goal",
            "nonces_per_second", "nonces_per_second_ratio")
    agreement[r["dtype"]] = {k: r.get(k) for k in keep}
    rows.append((f"agreement {r['dtype']}", result_of("agreement"),
                 "max |diff| {} vs {}, {} flips in {} nonces".format(
                     sci(r.get("max_abs_diff")), a.get("baseline"), r.get("flips"), a.get("nonces"))))
if not agreement:
    rows.append(("agreement", result_of("agreement"), "no report"))
figures["agreement"] = dict(agreement, r_target=a.get("r_target"), nonces=a.get("nonces"))

failed = [n for n, s in steps.items() if s["status"] == "failed"]
passed = not failed and v2_ok
summary = {
    "passed": passed,
    "failed_checks": failed + ([] if v2_ok else ["v2_full_size"]),
    "host": host,
    "seconds": sum(s["seconds"] for s in steps.values()),
    "steps": steps,
    "figures": figures,
}
with open(os.path.join(d, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, allow_nan=False, default=str)
    f.write("\n")

width = max(len(r[0]) for r in rows)
lines = [f"{'check'.ljust(width)}  {'result':8}  figures"]
lines += [f"{c.ljust(width)}  {res:8}  {fig}" for c, res, fig in rows]
lines.append(f"{'overall'.ljust(width)}  {'PASSED' if passed else 'FAILED':8}  {d}/summary.json")
table = "\n".join(lines)
with open(os.path.join(d, "table.txt"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
print(table)
sys.exit(0 if passed else 1)
EOF
}

# ---------------------------------------------------------------------------------------------

case "${1:-}" in
    --bundle)
        [[ $# -eq 2 ]] || die "usage: scripts/gpu-acceptance.sh --bundle DIR"
        make_bundle "$2"
        ;;
    --summarize)
        [[ $# -eq 2 ]] || die "usage: gpu-acceptance.sh --summarize RESULTS"
        summarize "$2"
        ;;
    -h | --help)
        usage
        ;;
    --out)
        [[ $# -eq 2 ]] || die "usage: gpu-acceptance.sh [--out RESULTS]"
        run_checks "$2"
        ;;
    "")
        run_checks ""
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac
