#!/usr/bin/env bash
# Start the llama-pow server with its output in a fresh log file and on standard output.
#
#   start_server.sh [llama-pow serve options...]
#
# MODEL_LOG (default /var/log/model/server.log) is the file the PyWorker tails. An existing
# one is renamed to MODEL_LOG.1 (older ones move up to MODEL_LOG.<MODEL_LOG_KEEP>, default 5),
# never truncated: the PyWorker reads a log from its start and notices a new log only by its
# new inode. Every server option can also come from its LLAMA_POW_* environment variable
# (LLAMA_POW_PORT, LLAMA_POW_DEVICE, LLAMA_POW_MAX_JOB_SECONDS, ...), which the server reads.
# LLAMA_POW_BIN names the binary (default: llama-pow beside this script, then on PATH, then
# target/release/llama-pow under this script's folder).
# SIGTERM, SIGINT and SIGHUP are passed to the server, which shuts down cleanly on each; the
# script exits with the server's status. A server that fails on its own leaves the line
# "Error: llama-pow serve exited with status N" in the log, which the PyWorker treats as fatal.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log="${MODEL_LOG:-/var/log/model/server.log}"
keep="${MODEL_LOG_KEEP:-5}"

bin="${LLAMA_POW_BIN:-}"
if [[ -z "$bin" ]]; then
    if [[ -x "$here/llama-pow" ]]; then
        bin="$here/llama-pow"
    elif command -v llama-pow >/dev/null 2>&1; then
        bin="$(command -v llama-pow)"
    elif [[ -x "$here/target/release/llama-pow" ]]; then
        bin="$here/target/release/llama-pow"
    else
        echo "start_server.sh: no llama-pow binary found (set LLAMA_POW_BIN)" >&2
        exit 127
    fi
fi
if ! [[ "$keep" =~ ^[1-9][0-9]*$ ]]; then
    echo "start_server.sh: MODEL_LOG_KEEP must be a positive integer, got '$keep'" >&2
    exit 2
fi

mkdir -p "$(dirname "$log")"
# Rotate by renaming: the oldest kept log goes, the others move up one.
if [[ -e "$log" ]]; then
    for ((i = keep - 1; i >= 1; i--)); do
        if [[ -e "$log.$i" ]]; then
            mv -f "$log.$i" "$log.$((i + 1))"
        fi
    done
    mv -f "$log" "$log.1"
fi

# From here on everything this script and the server print goes to the new log and to stdout.
# tee writes each line as it reads it, and the server writes a line at a time.
exec > >(tee -a "$log") 2>&1
tee_pid=$!

# Signals go to the server. The traps are in place before it starts, so that a signal cannot
# end this script and leave the server behind.
server_pid=""
signalled=""
interrupted=0
# shellcheck disable=SC2317,SC2329  # reached through the traps below
forward() {
    signalled="$1"
    interrupted=1
    if [[ -n "$server_pid" ]]; then
        kill "-$1" "$server_pid" 2>/dev/null || true
    fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP

"$bin" serve "$@" &
server_pid=$!
if [[ -n "$signalled" ]]; then
    kill "-$signalled" "$server_pid" 2>/dev/null || true
fi

# A trapped signal ends `wait` early; wait again until it gives the server's own status (127
# once the server was already waited for: then the status is the one we have).
status=""
while true; do
    interrupted=0
    rc=0
    wait "$server_pid" || rc=$?
    if [[ "$rc" -eq 127 && -n "$status" ]]; then
        break
    fi
    status="$rc"
    if [[ "$interrupted" -eq 0 ]]; then
        break
    fi
done

# A server that stops by itself with a failure is fatal: say so in the PyWorker's words, so that
# the worker is reported as errored instead of waiting for a ready line that will not come.
if [[ "$status" -ne 0 && -z "$signalled" ]]; then
    echo "Error: llama-pow serve exited with status $status"
fi

# Let tee write out the last lines before exiting.
exec >&- 2>&-
for _ in $(seq 100); do
    kill -0 "$tee_pid" 2>/dev/null || break
    sleep 0.05
done
exit "$status"
