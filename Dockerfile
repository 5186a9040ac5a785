# syntax=docker/dockerfile:1
#
# llama-pow image: the server (start_server.sh) plus the Vast.ai PyWorker and the Runpod
# handler with their SDKs. The CUDA libraries the server loads at run time (cuBLASLt, NVRTC)
# come from the CUDA runtime base; the driver comes from the host (docker run --gpus all).
# CUDA 13: the CUDA backend loads libcublasLt.so.13 and libnvrtc.so.13, and the hosts run
# driver 580 or newer.

ARG RUST_VERSION=1.95
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---- build: the release binary ------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /build
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY assets ./assets
COPY kernels ./kernels
# The OpenAPI document the server serves at /openapi.json, built into the binary.
COPY docs/openapi.json ./docs/openapi.json
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin llama-pow \
    && install -m 0755 target/release/llama-pow /usr/local/bin/llama-pow

# ---- runtime: CUDA runtime libraries, the binary, the worker -------------------------------
FROM ${CUDA_IMAGE} AS runtime

# Python for the PyWorker and the Runpod handler. Package versions follow the pinned base
# image's distribution release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY worker/requirements.txt worker/requirements-runpod.txt /app/worker/
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir \
        -r /app/worker/requirements.txt -r /app/worker/requirements-runpod.txt

COPY --from=build /usr/local/bin/llama-pow /app/llama-pow
COPY start_server.sh /app/start_server.sh
COPY worker/worker.py worker/runpod_handler.py /app/worker/

# The server runs as an unprivileged user; it writes only its log (and the PyWorker its
# .has_benchmark file in /app/worker).
RUN groupadd --system --gid 10001 llamapow \
    && useradd --system --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin llamapow \
    && mkdir -p /var/log/model \
    && chown 10001:10001 /var/log/model /app/worker

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MODEL_LOG=/var/log/model/server.log \
    LLAMA_POW_LOG=info \
    LLAMA_POW_PORT=18000 \
    LLAMA_POW_DEVICE=auto

USER 10001:10001
EXPOSE 18000

HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LLAMA_POW_PORT', '18000') + '/health', timeout=5)"]

CMD ["/app/start_server.sh"]
