"""The backend under gunicorn, as the Docker image runs it (`gunicorn -c deploy/gunicorn.conf.py
label_studio_sam2.labelstudio.wsgi:app`), on a loopback port with a small model: for tests of the team deployment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def start_gunicorn(model: str | Path, port: int, log_path: Path, *args: str, **env: str) -> subprocess.Popen:
    """gunicorn serving `model` on CPU at 127.0.0.1:`port`, output in `log_path`; `args` go to
    gunicorn's command line, `env` overrides the environment (which keeps none of the caller's
    Label Studio or basic auth settings, nor its PROMETHEUS_MULTIPROC_DIR)."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_")) and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    base |= {"SAM2_MODEL": str(model), "DEVICE": "cpu", "PORT": str(port), "HOST": "127.0.0.1"}
    with log_path.open("w") as log:
        return subprocess.Popen(
            [str(Path(sys.executable).with_name("gunicorn")), "-c", "deploy/gunicorn.conf.py", *args]
            + ["label_studio_sam2.labelstudio.wsgi:app"],
            cwd=REPO,
            env=base | env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
