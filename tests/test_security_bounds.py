"""Resource bounds a request cannot get past (issue 23, "Resource bounds"): regions and points
per task, boxes decoded in bounded batches with the deadline checked between them, video frames
under MAX_IMAGE_MP, prompt memory bounded in bytes and expired on write (and kept per project),
the /setup cache and label config size, and the prefetcher's memory of task ids."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from devkit.videos import Shape, moving_shapes, write_video
from label_studio_sam2.engine.frames import VideoReader
from label_studio_sam2.engine.image import ImagePredictor, Prompt
from label_studio_sam2.labelstudio.protocol import boxes_to_masks, parse_label_config
from label_studio_sam2.service import prefetch
from label_studio_sam2.service.errors import TaskError
from label_studio_sam2.service.promptmemory import PromptMemory, Remembered
from tests.conftest import IMAGE_CONFIG, keypoint, noise_image, predict_body, rectangle

# --- regions and points per task -------------------------------------------------------------


def _rects(n: int) -> list[dict]:
    return [rectangle(1 + (i % 9) * 10, 1 + (i // 9 % 9) * 10, 8, 8, w=96, h=64) for i in range(n)]


def test_too_many_boxes_in_a_request_is_a_400_naming_the_setting(app_factory, media_server):
    client = app_factory(max_regions_per_task=3).test_client()
    url = media_server.add_image("a.png", noise_image(64, 96))
    task = {"id": 1, "data": {"image": url}}
    resp = client.post("/predict", json=predict_body([task], _rects(4)))
    assert resp.status_code == 400 and "MAX_REGIONS_PER_TASK" in resp.get_json()["error"]
    ok = client.post("/predict", json=predict_body([task], _rects(3)))  # the server keeps serving
    assert ok.status_code == 200 and len(ok.get_json()["results"][0]["result"]) == 3


def test_too_many_keypoints_is_a_400_naming_the_setting(app_factory, media_server):
    url = media_server.add_image("a.png", noise_image(64, 96))
    task = {"id": 1, "data": {"image": url}}
    clicks = [keypoint(1 + i % 90, 1 + i // 90, w=96, h=64) for i in range(300)]
    # the default bound (a 12 MB body of clicks held the model lock for 50 s before)
    resp = app_factory().test_client().post("/predict", json=predict_body([task], clicks))
    assert resp.status_code == 400 and "MAX_POINTS_PER_TASK" in resp.get_json()["error"]
    client = app_factory(max_points_per_task=5).test_client()
    assert client.post("/predict", json=predict_body([task], clicks[:6])).status_code == 400
    ok = client.post("/predict", json=predict_body([task], clicks[:5]))
    assert ok.status_code == 200 and ok.get_json()["results"][0]["result"]


def test_a_task_of_retrieve_with_too_many_rectangles_gets_an_error_naming_the_setting(
    app_factory, media_server
):
    client = app_factory(max_regions_per_task=3, retrieve_mode="boxes").test_client()
    url = media_server.add_image("a.png", noise_image(64, 96))
    tasks = [
        {"id": 1, "data": {"image": url}, "annotations": [{"id": 1, "result": _rects(4)}]},
        {"id": 2, "data": {"image": url}, "annotations": [{"id": 2, "result": _rects(2)}]},
    ]
    segmenter = client.application.extensions["sam2"].segmenter
    with pytest.raises(TaskError, match="MAX_REGIONS_PER_TASK"):
        boxes_to_masks(segmenter, tasks[0], parse_label_config(IMAGE_CONFIG))
    first, second = client.post("/predict", json=predict_body(tasks, None)).get_json()["results"]
    assert first == []  # Label Studio stores nothing for it (the log names the setting)
    assert len(second["result"]) == 2  # the other task is answered


def test_a_video_request_with_too_many_regions_is_a_400_naming_the_setting(app_factory):
    from tests.test_video import CONFIG, region

    regions = [region(f"r{i}", {"frame": 1, "x": 1, "y": 1, "width": 5, "height": 5}) for i in range(4)]
    client = app_factory(max_regions_per_task=3).test_client()
    body = predict_body([{"id": 1, "data": {"video": "/data/upload/1/v.mp4"}}], regions, CONFIG)
    resp = client.post("/predict", json=body)
    assert resp.status_code == 400 and "MAX_REGIONS_PER_TASK" in resp.get_json()["error"]


def test_a_video_task_with_too_many_regions_to_track_is_refused_naming_the_setting(small_video):
    from label_studio_sam2.labelstudio.video import VideoError, predict_video_task
    from tests.test_video import CONFIG, FakeTracker, region

    regions = [region(f"r{i}", {"frame": 1, "x": 1, "y": 1, "width": 5, "height": 5}) for i in range(4)]
    task = {"id": 1, "data": {"video": "v.mp4"}, "annotations": [{"id": 1, "result": regions}]}
    tracker = FakeTracker()
    with pytest.raises(VideoError, match="MAX_REGIONS_PER_TASK"):  # Retrieve: the latest annotation
        predict_video_task(
            task, None, CONFIG, small_video, tracker, deadline_s=30, max_frames=5, max_regions=3
        )
    assert tracker.calls == []


# --- boxes decoded in bounded batches, the deadline checked between them ------------------------


def _boxes(n: int, seed: int = 0) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x1, y1 = rng.uniform(0, 60), rng.uniform(0, 40)
        box = [x1, y1, x1 + rng.uniform(5, 35), y1 + rng.uniform(5, 20)]
        out.append(Prompt(box_xyxy=np.array(box, np.float32)))
    return out


def test_boxes_are_decoded_in_bounded_batches_with_the_masks_of_one_batch(tiny_model):
    img, prompts = noise_image(64, 96), _boxes(20)
    whole = ImagePredictor(tiny_model, decode_batch=1000)
    one_call = whole.predict("k", img, prompts)
    assert whole.decoder_calls == 1
    batched = ImagePredictor(tiny_model, decode_batch=3)
    got = batched.predict("k", img, prompts)
    assert batched.decoder_calls == 7  # ceil(20 / 3): no call decodes more than 3 boxes
    for a, b in zip(got, one_call, strict=True):
        assert np.array_equal(a.mask, b.mask)
        assert a.score == pytest.approx(b.score, abs=1e-5)


def test_a_click_is_decoded_between_two_batches_of_a_large_request(tiny_model):
    # The model lock is taken per batch: while a 20-box request sits between two batches, a
    # labeler's click on another image is decoded (no waiting for the other 17 boxes).
    pred = ImagePredictor(tiny_model, decode_batch=3)
    boxes_image, click_image = noise_image(64, 96), noise_image(64, 96, seed=1)
    pred.embedding("boxes", boxes_image)
    pred.embedding("click", click_image)
    paused, clicked = threading.Event(), threading.Event()
    progress = []

    def between_batches(part, seconds):
        if part == "decoder" and threading.current_thread() is big:
            progress.append(pred.decoder_calls)
            if len(progress) == 1:
                paused.set()
                assert clicked.wait(60)

    pred.on_timing = between_batches
    big = threading.Thread(target=lambda: progress.append(pred.predict("boxes", boxes_image, _boxes(20))))
    big.start()
    assert paused.wait(60)
    click = Prompt(np.array([[40.0, 30.0]], np.float32), np.array([1]))
    (mask,) = pred.predict("click", click_image, [click])  # the lock is free between batches
    clicked.set()
    big.join(60)
    assert mask.mask.shape == (64, 96)
    assert progress[0] == 1 and len(progress[-1]) == 20  # clicked after the first of 7 batches


class _Clock:
    """time for label_studio_sam2.engine.image only: real time plus an offset the test moves forward."""

    def __init__(self):
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def perf_counter(self) -> float:
        return time.perf_counter()


@pytest.fixture
def clock(monkeypatch):
    import label_studio_sam2.engine.image

    fake = _Clock()
    monkeypatch.setattr(label_studio_sam2.engine.image, "time", fake)
    return fake


def _pass_deadline_after_first_batch(predictor, clock) -> None:
    before = predictor.on_timing

    def timed(part, seconds):
        if before is not None:
            before(part, seconds)
        if part == "decoder":
            clock.offset += 10_000  # the first batch "took" longer than any deadline

    predictor.on_timing = timed


def test_the_deadline_is_checked_between_batches(tiny_model, clock):
    from label_studio_sam2.engine.image import DeadlineExceeded

    pred = ImagePredictor(tiny_model, decode_batch=3)
    img = noise_image(64, 96)
    pred.embedding("k", img)
    _pass_deadline_after_first_batch(pred, clock)
    with pytest.raises(DeadlineExceeded) as cut:
        pred.predict("k", img, _boxes(20), deadline=time.monotonic() + 60)
    assert (cut.value.done, cut.value.total) == (3, 20)
    assert pred.decoder_calls == 1  # the model was not asked for the other 17 boxes


def test_a_click_request_cut_by_the_deadline_gets_the_deadline_error(app_factory, media_server, clock):
    app = app_factory(decode_batch=3)
    _pass_deadline_after_first_batch(app.extensions["sam2"].segmenter.predictor, clock)
    url = media_server.add_image("a.png", noise_image(64, 96))
    resp = app.test_client().post(
        "/predict", json=predict_body([{"id": 1, "data": {"image": url}}], _rects(20))
    )
    (entry,) = resp.get_json()["results"]
    assert resp.status_code == 200 and entry["result"] == []
    assert "PREDICT_DEADLINE_S" in entry["error"] and "3 of 20" in entry["error"]


def test_a_retrieve_task_cut_by_the_deadline_is_left_like_one_not_started(app_factory, media_server, clock):
    # No background job here (no Label Studio API): a task not started in time gets [] (Label
    # Studio stores nothing and a later Retrieve asks again); one cut between batches the same.
    app = app_factory(decode_batch=3, retrieve_mode="boxes")
    _pass_deadline_after_first_batch(app.extensions["sam2"].segmenter.predictor, clock)
    url = media_server.add_image("a.png", noise_image(64, 96))
    task = {"id": 1, "data": {"image": url}, "annotations": [{"id": 1, "result": _rects(20)}]}
    resp = app.test_client().post("/predict", json=predict_body([task], None))
    assert resp.status_code == 200 and resp.get_json()["results"] == [[]]


# --- video frames under MAX_IMAGE_MP -----------------------------------------------------------


@pytest.fixture(scope="module")
def small_video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "v.mp4"
    shape = Shape((230, 20, 20), (8, 10, 28, 30), (1.0, 0.5))
    return Path(write_video(path, moving_shapes(6, 64, 96, [shape]), fps=24))


def test_video_frames_over_max_pixels_are_refused_by_the_reader(small_video):
    from label_studio_sam2.engine.frames import FramesTooLarge

    with pytest.raises(FramesTooLarge, match="96x64"):
        VideoReader(small_video, max_pixels=96 * 64 - 1)
    with VideoReader(small_video, max_pixels=96 * 64) as reader:  # at the limit: read
        assert reader.num_frames == 6


def test_a_video_whose_frames_exceed_max_image_mp_is_refused_naming_it(
    app_factory, media_server, small_video
):
    from tests.test_video import CONFIG, region

    url = media_server.add("v.mp4", small_video.read_bytes())
    keyframe = {"frame": 2, "enabled": True, "rotation": 0, "x": 10, "y": 10, "width": 20, "height": 20}
    body = predict_body([{"id": 1, "data": {"video": url}}], [region("r", keyframe)], CONFIG)
    client = app_factory(max_image_mp=0.005).test_client()  # 5000 pixels; the frames have 6144
    (entry,) = client.post("/predict", json=body).get_json()["results"]
    assert entry["result"] == [] and "MAX_IMAGE_MP" in entry["error"] and "96x64" in entry["error"]


# --- prompt memory: bytes, expiry on write, the project in the key -----------------------------


def _remembered(at: float | None = None, kb: int = 256) -> Remembered:
    logits = np.zeros((1, kb, 256), np.float32)  # kb * 1 KB
    return Remembered((1.0, 1.0, 5.0, 5.0), frozenset(), logits, time.monotonic() if at is None else at)


def test_prompt_memory_is_bounded_in_bytes(app_factory):
    memory = PromptMemory(300.0, max_bytes=1 << 20)
    for task in range(40):  # 40 x 256 KB of logits
        memory.put((1, task, "image", "object"), _remembered())
    assert len(memory) <= 4 and memory.bytes <= 1 << 20
    assert memory.get((1, 39, "image", "object")) is not None  # the latest stays
    assert memory.get((1, 0, "image", "object")) is None  # the oldest went first
    assert app_factory(prompt_memory_mb=1).extensions["sam2"].memory.max_bytes == 1 << 20


def test_prompt_memory_drops_expired_entries_on_write(monkeypatch):
    import label_studio_sam2.service.promptmemory

    memory = PromptMemory(300.0)
    for task in range(100):  # one-click tasks, never opened again
        memory.put((1, task, "image", "object"), _remembered())
    assert len(memory) == 100
    later = _Clock()
    later.offset = 301  # PROMPT_MEMORY_S later
    monkeypatch.setattr(label_studio_sam2.service.promptmemory, "time", later)
    memory.put((1, 1000, "image", "object"), _remembered(at=later.monotonic()))  # any write, no read
    assert len(memory) == 1 and memory.bytes < 300 << 10


def _box_then_click(apps, project_of_box: str, project_of_click: str, url: str) -> list:
    """A box on task 7 sent as one project, then a click on task 7 as another: the prompts the
    click was decoded from."""
    seen = []
    click_app = apps[-1]
    predictor = click_app.extensions["sam2"].segmenter.predictor
    original = predictor.predict

    def spy(key, image, prompts, **kw):
        seen.append(prompts)
        return original(key, image, prompts, **kw)

    task = {"id": 7, "data": {"image": url}}
    box = predict_body([task], [rectangle(10, 20, 50, 40, w=100, h=50)])
    apps[0].test_client().post("/predict", json={**box, "project": project_of_box})
    predictor.predict = spy
    click = predict_body([task], [keypoint(30, 40, w=100, h=50)])
    resp = click_app.test_client().post("/predict", json={**click, "project": project_of_click})
    assert resp.status_code == 200
    return seen[-1]


def test_a_box_in_one_project_never_shapes_a_click_in_another(app_factory, media_server):
    url = media_server.add_image("a.png", noise_image(50, 100))
    app = app_factory()
    (same,) = _box_then_click([app], "1.1", "1.2", url)
    assert same.box_xyxy is not None  # the same project: the box is remembered
    (other,) = _box_then_click([app], "3.1", "2.1", url)
    assert other.box_xyxy is None


def test_a_box_in_one_project_never_shapes_a_click_in_another_through_redis(
    app_factory, media_server, redis_server
):
    url = media_server.add_image("a.png", noise_image(50, 100))
    apps = [app_factory(redis_url=redis_server.url), app_factory(redis_url=redis_server.url)]  # two workers
    (same,) = _box_then_click(apps, "1.1", "1.2", url)
    assert same.box_xyxy is not None  # shared through Redis within the project
    (other,) = _box_then_click(apps, "3.1", "2.1", url)
    assert other.box_xyxy is None


# --- /setup: bounded cache, bounded label config -------------------------------------------------


def _setup_body(project: int) -> dict:
    labels = "".join(f'<Label value="label-{project}-{i}"/>' for i in range(40))  # ~1.2 KB
    return {"project": f"{project}.1", "schema": IMAGE_CONFIG.replace('<Label value="car"/>', labels)}


def test_setup_cache_is_bounded_least_recently_used_first(app_factory, media_server):
    client = app_factory(setup_cache_mb=0.05).test_client()  # 50 KB: a few dozen of these configs
    for project in range(1, 201):
        assert client.post("/setup", json=_setup_body(project)).status_code == 200
    url = media_server.add_image("a.png", noise_image(20, 20))

    def click(project: int):
        body = {"tasks": [{"id": 1, "data": {"image": url}}], "project": f"{project}.9"}
        return client.post("/predict", json={**body, "params": {"context": {"result": [keypoint(5, 5)]}}})

    assert click(200).status_code == 200  # the latest is remembered
    forgotten = click(1)  # the first was dropped: Label Studio sends the config again with its requests
    assert forgotten.status_code == 400 and "label_config is missing" in forgotten.get_json()["error"]
    cache = client.application.extensions["sam2"].schemas
    assert cache.bytes <= 0.05 * (1 << 20) and 10 < len(cache) < 200


def test_a_label_config_over_the_limit_is_a_413_naming_the_setting(app_factory, media_server):
    client = app_factory(max_label_config_kb=64).test_client()
    big = IMAGE_CONFIG.replace("<View>", "<View>" + "<!-- padding -->" * 5000)  # ~80 KB
    resp = client.post("/setup", json={"project": "1", "schema": big})
    assert resp.status_code == 413 and "MAX_LABEL_CONFIG_KB" in resp.get_json()["error"]
    url = media_server.add_image("a.png", noise_image(20, 20))
    body = predict_body([{"id": 1, "data": {"image": url}}], [keypoint(5, 5)], big)
    resp = client.post("/predict", json=body)
    assert resp.status_code == 413 and "MAX_LABEL_CONFIG_KB" in resp.get_json()["error"]
    assert client.post("/setup", json={"project": "1", "schema": IMAGE_CONFIG}).status_code == 200


# --- the prefetcher's task ids --------------------------------------------------------------------


@pytest.fixture
def prefetcher(monkeypatch, tmp_path):
    from label_studio_sam2.service.settings import Settings

    # a job that exits at once: what is tested is which ids are started, not the pre-encoding
    monkeypatch.setattr(sys, "executable", "/bin/true")
    settings = Settings.from_env(
        prefetch_tasks=3,
        store_dir=str(tmp_path / "store"),
        label_studio_url="http://ls.invalid",
        label_studio_api_key="x" * 40,
    )
    return prefetch.Prefetcher(settings, "model")


def test_prefetcher_remembers_a_bounded_number_of_task_ids(prefetcher, monkeypatch):
    monkeypatch.setattr(prefetch, "REMEMBERED", 20)
    for task_id in range(60):
        assert prefetcher.after_click(1, task_id)
        prefetcher.wait(10)
    assert len(prefetcher._done) == 20
    assert not prefetcher.after_click(1, 59)  # a recent task: not prefetched after twice
    assert prefetcher.after_click(1, 0)  # one clicked long ago was forgotten: prefetched again
    prefetcher.wait(10)


def test_a_giant_task_id_is_never_a_500_nor_kept(app_factory, media_server, tmp_path):
    app = app_factory(
        prefetch_tasks=3,
        store_dir=str(tmp_path / "store"),
        label_studio_url="http://ls.invalid",
        label_studio_api_key="x" * 40,
    )
    prefetcher = app.extensions["sam2"].prefetcher
    assert prefetcher is not None
    url = media_server.add_image("a.png", noise_image(20, 20))
    giant = "1" * (4 << 20)  # a command-line argument this long is E2BIG
    body = predict_body([{"id": giant, "data": {"image": url}}], [keypoint(5, 5)])
    resp = app.test_client().post("/predict", json=body)
    # refused as a request (task ids are checked before anything keeps or logs them), not a 500
    assert resp.status_code == 400 and "task" in resp.get_json()["error"]
    assert len(resp.get_json()["error"]) < 500  # the id is not echoed back whole
    assert prefetcher.started == 0 and len(prefetcher._done) == 0
    for bad in ("12", 1.5, True, -1, 2**64, [1]):
        assert not prefetcher.after_click(1, bad)
