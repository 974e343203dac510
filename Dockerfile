# syntax=docker/dockerfile:1
# The SAM2 ML backend for Label Studio, served by gunicorn (deploy/gunicorn.conf.py).
#
# Debian bookworm's python3 (3.11) in a virtualenv, and torch 2.13.0, the version the tests run.
# One build argument, TORCH_INDEX, picks its build; every other line is the same in both images:
#   GPU (default): PyTorch's CUDA 13.0 build (cu130 index; the CUDA libraries come with the
#                  wheels, the driver, 580 or newer, from the host). It also runs without a GPU.
#     docker build -t label-studio-sam2 .
#   CPU: PyTorch's CPU build, ~2 GB smaller. `make image` builds this one, and CI builds and runs it.
#     docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t label-studio-sam2:cpu .
# TORCH_INDEX=pypi takes torch from the package index pip is configured with (PyPI's Linux wheel
# of torch 2.13.0 is the same CUDA 13.0 build).
FROM debian:bookworm-slim

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
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

# Debian's python3 and its venv module; versions follow bookworm's (security) point releases, so
# they are not pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && python -c "import sys; assert sys.version_info >= (3, 11), sys.version"

# Where pip finds packages, when the default index is not the one to use (a mirror, a proxy's CA,
# a directory of wheels): read from the environment of whoever builds (`make image` passes the
# builder's own pip settings); none is set by default. Not kept in the image's environment.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT

# torch first, from TORCH_INDEX (its own layer: a change of requirements.txt reuses it); the
# installed build is then pinned as a constraint, so no requirement can swap in another one.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
RUN if [ "$TORCH_INDEX" = pypi ]; then pip install "torch==${TORCH_VERSION}"; \
    else pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"; fi \
    && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__" \
    && python -c "import sys, torch; assert torch.version.cuda or '/cu' not in sys.argv[1], 'a CPU build from a CUDA index'" "$TORCH_INDEX"

COPY requirements.txt .
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-pin.txt \
    && pip install -c /tmp/torch-pin.txt -r requirements.txt \
    && rm /tmp/torch-pin.txt \
    && python -c "import torch, transformers, flask, gunicorn; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# An unprivileged user; /models (HF cache, converted checkpoints, embedding store) is its volume.
RUN groupadd --gid 10001 sam2 \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin sam2 \
    && mkdir -p /models/hf /models/embeddings \
    && chown -R 10001:10001 /models

COPY pyproject.toml README.md ./
COPY label_studio_sam2/ label_studio_sam2/
# the package itself, for the `label-studio-sam2` command (its requirements are installed above)
RUN pip install --no-deps --no-build-isolation . \
    && label-studio-sam2 --help > /dev/null \
    && rm -rf build ./*.egg-info
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
CMD ["gunicorn", "--config", "deploy/gunicorn.conf.py", "label_studio_sam2.labelstudio.wsgi:app"]
