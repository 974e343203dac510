"""`python -m backend worker` as an operator meets it, against a real redis-server: Redis going
away is waited for with back-off and reported once (not an ERROR every 2 s), and SIGTERM while
Redis is away exits cleanly (RQ's register_death raised a ConnectionError traceback, exit 1)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _wait_for(what: str, condition, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def test_a_worker_waits_out_redis_reports_it_once_and_stops_cleanly_while_it_is_away(
    redis_server, tiny_model_dir, httpserver, tmp_path
):
    log_path = tmp_path / "worker.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "REDIS_"))},
        "REDIS_URL": f"redis://:s3cret-pass@127.0.0.1:{redis_server.port}/0",
        "LABEL_STUDIO_URL": httpserver.url_for("/").rstrip("/"),
        "LABEL_STUDIO_API_KEY": "token",
        "JOB_LEASE_S": "3",  # registry maintenance every second: more Redis calls to fail
        "PYTHONUNBUFFERED": "1",
    }
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend", "worker", "--model", str(tiny_model_dir), "--device", "cpu"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for("the worker listens", lambda: "job lease" in log_path.read_text(), 120, log_path)
        redis_server.stop()
        time.sleep(10)  # RQ's pub/sub thread logged an ERROR every 2 s of this
        outage = log_path.read_text().split("job lease", 1)[1]
        assert " ERROR " not in outage and "Traceback" not in outage, outage
        assert len(re.findall("cannot be reached", outage)) == 1, outage

        redis_server.start()  # the same port
        _wait_for("the worker sees Redis back", lambda: "answers again" in log_path.read_text(), 90, log_path)

        redis_server.stop()
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log_path.read_text()
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
    assert "its entry there expires by itself" in text
    assert "s3cret-pass" not in text
