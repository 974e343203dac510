# syntax=docker/dockerfile:1
# The SAM2 ML backend for Label Studio, served by gunicorn (deploy/gunicorn.conf.py).
#
# GPU (default): PyTorch with CUDA comes from the base image. The same image runs on a machine
# without a GPU (DEVICE=auto falls back to the CPU). A smaller CPU-only image:
#   docker build --build-arg BASE_IMAGE=python:3.11-slim -t label-studio-sam2:cpu .
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/hf \
    EMBEDDING_STORE_DIR=/models/embeddings \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MALLOC_ARENA_MAX=2 \
    HOST=0.0.0.0 \
    PORT=9090

# HOST=0.0.0.0: in a container the port is published by Docker, so listen on every interface
# (outside Docker, `serve` listens on 127.0.0.1 unless told otherwise).
# MALLOC_ARENA_MAX=2: glibc's per-thread malloc arenas otherwise add ~0.5 GB of RSS to a worker
# serving 8 threads (bench/load.py: 1288 -> 1755 MB without, 1189 -> 1206 MB with).
WORKDIR /app

# torch: keep the base image's build (CUDA); a base image without torch gets the CPU wheel. The
# installed version is then pinned as a constraint, so no requirement can swap in another build.
ARG TORCH_CPU_VERSION=2.13.0
COPY requirements.txt .
RUN python -c "import torch" 2>/dev/null \
        || pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_CPU_VERSION}"; \
    python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/torch-pin.txt \
    && pip install -c /tmp/torch-pin.txt -r requirements.txt \
    && rm /tmp/torch-pin.txt \
    && python -c "import torch, transformers, flask, gunicorn; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# An unprivileged user; /models (HF cache, converted checkpoints, embedding store) is its volume.
RUN groupadd --gid 10001 sam2 \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin sam2 \
    && mkdir -p /models/hf /models/embeddings \
    && chown -R 10001:10001 /models

COPY backend/ backend/
COPY sam2/ sam2/
COPY deploy/gunicorn.conf.py deploy/gunicorn.conf.py

USER 10001:10001
VOLUME ["/models"]
EXPOSE 9090

# /health answers without auth and while the model loads; the start period covers the first boot.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '9090'), timeout=4)"]

# gunicorn as PID 1 gets SIGTERM from `docker stop` and finishes requests in flight
# (graceful_timeout); compose's stop_grace_period must be longer.
STOPSIGNAL SIGTERM
CMD ["gunicorn", "--config", "deploy/gunicorn.conf.py", "backend.wsgi:app"]
