#!/usr/bin/env bash
# Install torch==$TORCH_VERSION into a virtualenv, from a source that suits this machine.
#
#   tools/install_torch.sh VENV_PYTHON
#
# Where torch comes from (TORCH_INDEX overrides):
#   TORCH_INDEX=URL    that index, e.g. https://download.pytorch.org/whl/cu128 (a CUDA build)
#                      or https://download.pytorch.org/whl/cpu
#   TORCH_INDEX=pypi   the package registry pip is configured with (PyPI's Linux wheel is CUDA)
#   unset              an NVIDIA GPU (nvidia-smi lists one): the registry's build, which is CUDA
#                      on Linux; otherwise PyTorch's CPU index when it answers within a few
#                      seconds (a ~200 MB CPU wheel instead of the multi-GB CUDA one), else the
#                      registry (a machine that reaches only PyPI or a mirror of it).
set -euo pipefail

PY="${1:?usage: tools/install_torch.sh VENV_PYTHON}"
VERSION="${TORCH_VERSION:-2.13.0}"
CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
PROBE_S="${TORCH_INDEX_PROBE_S:-4}"

reachable() {
    # connect and read timeouts, and a hard limit for a DNS lookup that hangs
    timeout "$((PROBE_S + 1))" "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=$PROBE_S).read(1)" "$1/torch/" >/dev/null 2>&1
}

index="${TORCH_INDEX:-}"
if [[ -z "$index" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        index=pypi
        echo "torch: an NVIDIA GPU is present: the registry's CUDA build of torch==$VERSION"
    elif reachable "$CPU_INDEX"; then
        index="$CPU_INDEX"
        echo "torch: the CPU build of torch==$VERSION from $CPU_INDEX"
    else
        index=pypi
        echo "torch: $CPU_INDEX not reachable: torch==$VERSION from the package registry"
    fi
else
    echo "torch: torch==$VERSION from TORCH_INDEX=$index"
fi

# numpy before torch: the build report below imports torch, which warns "Failed to initialize
# NumPy" when numpy is not installed yet (it comes with requirements.txt, after this script).
NUMPY_SPEC="$(grep -E '^numpy[<>=! ]' "$(dirname "$0")/../requirements.txt" | cut -d'#' -f1 | tr -d ' ')"
"$PY" -m pip install -q "${NUMPY_SPEC:-numpy}"

if [[ "$index" == pypi ]]; then
    "$PY" -m pip install -q "torch==$VERSION"
else
    "$PY" -m pip install -q --index-url "$index" "torch==$VERSION"
fi
# Which build it is, and whether it sees a GPU. A CUDA build without a GPU works (on the CPU),
# it is only larger than it needs to be.
"$PY" - <<'PYEOF'
import torch

cuda = torch.version.cuda
gpu = torch.cuda.is_available()
print(f"torch {torch.__version__}: {'CUDA ' + cuda if cuda else 'CPU'} build, {'a GPU' if gpu else 'no GPU'} visible")
if cuda and not gpu:
    print("  (a CUDA build on a machine without a visible GPU: it runs on the CPU; for the smaller CPU "
          "build: rm -rf .venv && make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu)")
PYEOF
