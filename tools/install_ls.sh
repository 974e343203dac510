#!/usr/bin/env bash
# Install Label Studio into its own virtualenv (.venv-ls), apart from the backend's .venv:
# its pinned Django stack must not constrain ours. Idempotent: a stamp file named after the
# version skips the work once it has succeeded. Fails loudly (non-zero, pip's log on stderr).
#
#   tools/install_ls.sh [VENV_DIR]        LS_VERSION=1.23.2 by default, PYTHON=python3
set -euo pipefail

LS_VERSION="${LS_VERSION:-1.23.2}"
PYTHON="${PYTHON:-python3}"
VENV="${1:-.venv-ls}"
STAMP="$VENV/.installed-label-studio-$LS_VERSION"

if [[ -f "$STAMP" ]]; then
    exit 0
fi
# Two test sessions starting at once must not run pip into the same venv together.
exec 9>"${TMPDIR:-/tmp}/install_ls.$(id -u).lock"
flock 9
if [[ -f "$STAMP" ]]; then
    exit 0
fi

start=$(date +%s)
echo "Installing label-studio==$LS_VERSION into $VENV (first time only, about a minute)..."
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! {
    { test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"; } &&
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip &&
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check "label-studio==$LS_VERSION" &&
        "$VENV/bin/python" -c "import importlib.metadata as m; v = m.version('label-studio'); assert v == '$LS_VERSION', v"
} >"$log" 2>&1; then
    # pip's own noise about missing local mirrors is not the error: leave it out.
    grep -v "^WARNING: Location 'file:" "$log" | tail -n 60 >&2
    echo "ERROR: could not install label-studio==$LS_VERSION into $VENV (needs the PyPI registry)." >&2
    exit 1
fi
touch "$STAMP"
echo "label-studio==$LS_VERSION installed in $(($(date +%s) - start)) s"
