"""The job queue against a real redis-server: runs, progress counted in Redis, cancel, the
Retrieve hand-off, and Redis down (a clear error at once, nothing hangs). The workers themselves
run against the real Label Studio in tests/e2e/test_queue.py."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from backend.jobqueue import JobQueue, QueueUnavailable
from devkit.lsserver import REPO_ROOT, free_port
from devkit.media_server import MediaServer
from tests.conftest import noise_image, predict_body, rect_px


def start(queue: JobQueue, ids, project=7):
    return queue.start_run(
        ids,
        project=project,
        label_config="<View/>",
        options={"mode": "boxes"},
        model_version="",
        source="test",
    )


def test_a_run_is_queued_in_chunks_and_its_progress_counted_once_per_task(redis_server):
    queue = JobQueue(redis_server.url, chunk_tasks=3)
    run = start(queue, range(1, 8))
    status = queue.status(run.id)
    assert status.total == 7 and status.jobs == {"queued": 3} and status.active
    assert queue.queue.count == 3
    queue.record(run.id, 1, "failed")
    queue.record(run.id, 1, "done")  # a retry succeeded: counted once, as done
    queue.record(run.id, 1, "skipped")  # a later retry finds it predicted: it stays done
    queue.record(run.id, 2, "skipped")
    status = queue.status(run.id)
    assert status.counts == {"done": 1, "skipped": 1, "failed": 0} and status.finished == 2
    assert [r.id for r in queue.runs(7)] == [run.id]
    assert "2/7 tasks: 1 predicted, 1 skipped, 0 failed; jobs: 3 queued" in status.line()


def test_cancel_cancels_the_queued_jobs_and_flags_the_run(redis_server):
    queue = JobQueue(redis_server.url, chunk_tasks=2)
    run = start(queue, [1, 2, 3, 4])
    other = start(queue, [9], project=8)
    [cancelled] = queue.cancel(7)
    assert cancelled.id == run.id and cancelled.cancelled and cancelled.jobs == {"canceled": 2}
    assert not cancelled.active and queue.cancelled(run.id)
    assert queue.queue.count == 1 and not queue.cancelled(other.id)  # another project's run goes on
    assert queue.cancel(7) == []


def test_enqueue_with_redis_down_fails_at_once_with_a_message_that_hides_the_password(redis_server):
    url = f"redis://:s3cret-pass@127.0.0.1:{redis_server.port}/0"
    redis_server.stop()
    queue = JobQueue(url)
    started = time.monotonic()
    with pytest.raises(QueueUnavailable) as e:
        start(queue, [1, 2])
    assert time.monotonic() - started < 3
    assert e.value.status == 503
    assert "cannot queue the work" in e.value.message and f"127.0.0.1:{redis_server.port}" in e.value.message
    assert "s3cret" not in e.value.message


def test_cli_status_with_redis_down_says_so_and_exits(tmp_path):
    port = free_port()  # nothing listens there
    env = {"REDIS_URL": f"redis://:pw-xyz@127.0.0.1:{port}/0", "PATH": "/usr/bin:/bin"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "backend", "preannotate", "--project", "3", "--status"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "preannotate: cannot read the runs: Redis at redis://127.0.0.1" in done.stderr, done.stderr
    assert "pw-xyz" not in done.stderr + done.stdout
    assert time.monotonic() - started < 30  # the interpreter's start-up; the Redis part is 1 s


@pytest.fixture
def slow_image(tmp_path):
    server = MediaServer(tmp_path, delay_s=0.4).serve_files()
    yield server.add_image("a.png", noise_image(40, 60))
    server.close()


def retrieve_tasks(url, n):
    regions = [rect_px((5, 5, 40, 30), 60, 40, "object")]
    return [
        {"id": i, "data": {"image": url}, "annotations": [{"id": i, "result": regions}]}
        for i in range(1, n + 1)
    ]


def test_retrieve_hands_the_rest_to_the_queue_and_holds_it(app_factory, redis_server, slow_image):
    app = app_factory(predict_deadline_s=0.6, redis_url=redis_server.url, retrieve_mode="boxes")
    app.extensions["sam2"].require()
    client = app.test_client()
    tasks = retrieve_tasks(slow_image, 5)
    results = client.post("/predict", json=predict_body(tasks, None)).get_json()["results"]
    handed = [t["id"] for t, r in zip(tasks, results, strict=True) if r == []]
    assert handed and handed == [t["id"] for t in tasks][-len(handed) :]
    queue = app.extensions["sam2"].job_queue()
    [run] = queue.runs(1)
    assert run.total == len(handed) and run.source == "retrieve" and run.active
    assert all(queue.holds(t) for t in handed)
    # asked again before a worker got to them: not queued twice
    again = client.post("/predict", json=predict_body(tasks[-len(handed) :], None)).get_json()["results"]
    assert again == [[]] * len(handed) and len(queue.runs(1)) == 1


def test_retrieve_with_redis_down_answers_503_saying_why(app_factory, redis_server, slow_image):
    redis_server.stop()
    app = app_factory(predict_deadline_s=0.6, redis_url=redis_server.url, retrieve_mode="boxes")
    app.extensions["sam2"].require()
    started = time.monotonic()
    resp = app.test_client().post("/predict", json=predict_body(retrieve_tasks(slow_image, 4), None))
    assert time.monotonic() - started < 8
    assert resp.status_code == 503, resp.get_json()
    assert "cannot be reached" in resp.get_json()["error"] and "REDIS_URL" in resp.get_json()["error"]


def test_metrics_show_queue_depth_and_jobs_per_worker_read_from_redis(app_factory, redis_server):
    client = app_factory(redis_url=redis_server.url, queue_chunk_tasks=2).test_client()
    queue = JobQueue(redis_server.url, chunk_tasks=2)
    start(queue, [1, 2, 3])
    queue.worker_finished_job("gpu0", 2.5, failed=False)
    queue.worker_finished_job("gpu0", 1.0, failed=True)
    text = client.get("/metrics").get_data(as_text=True)
    assert "sam2_queue_up 1.0" in text
    assert 'sam2_queue_jobs{state="queued"} 2.0' in text and "sam2_queue_workers 0.0" in text
    assert 'sam2_worker_jobs_total{outcome="ok",worker="gpu0"} 1.0' in text
    assert 'sam2_worker_jobs_total{outcome="failed",worker="gpu0"} 1.0' in text
    assert 'sam2_worker_job_seconds_total{worker="gpu0"} 3.5' in text
    redis_server.stop()
    resp = client.get("/metrics")
    assert resp.status_code == 200 and "sam2_queue_up 0.0" in resp.get_data(as_text=True)
