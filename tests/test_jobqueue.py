"""The job queue against a real redis-server: runs, progress counted in Redis, cancel, the
Retrieve hand-off, and Redis down (a clear error at once, nothing hangs). The workers themselves
run against the real Label Studio in tests/e2e/test_queue.py."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from devkit.lsserver import REPO_ROOT, free_port
from devkit.media_server import MediaServer
from label_studio_sam2.labelstudio.middleware import http_status
from label_studio_sam2.service.jobqueue import JobQueue, QueueUnavailable
from tests.conftest import BOTH_PRECISIONS, noise_image, predict_body, rect_px


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
    assert http_status(e.value) == 503
    assert "cannot queue the work" in e.value.message and f"127.0.0.1:{redis_server.port}" in e.value.message
    assert "s3cret" not in e.value.message


def test_cli_status_with_redis_down_says_so_and_exits(tmp_path):
    port = free_port()  # nothing listens there
    env = {"REDIS_URL": f"redis://:pw-xyz@127.0.0.1:{port}/0", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "label_studio_sam2", "preannotate", "--project", "3", "--status"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "preannotate: cannot read the runs: Redis at redis://127.0.0.1" in done.stderr, done.stderr
    assert "pw-xyz" not in done.stderr + done.stdout


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


def test_the_queue_s_worker_writes_only_what_label_studio_holds_for_the_project(
    app_factory, redis_server, slow_image
):
    """The attack of issue 23 through the queue (REDIS_URL): the hand-off carries task ids and
    the project only; the worker reads each task and the label config from Label Studio and
    writes nothing for a task of another project, nor anything from the request's task dicts."""
    from label_studio_sam2.labelstudio.jobs import JobRunner
    from label_studio_sam2.service.jobqueue import chunk_from_job
    from tests.test_preannotate import handoff_attack, written_labels

    app = app_factory(predict_deadline_s=0.6, redis_url=redis_server.url, retrieve_mode="boxes")
    runtime = app.extensions["sam2"]
    runtime.require()
    ls, body = handoff_attack(slow_image)
    results = app.test_client().post("/predict", json=body).get_json()["results"]
    assert results[1:] == [[], []]
    queue = runtime.job_queue()
    [job] = queue.queue.jobs
    chunk = chunk_from_job(job.args[0])
    assert chunk.project == 1 and chunk.task_ids == [777, 2] and "HACKED" not in chunk.label_config
    # even a chunk that carries a label config (queued by an older server) is predicted with the
    # project's, read from Label Studio
    assert JobRunner(runtime, ls, queue).run(replace(chunk, label_config=body["label_config"])) == {
        "failed": 1,
        "done": 1,
    }
    assert written_labels(ls) == {2: {"object"}} and ls.tasks[777]["predictions"] == []
    assert not queue.holds(777) and not queue.holds(2)


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
    client = app_factory(redis_url=redis_server.url, job_chunk_tasks=2).test_client()
    queue = JobQueue(redis_server.url, chunk_tasks=2)
    start(queue, [1, 2, 3])
    queue.worker_finished_job("gpu0", 2.5, failed=False)
    queue.worker_finished_job("gpu0", 1.0, failed=True)
    text = client.get("/metrics").get_data(as_text=True)
    assert "sam2_jobqueue_up 1.0" in text
    assert 'sam2_jobqueue_jobs{state="queued"} 2.0' in text and "sam2_jobqueue_workers 0.0" in text
    assert 'sam2_worker_jobs_total{outcome="ok",worker="gpu0"} 1.0' in text
    assert 'sam2_worker_jobs_total{outcome="failed",worker="gpu0"} 1.0' in text
    assert 'sam2_worker_job_seconds_total{worker="gpu0"} 3.5' in text
    redis_server.stop()
    resp = client.get("/metrics")
    assert resp.status_code == 200 and "sam2_jobqueue_up 0.0" in resp.get_data(as_text=True)


VIDEO_FRAMES, VIDEO_FPS = 12, 24  # the deadline is made to cut the track by a stalled frame
VIDEO_CONFIG = f"""<View>
  <Labels name="videoLabels" toName="video"><Label value="Car"/></Labels>
  <Video name="video" value="$video" frameRate="{VIDEO_FPS}"/>
  <VideoRectangle name="box" toName="video" smart="true"/>
</View>"""


