"""Runpod serverless handler for llama-pow.

Each Runpod job `{"input": {...}}` goes to the llama-pow server running in the same container
(start_server.sh), and every NDJSON line the server answers is yielded as one streamed output
(`/stream` gives them as they come; `/run` and `/runsync` get the list of all of them).

The server route follows from the input, as in the server's contract: `orchestrator_url` means
/pooled, `callback_url` means /warmup, `nonces` with `dist` (a proof batch) means /validate,
anything else is a /generate request. The input goes to
the server as `{"input": {...}}`, which the server unwraps itself.

Environment:
    MODEL_SERVER_URL           where the server listens (default http://127.0.0.1)
    MODEL_SERVER_PORT          its port (default 18000)
    SERVER_WAIT_SECONDS        how long a job waits for the server to come up (default 300)

Local test, with the server running:
    python runpod_handler.py --test_input '{"input": {...}}'
"""

import asyncio
import json
import os
import sys
import time

import aiohttp

HEALTH_PATH = "/health"


class ServerError(Exception):
    """The server refused the request or could not be reached."""


def server_base():
    url = os.environ.get("MODEL_SERVER_URL", "").strip() or "http://127.0.0.1"
    port = os.environ.get("MODEL_SERVER_PORT", "").strip() or "18000"
    return f"{url.rstrip('/')}:{int(port)}"


def route_for(request):
    """The server route a request belongs to."""
    if "orchestrator_url" in request:
        return "/pooled"
    if "callback_url" in request:
        return "/warmup"
    if "nonces" in request and "dist" in request:
        return "/validate"
    return "/generate"


async def wait_for_server(session, base, wait_seconds):
    """Poll /health until the server answers, for at most `wait_seconds`."""
    deadline = time.monotonic() + wait_seconds
    last = "no answer"
    while True:
        try:
            async with session.get(
                base + HEALTH_PATH, timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                if resp.status == 200:
                    return
                last = f"status {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            last = str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            raise ServerError(
                f"llama-pow server at {base} not ready after {wait_seconds:g} s ({last})"
            )
        await asyncio.sleep(0.5)


async def handler(job):
    """Stream the server's NDJSON answer to `job["input"]`, one object per output."""
    request = job.get("input")
    if not isinstance(request, dict):
        raise ServerError('the job input must be a JSON object: {"input": {...}}')
    base = server_base()
    wait_seconds = float(os.environ.get("SERVER_WAIT_SECONDS", "").strip() or "300")
    # No total timeout: a job streams until the server's own time limit ends it.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await wait_for_server(session, base, wait_seconds)
        url = base + route_for(request)
        async with session.post(url, json={"input": request}) as resp:
            if resp.status != 200:
                body = await resp.text()
                try:
                    detail = json.loads(body).get("error", body)
                except (ValueError, AttributeError):
                    detail = body
                raise ServerError(f"{url} answered {resp.status}: {detail}")
            # Lines can be long (a result line lists every valid nonce of a batch).
            buffered = b""
            async for chunk in resp.content.iter_any():
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
            if buffered.strip():
                yield json.loads(buffered)


async def collect(job):
    """The whole stream as one list, as `/runsync` returns it (used by the local test mode,
    which does not iterate generators)."""
    return [line async for line in handler(job)]


def local_test_mode(argv):
    """Whether the SDK will run one local test job (--test_input or test_input.json)."""
    if any(a == "--test_input" or a.startswith("--test_input=") for a in argv):
        return True
    serving = any(a == "--rp_serve_api" for a in argv) or os.environ.get(
        "RUNPOD_REALTIME_PORT"
    )
    return not serving and os.environ.get("RUNPOD_WEBHOOK_GET_JOB") is None


def main():
    import runpod

    entry = collect if local_test_mode(sys.argv[1:]) else handler
    runpod.serverless.start({"handler": entry, "return_aggregate_stream": True})


if __name__ == "__main__":
    main()
