#!/usr/bin/env bash
# Build the image from the Dockerfile: with Docker where its engine answers (`docker info`),
# else with buildah (chroot isolation, no daemon), on a debian:bookworm-slim that
# tools/image_base.sh makes from Debian's packages when no registry can be pulled from.
#
#   tools/build_image.sh TAG [PYTHON]
#
# IMAGE_TORCH_INDEX: the Dockerfile's TORCH_INDEX (default: PyTorch's CPU index when it answers
# within a few seconds, else `pypi`, the index pip here is configured with). pip inside the build
# uses this machine's pip settings (tools/image_pip_args.py); IMAGE_BUILDER=docker|buildah forces one.
set -euo pipefail

TAG="${1:?usage: tools/build_image.sh TAG [PYTHON]}"
PY="${2:-python3}"
CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
cd "$(dirname "$0")/.."

builder="${IMAGE_BUILDER:-}"
if [[ -z "$builder" ]]; then
    if command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; then
        builder=docker
    else
        builder=buildah
    fi
fi

index="${IMAGE_TORCH_INDEX:-}"
if [[ -z "$index" ]]; then
    if timeout 5 "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=4).read(1)" \
        "$CPU_INDEX/torch/" >/dev/null 2>&1; then
        index="$CPU_INDEX"
    else
        index=pypi
        echo "image: $CPU_INDEX not reachable: torch from the index pip is configured with"
    fi
fi

mapfile -t pip_args < <("$PY" tools/image_pip_args.py "$builder")
start=$SECONDS
echo "image: $TAG with $builder, TORCH_INDEX=$index"
if [[ "$builder" == docker ]]; then
    docker build --build-arg "TORCH_INDEX=$index" "${pip_args[@]}" -t "$TAG" .
else
    bash tools/image_base.sh
    # --layers: an unchanged step is taken from the last build on this machine
    buildah bud --isolation chroot --layers --pull=never --format docker \
        --build-arg "TORCH_INDEX=$index" "${pip_args[@]}" -t "$TAG" .
fi
echo "image: $TAG built in $((SECONDS - start)) s"
