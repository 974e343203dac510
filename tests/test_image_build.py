"""How `make image` hands the builder's pip settings to the image build (tools/image_pip_args.py):
pip inside the build must find packages where pip on this machine does, and nothing about the
builder's machine is written into the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pip_args(tool: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    clean["PIP_CONFIG_FILE"] = os.devnull  # no configuration file: only what the test sets
    out = subprocess.run(
        [sys.executable, "tools/image_pip_args.py", tool],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_local_indexes_wheels_and_ca_are_mounted_into_a_buildah_build(tmp_path):
    index = tmp_path / "mirror" / "simple"
    index.mkdir(parents=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    args = pip_args(
        "buildah",
        PIP_INDEX_URL="https://mirror.invalid/simple",
        PIP_EXTRA_INDEX_URL=f"file://{index}",
        PIP_FIND_LINKS=str(wheels),
        PIP_CERT=str(ca),
    )
    pairs = list(zip(args[::2], args[1::2], strict=True))
    # the index's pages link to ../../files/...: its parent is mounted, the URL points inside it
    assert ("-v", f"{index.parent}:/run/host-pip/0:ro") in pairs
    assert ("--build-arg", "PIP_EXTRA_INDEX_URL=file:///run/host-pip/0/simple") in pairs
    assert ("-v", f"{wheels}:/run/host-pip/1:ro") in pairs
    assert ("--build-arg", "PIP_FIND_LINKS=/run/host-pip/1") in pairs
    assert ("-v", f"{ca}:/run/host-pip/2:ro") in pairs
    assert ("--build-arg", "PIP_CERT=/run/host-pip/2") in pairs
    assert ("--build-arg", "PIP_INDEX_URL=https://mirror.invalid/simple") in pairs


def test_docker_gets_only_urls_and_an_unconfigured_pip_gives_no_argument(tmp_path):
    args = pip_args("docker", PIP_INDEX_URL="https://mirror.invalid/simple", PIP_FIND_LINKS=str(tmp_path))
    assert args == ["--build-arg", "PIP_INDEX_URL=https://mirror.invalid/simple"]
    assert pip_args("buildah") == []  # not even an empty line: it would be an empty argument