def _video_task_and_cut_request(media_server, tmp_path):
    """A one-object video task, and `post(app)`: its Retrieve request (no regions in the context)
    whose first decoded frame stalls longer than the request's deadline, so the deadline cuts the
    track on any machine, however fast its CPU (the deadline itself leaves ample time to start)."""
    import label_studio_sam2.engine.frames
    from devkit.videos import Shape, moving_shapes, write_video

    w, h = 96, 64
    red = Shape((230, 20, 20), (8, 10, 28, 30), (0.5, 0.25))
    path = write_video(tmp_path / "v.mp4", moving_shapes(VIDEO_FRAMES, h, w, [red]), fps=VIDEO_FPS)
    url = media_server.add("v.mp4", Path(path).read_bytes())
    x1, y1, x2, y2 = red.box(0)
    keyframe = {"frame": 1, "enabled": True, "rotation": 0, "time": 1 / VIDEO_FPS}
    keyframe |= {
        "x": x1 / w * 100,
        "y": y1 / h * 100,
        "width": (x2 - x1) / w * 100,
        "height": (y2 - y1) / h * 100,
    }
    region = {
        "id": "car",
        "type": "videorectangle",
        "from_name": "box",
        "to_name": "video",
        "value": {"framesCount": VIDEO_FRAMES, "sequence": [keyframe], "labels": ["Car"]},
    }
    task = {"id": 5, "data": {"video": url}, "annotations": [{"id": 1, "result": [region]}]}
    deadline_s = 5.0

    def post(app) -> dict:
        rgb, decoded = label_studio_sam2.engine.frames.VideoReader._rgb, []

        def stalling_rgb(self, frame):
            decoded.append(frame)
            if len(decoded) == 1:
                time.sleep(deadline_s + 1.0)
            return rgb(self, frame)

        with pytest.MonkeyPatch.context() as stalled:
            stalled.setattr(label_studio_sam2.engine.frames.VideoReader, "_rgb", stalling_rgb)
            body = (
                app.test_client().post("/predict", json=predict_body([task], None, VIDEO_CONFIG)).get_json()
            )
        assert 0 < len(decoded) < VIDEO_FRAMES  # the request stopped tracking after the stall
        return body

    return task, deadline_s, post


def _whole_track(prediction: dict) -> None:
    frames = [k["frame"] for k in prediction["result"][0]["value"]["sequence"]]
    assert max(frames) == VIDEO_FRAMES, frames


# CPU_PRECISION's default (fp32) only: the video tracker's encoder is fp32 on CPU either way
def test_a_video_track_the_deadline_would_cut_is_queued_and_written_whole(
    redis_server, media_server, tmp_path, caplog
):
    from label_studio_sam2.cli.main import FIXTURE
    from label_studio_sam2.engine.models import load_image_model
    from label_studio_sam2.labelstudio.app import create_app
    from label_studio_sam2.labelstudio.jobs import JobRunner
    from label_studio_sam2.service.jobqueue import chunk_from_job
    from label_studio_sam2.service.settings import Settings
    from tests.test_preannotate import FakeLabelStudio

    task, deadline_s, post = _video_task_and_cut_request(media_server, tmp_path)
    settings = Settings.from_env(redis_url=redis_server.url, predict_deadline_s=deadline_s)
    app = create_app(settings, loaded_model=load_image_model(str(FIXTURE), "cpu"))
    runtime = app.extensions["sam2"]
    body = post(app)
    assert body["results"] == [[]]  # no partial track for Label Studio to store
    queue = runtime.job_queue()
    [run] = queue.runs(1)
    [job] = queue.queue.jobs
    chunk = chunk_from_job(job.args[0])
    assert chunk.kind == "video" and chunk.task_ids == [5] and run.total == 1 and queue.holds(5)

    ls = FakeLabelStudio(config=VIDEO_CONFIG, tasks=[task])
    with caplog.at_level("INFO", "label_studio_sam2.labelstudio.video"):
        assert JobRunner(runtime, ls, queue).run(chunk) == {"done": 1}
    line = [r.getMessage() for r in caplog.records if r.name == "label_studio_sam2.labelstudio.video"][-1]
    assert "partial" not in line, line  # the worker tracked to the end
    [prediction] = ls.tasks[5]["predictions"]
    _whole_track(prediction)
    assert queue.status(run.id).counts == {"done": 1} and not queue.holds(5)


def test_without_redis_a_video_track_the_deadline_would_cut_goes_to_the_background_job_whole(
    media_server, tmp_path
):
    """The in-process side of the same hand-off: no REDIS_URL, so the server's background job
    (a thread on the server's model) tracks the task to the end and writes it once."""
    from label_studio_sam2.cli.main import FIXTURE
    from label_studio_sam2.engine.models import load_image_model
    from label_studio_sam2.labelstudio.app import create_app
    from label_studio_sam2.labelstudio.retrieve import background_job
    from label_studio_sam2.service.settings import Settings
    from tests.test_preannotate import FakeLabelStudio

    task, deadline_s, post = _video_task_and_cut_request(media_server, tmp_path)
    settings = Settings.from_env(
        predict_deadline_s=deadline_s, label_studio_url="http://ls.invalid", label_studio_api_key="k"
    )
    app = create_app(settings, loaded_model=load_image_model(str(FIXTURE), "cpu"))
    runtime = app.extensions["sam2"]
    ls = FakeLabelStudio(config=VIDEO_CONFIG, tasks=[task])
    job = background_job(runtime, api=ls)  # the process's job, writing to this Label Studio
    body = post(app)
    assert body["results"] == [[]]  # no partial track for Label Studio to store
    assert job.wait_idle(120)
    [prediction] = ls.tasks[5]["predictions"]  # written once, whole
    _whole_track(prediction)
    assert job.counts == {"done": 1}


