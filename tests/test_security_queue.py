"""The job queue runs only this backend's jobs (issue 23, must-deliver 4): a real redis-server,
a real RQ worker (`label_studio_sam2.service.worker.ModelWorker`, in this process), jobs written to Redis by
someone else."""

from __future__ import annotations

import logging

import pytest
from rq import Callback, Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from label_studio_sam2.service import redisconn
from label_studio_sam2.service.jobqueue import JOB_FUNC, QUEUE_NAME, ProjectJob, RefusedJob
from tests.conftest import IMAGE_CONFIG, noise_image


def _worker(runtime, api, monkeypatch):
    import label_studio_sam2.service.worker as worker_module
    from label_studio_sam2.labelstudio.jobs import JobRunner
    from label_studio_sam2.service.worker import ModelWorker

    queue = runtime.job_queue()
    runner = JobRunner(runtime, api, queue)
    monkeypatch.setattr(worker_module, "_runner", runner)
    return ModelWorker(
        [QUEUE_NAME],
        name="security-test",
        connection=redisconn.connect(queue.url, socket_timeout_s=None),
        serializer=JSONSerializer,
        runner=runner,
        lease_s=60,
        outage=worker_module.RedisOutage(queue.where),
    )


def test_worker_refuses_a_job_that_is_not_its_own_and_still_runs_its_own(
    app_factory, redis_server, media_server, tmp_path, monkeypatch, caplog
):
    from tests.test_preannotate import FakeLabelStudio

    url = media_server.add_image("w.png", noise_image(40, 60, seed=3))
    app = app_factory(redis_url=redis_server.url, store_dir=str(tmp_path / "store"))
    runtime = app.extensions["sam2"]
    runtime.require()
    queue = runtime.job_queue()
    ls = FakeLabelStudio(tasks=[{"id": 1, "data": {"image": url}}])
    worker = _worker(runtime, ls, monkeypatch)

    # what anyone who can write to Redis can queue: RQ would import and call these
    marker = tmp_path / "pwned"
    raw = Queue(QUEUE_NAME, connection=queue.redis, serializer=JSONSerializer)
    evil = raw.enqueue("os.system", f"touch {marker}")
    builtin = raw.enqueue("pathlib.Path.touch", str(tmp_path / "pwned2"))
    # this backend's own function, but with someone else's callback
    run = queue.start_run(
        [1], project=1, label_config=IMAGE_CONFIG, options={}, model_version="", source="t", kind="warm"
    )
    own = queue.queue.jobs[-1]
    called_back = raw.enqueue(JOB_FUNC, own.args[0], on_failure=Callback("os.system"))

    with caplog.at_level(logging.WARNING, "label_studio_sam2.service.worker"):
        worker.work(burst=True)

    assert not marker.exists() and not (tmp_path / "pwned2").exists()
    refused = [r.getMessage() for r in caplog.records if "refused job" in r.getMessage()]
    assert len(refused) == 3, refused
    assert any("'os.system' is not one of this backend's jobs" in m for m in refused), refused
    assert any("on_failure callback 'os.system'" in m for m in refused), refused
    for job in (evil, builtin, called_back):
        job.refresh()
        assert job.get_status() == JobStatus.FAILED
        assert "refused by the sam2 worker" in (job.latest_result().exc_string or "")
    # the project's own job ran: its task was encoded (done, counted in Redis)
    assert queue.status(run.id).counts == {"done": 1}


def test_a_foreign_job_class_never_imports_its_function_or_callbacks(redis_server):
    """RQ's registry maintenance runs the failure callback of a job whose worker died: through
    ProjectJob (what the worker's queues use) nothing foreign is imported there either."""
    conn = redisconn.connect(redis_server.url)
    q = Queue(QUEUE_NAME, connection=conn, serializer=JSONSerializer, job_class=ProjectJob)
    job = q.enqueue("os.system", "true", on_failure=Callback("os.system"))
    fetched = ProjectJob.fetch(job.id, connection=conn, serializer=JSONSerializer)
    with pytest.raises(RefusedJob, match="os.system"):
        fetched.func  # noqa: B018
    with pytest.raises(RefusedJob, match="on_failure callback 'os.system'"):
        fetched.failure_callback  # noqa: B018
    assert fetched.success_callback is None and fetched.stopped_callback is None


def test_worker_log_never_shows_the_redis_password(app_factory, tmp_path, monkeypatch, caplog):
    """A Redis with a password: the worker reaches it through REDIS_URL, and neither its log nor
    RQ's shows the password."""
    from devkit.redis_server import RedisServer
    from tests.test_preannotate import FakeLabelStudio

    secret = "s3cret-redis-pw-0123456789"
    server = RedisServer(tmp_path / "redis", password=secret).start()
    try:
        assert secret in server.url
        app = app_factory(redis_url=server.url)
        runtime = app.extensions["sam2"]
        with caplog.at_level(logging.DEBUG):
            worker = _worker(runtime, FakeLabelStudio(), monkeypatch)
            worker.work(burst=True, logging_level="DEBUG")
        assert caplog.records and all(secret not in r.getMessage() for r in caplog.records)
        # without the password, Redis refuses
        no_pw = server.url.replace(f":{secret}@", "")
        from label_studio_sam2.service.jobqueue import JobQueue, QueueUnavailable

        with pytest.raises(QueueUnavailable) as e:
            JobQueue(no_pw).workers()
        assert secret not in e.value.message
    finally:
        server.close()
