# syntax=docker/dockerfile:1
#
# One image for every Vitrine role: ENTRYPOINT `python -m`, CMD `services.router`; a pod picks
# its role with args (services.encoder, services.shard, services.router).
#
# VARIANT selects the base of both stages:
#   cpu   python:3.11-slim                                     the router, and CPU-only clusters
#   cuda  nvidia/cuda:12.x-runtime-ubuntu22.04 + python3.11    encoder and shard on NVIDIA GPUs
#         (FAISS GPU for CUDA 12 replaces faiss-cpu; torch brings its own CUDA libraries)
#
#   docker build -t registry.example.com/vitrine/vitrine:0.1.0 .
#   docker build --build-arg VARIANT=cuda -t registry.example.com/vitrine/vitrine:0.1.0-cuda .
#
# A plain `pip install torch` pulls the CUDA build of torch (several GB) even into the CPU image;
# pass TORCH_INDEX_URL=<PyTorch's CPU wheel index> to install the CPU build there instead.

ARG VARIANT=cpu
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04

# --- the two bases ---------------------------------------------------------------------------
FROM python:3.11-slim AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python

FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# --- builder: a virtualenv with the project installed (non-editable) -------------------------
FROM base AS builder
ARG VARIANT
ARG TORCH_INDEX_URL=
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    UV_COMPILE_BYTECODE=1 \
    UV_NO_CACHE=1
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir uv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY services ./services
COPY vitrine ./vitrine
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
      uv pip install --python /opt/venv/bin/python --extra-index-url "$TORCH_INDEX_URL" \
        torch torchvision; \
    fi \
 && uv pip install --python /opt/venv/bin/python . \
 && if [ "$VARIANT" = "cuda" ]; then \
      uv pip uninstall --python /opt/venv/bin/python faiss-cpu \
      && uv pip install --python /opt/venv/bin/python faiss-gpu-cu12; \
    fi \
 && /opt/venv/bin/python -c "import faiss, open_clip, services.router, services.shard, services.encoder"

# --- runtime: the virtualenv, a non-root user, nothing else ----------------------------------
FROM base AS runtime
ARG VARIANT
RUN groupadd --system --gid 10001 vitrine \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin vitrine \
 && mkdir -p /opt/vitrine
COPY --from=builder /opt/venv /opt/venv
# The pods run with a read-only root filesystem and an emptyDir at /tmp: every cache goes there
# (open_clip writes its model config under /tmp too).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    TORCH_HOME=/tmp/.cache/torch \
    VITRINE_HOST=0.0.0.0
LABEL org.opencontainers.image.title="vitrine" \
      org.opencontainers.image.description="Vitrine multimodal product search (${VARIANT} build)"
WORKDIR /opt/vitrine
USER 10001:10001
# router 8080, encoder 8090, shard 8100: each serves /healthz, /readyz, /metrics
EXPOSE 8080 8090 8100
ENTRYPOINT ["python", "-m"]
CMD ["services.router"]