@BOTH_PRECISIONS
def test_warm_jobs_encode_into_the_shared_store_once(
    app_factory, redis_server, media_server, tmp_path, cpu_precision
):
    from label_studio_sam2.engine.image import ImagePredictor
    from label_studio_sam2.engine.models import encoder_precision, load_image_model
    from label_studio_sam2.labelstudio.jobs import JobRunner
    from label_studio_sam2.service.jobqueue import chunk_from_job
    from tests.conftest import IMAGE_CONFIG
    from tests.test_preannotate import FakeLabelStudio

    urls = [media_server.add_image(f"w{i}.png", noise_image(40, 60, seed=i)) for i in range(2)]
    tasks = [{"id": i + 1, "data": {"image": url}} for i, url in enumerate(urls)] + [{"id": 3, "data": {}}]
    app = app_factory(redis_url=redis_server.url, store_dir=str(tmp_path / "store"))
    runtime = app.extensions["sam2"]
    runtime.require()
    queue = runtime.job_queue()
    runner = JobRunner(runtime, FakeLabelStudio(tasks=tasks), queue)
    for expected in ({"done": 2, "skipped": 1}, {"skipped": 3}):  # a second run finds them stored
        run = queue.start_run(
            [1, 2, 3],
            project=1,  # FakeLabelStudio's tasks are project 1's
            label_config=IMAGE_CONFIG,
            options={},
            model_version="",
            source="warm",
            kind="warm",
        )
        [job] = [j for j in queue.queue.jobs if chunk_from_job(j.args[0]).run == run.id]
        assert runner.run(chunk_from_job(job.args[0])) == expected
    assert runtime.segmenter.predictor.cache.bytes == 0  # the worker does not keep them in memory
    # a server on that store, in the same precision, finds them without its encoder
    server = ImagePredictor(
        load_image_model(runtime.image_model.source, "cpu", cpu_precision), store=runtime.store
    )
    for i, url in enumerate(urls):
        image = runtime.media.load_image(url, i + 1)
        server.embedding(image.key, image.load)
    assert server.encoder_calls == 0 and encoder_precision(server.loaded) == cpu_precision


def test_a_queued_run_reports_why_tasks_were_skipped_or_failed_as_the_in_process_run(
    app_factory, redis_server, media_server
):
    # `--status` and the `--queue` summary said "4 skipped" without the in-process run's reasons
    from label_studio_sam2.labelstudio.jobs import JobRunner
    from label_studio_sam2.labelstudio.queued_job import report
    from label_studio_sam2.service.jobqueue import chunk_from_job
    from tests.conftest import IMAGE_CONFIG
    from tests.test_preannotate import MODEL_VERSION, FakeLabelStudio, project

    tasks = [t for t in project(media_server) if t["id"] != 20]  # the CLI queues annotated tasks only
    ls = FakeLabelStudio(tasks=tasks)
    app = app_factory(redis_url=redis_server.url)
    runtime = app.extensions["sam2"]
    runtime.require()
    queue = runtime.job_queue()
    run = queue.start_run(
        [t["id"] for t in tasks],
        project=1,
        label_config=IMAGE_CONFIG,
        options={"mode": "boxes"},
        model_version=MODEL_VERSION,
        source="preannotate",
    )
    [job] = queue.queue.jobs
    JobRunner(runtime, ls, queue).run(chunk_from_job(job.args[0]))
    status = queue.status(run.id)
    # the words of the in-process run (test_preannotate: ..._with_reasons_and_a_rerun_does_nothing)
    assert status.why["skipped"][f"already has a prediction of {MODEL_VERSION}"] == 1
    assert status.why["skipped"]["no rectangle in the latest annotation"] == 1
    assert status.why["failed"] == {f"HTTP 404 fetching {media_server.url}/missing.png": 1}
    line = status.line()
    assert f"1 failed (HTTP 404 fetching {media_server.url}/missing.png)" in line
    assert "no rectangle in the latest annotation" in line
    summary = report(status, 3.0, skipped_before=1)
    assert "  skipped 1: no rectangle in the latest annotation" in summary.splitlines()
    assert "  skipped 1: no annotation" in summary.splitlines()
    assert f"  failed 1: HTTP 404 fetching {media_server.url}/missing.png" in summary.splitlines()
