#!/usr/bin/env bash
# The project's test command: the Rust tests, then the SDK end-to-end tests (the Vast.ai
# PyWorker, the Runpod handler, start_server.sh, the Dockerfile and workflow lints) against a
# freshly built release server on loopback.
#
#   scripts/test.sh             everything (what .ci/run runs)
#   scripts/test.sh --sdk-only  only the SDK end-to-end tests
#
# The Python side lives in a virtual environment in .venv/ (git-ignored; VENV overrides the
# place, PYTHON the interpreter that creates it), filled from worker/requirements-test.txt
# with the pinned SDKs and NVIDIA's NVRTC wheel: NVRTC needs no GPU, so with it on the
# library path the Rust tests compile every CUDA kernel for each supported architecture.
# Without Python the SDK tests (and the kernel compilation test) are skipped, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=all
case "${1:-}" in
    "") ;;
    --sdk-only) mode=sdk ;;
    *)
        echo "usage: scripts/test.sh [--sdk-only]" >&2
        exit 2
        ;;
esac

python="${PYTHON:-python3}"
venv="${VENV:-.venv}"
have_python=0
if command -v "$python" >/dev/null 2>&1; then
    have_python=1
    if [[ ! -x "$venv/bin/python" ]]; then
        "$python" -m venv "$venv"
    fi
    # Install only when the requirements changed since the last install.
    stamp="$venv/.llama-pow-requirements"
    want="$(cat worker/requirements*.txt | sha256sum | cut -d' ' -f1) $("$venv/bin/python" -V 2>&1)"
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        "$venv/bin/python" -m pip install --disable-pip-version-check -q -r worker/requirements-test.txt
        echo "$want" > "$stamp"
    fi
    # NVRTC from its wheel, for the kernel compilation test.
    nvrtc_lib="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13/lib"
    if [[ -d "$nvrtc_lib" ]]; then
        export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
fi

if [[ "$mode" == all ]]; then
    cargo test --release
    # Say whether the GPU half ran: without a usable GPU those tests skip themselves, and
    # this prints why.
    echo "GPU parity: $(cargo test --release -q --test gpu_parity gpu_and_cpu_agree_on_every_distance -- --nocapture 2>&1 | grep -E 'skipped|vs cpu' | head -3)"
fi

if [[ "$have_python" == 0 ]]; then
    echo "SDK end-to-end tests SKIPPED: no $python on PATH (they need Python 3.10 or newer)"
    exit 0
fi

# The server binary the end-to-end tests start.
cargo build --release --bin llama-pow

export PYTHONDONTWRITEBYTECODE=1
export LLAMA_POW_BIN="$PWD/target/release/llama-pow"
# Bounded: the suite takes about a minute; a hung test must not hold CI.
timeout --kill-after=30 900 "$venv/bin/python" -m pytest worker/tests -p no:cacheprovider -rs
