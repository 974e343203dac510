"""The package as a user installs it: one import package, a console script, run from outside the
checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "label_studio_sam2"


def test_the_wheel_installs_one_package_and_its_command_runs_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("label_studio_sam2-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {PACKAGE}, f"the wheel installs {sorted(top)}: never Meta's `sam2` or a generic `backend`"
    assert "label-studio-sam2 = label_studio_sam2.cli.main:main" in entry_points, entry_points
    assert not [n for n in names if "/tests/" in n or n.startswith(("tests/", "bench/", "devkit/"))]

    # a fresh target outside the checkout; its dependencies are this environment's (no download)
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    command = target / "bin" / "label-studio-sam2"
    assert command.exists(), sorted(p.name for p in (target / "bin").iterdir())
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=away, env=env, capture_output=True, text=True, timeout=120)

    where = run(sys.executable, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)")
    assert where.returncode == 0 and where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    out = run(str(command), "--help")
    assert out.returncode == 0, out.stderr
    for sub in ("serve", "preannotate", "warm", "worker", "train", "convert", "make-test-model"):
        assert sub in out.stdout, (sub, out.stdout)
    serve = run(str(command), "serve", "--help")
    assert serve.returncode == 0 and "--port" in serve.stdout, serve.stdout + serve.stderr
    module = run(sys.executable, "-m", PACKAGE, "serve", "--help")
    assert module.returncode == 0 and module.stdout == serve.stdout, module.stderr
