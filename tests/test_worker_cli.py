"""`python -m label_studio_sam2 worker` as an operator meets it, against a real redis-server: Redis going
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
            [
                sys.executable,
                "-m",
                "label_studio_sam2",
                "worker",
                "--model",
                str(tiny_model_dir),
                "--device",
                "cpu",
            ],
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


def test_a_chunk_stopped_part_way_is_logged_as_handed_back_not_as_job_ok(
    app_factory, redis_server, caplog, monkeypatch
):
    # Ctrl-C mid-chunk: RQ logged "Job OK" for a chunk whose rest the worker had handed back
    import logging
    import signal as signals

    from rq.serializers import JSONSerializer

    from label_studio_sam2.labelstudio.jobs import JobRunner
    from label_studio_sam2.service import redisconn, worker
    from label_studio_sam2.service.jobqueue import QUEUE_NAME
    from tests.conftest import IMAGE_CONFIG
    from tests.test_preannotate import FakeLabelStudio

    app = app_factory(redis_url=redis_server.url, store_dir="off")
    runtime = app.extensions["sam2"]
    runtime.require()
    queue = runtime.job_queue()
    ls = FakeLabelStudio(tasks=[{"id": i, "data": {"image": "http://127.0.0.1:9/a.png"}} for i in (1, 2, 3)])
    run = queue.start_run(
        [1, 2, 3], project=1, label_config=IMAGE_CONFIG, options={}, model_version="v", source="preannotate"
    )
    runner = JobRunner(runtime, ls, queue)
    monkeypatch.setattr(worker, "_runner", runner)
    rq_worker = worker.ModelWorker(
        [QUEUE_NAME],
        name="test-worker",
        connection=redisconn.connect(redis_server.url, socket_timeout_s=None),
        serializer=JSONSerializer,
        runner=runner,
        lease_s=3,
        outage=worker.RedisOutage(queue.where),
    )
    fetch = ls.task

    def task_then_ctrl_c(task_id):  # the signal arrives while the first task runs
        runner.stopping.set()
        rq_worker._stop_requested = True
        return fetch(task_id)

    ls.task = task_then_ctrl_c
    handlers = {s: signals.getsignal(s) for s in (signals.SIGINT, signals.SIGTERM)}
    try:
        with caplog.at_level(logging.INFO):
            rq_worker.work(burst=True, logging_level="INFO")
    finally:
        for s, h in handlers.items():
            signals.signal(s, h)
    lines = [r.getMessage() for r in caplog.records]
    [stopped] = [line for line in lines if "stopped part way" in line]
    job_id = stopped.split()[1]
    assert "1 task(s) done, the other 2 handed back to the queue" in stopped
    assert not [line for line in lines if "Job OK" in line or "Successfully completed" in line], lines
    assert queue.status(run.id).counts.get("skipped", 0) + queue.status(run.id).counts.get("failed", 0) == 1
    assert queue.status(run.id).jobs == {"finished": 1, "queued": 1}  # the rest waits for the next worker
    assert queue.queue.fetch_job(job_id).return_value()["handed back"] == 2
