"""The builder's own pip settings, as arguments for `buildah bud` / `docker build`.

    python tools/image_pip_args.py buildah|docker

Prints one argument a line. pip inside the image build then finds packages where pip on this
machine does: the index, extra indexes, wheel directories and CA bundle of PIP_INDEX_URL,
PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS and PIP_CERT, or of pip's configuration files where the
environment does not set them. Nothing is written into the repository: every value is read here,
at build time.

buildah: a local directory or file (a path, or a file:// URL) is bind-mounted read-only into the
build under /run/host-pip/N and the value rewritten to point there. docker build cannot mount,
so only http(s) values are passed and local ones are left out (said on stderr).
"""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import unquote, urlparse

SETTINGS = {
    "PIP_INDEX_URL": "index-url",
    "PIP_EXTRA_INDEX_URL": "extra-index-url",
    "PIP_FIND_LINKS": "find-links",
    "PIP_CERT": "cert",
}


def pip_config() -> dict[str, str]:
    """pip's configuration files (`pip config list`), key without its section -> value."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.partition(".")
        if section.startswith(":env:"):
            continue  # the environment is read directly
        value = value.strip().strip("'\"")
        if name and value and section in ("global", "install"):
            found.setdefault(name, value)
    return found


def local_path(value: str) -> str | None:
    if value.startswith("file://"):
        return unquote(urlparse(value).path)
    if value.startswith("/"):
        return value
    return None


def main(tool: str) -> None:
    config = pip_config()
    args: list[str] = []
    mounts = 0
    for env, key in SETTINGS.items():
        raw = os.environ.get(env) or config.get(key)
        if not raw:
            continue
        values = []
        for value in raw.split():
            path = local_path(value)
            if path is None:
                values.append(value)
            elif not os.path.exists(path):
                continue
            elif tool == "buildah":
                # an index's pages link to its files relatively (../../files/...): mount its parent
                path = os.path.realpath(path)
                mount, tail = os.path.split(path.rstrip("/")) if key.endswith("index-url") else (path, "")
                target = f"/run/host-pip/{mounts}"
                mounts += 1
                args += ["-v", f"{mount}:{target}:ro"]
                inside = f"{target}/{tail}" if tail else target
                values.append("file://" + inside if value.startswith("file://") else inside)
            else:
                print(f"image: pip's {key} {path} is local: docker build cannot use it", file=sys.stderr)
        if values:
            args += ["--build-arg", f"{env}={' '.join(values)}"]
    if args:  # nothing at all when pip is not configured (an empty line would be an argument)
        print("\n".join(args))


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("buildah", "docker"):
        sys.exit(__doc__)
    main(sys.argv[1])
