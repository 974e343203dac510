"""`make run` (tools/demo.py) without Label Studio: a second demo on the same run directory is
refused while the first holds its lock, and the lock is free again once the first has stopped."""

from __future__ import annotations

import subprocess
import sys

from devkit import lsserver
from tools import demo


def run_demo(run_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/demo.py", "--test-model", "--run-dir", str(run_dir)]
        + ["--port", str(lsserver.free_port()), "--backend-port", str(lsserver.free_port())],
        cwd=lsserver.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_second_demo_on_the_same_run_dir_is_refused_and_says_what_to_do(tmp_path):
    running = demo.lock_run_dir(tmp_path, "http://127.0.0.1:8080")  # what a running demo holds
    assert running is not None
    second = run_demo(tmp_path)
    assert second.returncode == 2, second.stdout + second.stderr
    out = second.stdout
    assert (
        f"A demo is already running on {tmp_path} (pid " in out
        and "Label Studio at http://127.0.0.1:8080" in out
    )
    assert "--run-dir OTHER_DIR" in out  # a second demo needs its own directory
    assert "LS_PORT" not in out  # not the hint that started a second demo on the same database
    assert (
        not (tmp_path / "label-studio").exists() and not (tmp_path / "backend.log").exists()
    )  # nothing started
    running.close()  # the first demo stopped: the directory is free again
    again = demo.lock_run_dir(tmp_path, "http://127.0.0.1:8081")
    assert again is not None
    again.close()


def test_the_port_hint_names_free_ports_not_a_second_demo(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [
                sys.executable,
                "tools/demo.py",
                "--test-model",
                "--run-dir",
                str(tmp_path),
                "--port",
                str(port),
            ],
            cwd=lsserver.REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 2
    assert (
        f"Port {port} for Label Studio is in use by another program (no demo runs on {tmp_path})"
        in out.stdout
    )
