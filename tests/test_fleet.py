"""Several processes, one backend: replicas sharing prompt memory through a real redis-server,
a Redis outage in the middle of a labeling session, and `/metrics` adding up gunicorn workers.

The replicas are real `python -m label_studio_sam2 serve` processes on the trained shapes fixture: a box
drawn on one and a click sent to the other (alone, as Label Studio sends it) must give the mask
one process gives for box then click; the same click without the box gives something else.
"""

from __future__ import annotations

import re
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from devkit.gunicorn import start_gunicorn
from devkit.lsserver import Backend, free_port, port_in_use, start_backend
from devkit.media_server import MediaServer, encode_image
from devkit.redis_server import RedisServer
from devkit.scenes import box_of, iou, make_scene
from tests.conftest import click_px, decode_brush, predict_body, rect_px

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "devkit" / "sam2-shapes"
SLOW_CLICK_S = 3.0  # a click on this tiny model takes ~0.1 s; Redis must never add seconds


@pytest.fixture(scope="module")
def scene_object(tmp_path_factory):
    """An image served over HTTP, one shape's box, and a negative click inside that box beside
    the shape: box then click gives the shape; the click alone does not."""
    media = MediaServer(tmp_path_factory.mktemp("media")).serve_files()
    scene = make_scene(0, split="test")
    shape = scene.masks[next(i for i in range(len(scene.masks)) if scene.isolated(i))]
    x1, y1, x2, y2 = box_of(shape)
    inside = np.zeros(scene.hw, bool)
    inside[int(y1) + 2 : int(y2) - 2, int(x1) + 2 : int(x2) - 2] = True
    ys, xs = np.nonzero(inside & ~_grow(shape, 2))
    assert len(xs), "the box holds background beside the shape"
    url = media.add("scene.png", encode_image(scene.image))
    yield {
        "url": url,
        "shape": shape,
        "box": rect_px((x1, y1, x2, y2), scene.hw[1], scene.hw[0]),
        "click": click_px((xs[0] + 0.5, ys[0] + 0.5), scene.hw, positive=False),
    }
    media.close()


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        out[1:] |= out[:-1].copy()
        out[:-1] |= out[1:].copy()
        out[:, 1:] |= out[:, :-1].copy()
        out[:, :-1] |= out[:, 1:].copy()
    return out


def ask(base: str, task_id: int, obj: dict, region: str) -> np.ndarray:
    """POST one region of `obj` ("box" or "click") for task `task_id`; the decoded mask."""
    body = predict_body([{"id": task_id, "data": {"image": obj["url"]}}], [obj[region]])
    start = time.monotonic()
    resp = requests.post(f"{base}/predict", json=body, timeout=30)
    assert time.monotonic() - start < SLOW_CLICK_S
    assert resp.status_code == 200, resp.text
    result = resp.json()["results"][0]["result"]
    return decode_brush(result[0]) if result else np.zeros(obj["shape"].shape, bool)


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def replicas(redis, tmp_path_factory):
    """Two backend processes sharing one Redis (started side by side)."""
    logs = tmp_path_factory.mktemp("replicas")
    env = {"REDIS_URL": redis.url, "MEDIA_ALLOWED_HOSTS": "127.0.0.1", "TORCH_THREADS": "1"}
    with ThreadPoolExecutor(2) as pool:
        started = list(
            pool.map(
                lambda name: start_backend(FIXTURE, log_path=logs / f"{name}.log", extra_env=env),
                ("a", "b"),
            )
        )
    try:
        for backend in started:
            assert backend.wait_for_model(120).get("model_loaded"), backend.log()
        yield started
    finally:
        for backend in started:
            backend.stop()


@pytest.fixture(scope="module")
def one_process(scene_object):
    """Box then click in one process without Redis: the reference mask."""
    from label_studio_sam2.engine.models import load_image_model
    from label_studio_sam2.labelstudio.app import create_app
    from label_studio_sam2.service.settings import Settings

    model = load_image_model(str(FIXTURE), "cpu")
    settings = Settings.from_env(redis_url=None, media_allowed_hosts=("127.0.0.1",))

    def app():
        return create_app(settings, loaded_model=model).test_client()

    return app


def _post(client, task_id: int, obj: dict, region: str) -> np.ndarray:
    body = predict_body([{"id": task_id, "data": {"image": obj["url"]}}], [obj[region]])
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    result = resp.get_json()["results"][0]["result"]
    return decode_brush(result[0]) if result else np.zeros(obj["shape"].shape, bool)


def test_a_box_on_one_replica_and_a_click_on_another_give_one_process_s_mask(
    replicas, scene_object, one_process
):
    a, b = (r.url for r in replicas)
    obj = scene_object
    single = one_process()
    _post(single, 1, obj, "box")
    reference = _post(single, 1, obj, "click")
    assert iou(reference, obj["shape"]) >= 0.8  # the box held: the shape, not the click's guess

    ask(a, 1, obj, "box")
    assert np.array_equal(ask(b, 1, obj, "click"), reference)

    # Without REDIS_URL the replica that gets the click does not know the box: another mask
    first, second = one_process(), one_process()
    _post(first, 2, obj, "box")
    alone = _post(second, 2, obj, "click")
    assert iou(alone, reference) < 0.5
    assert np.array_equal(ask(b, 3, obj, "click"), alone)  # the same click alone on replica B


def test_redis_stopped_mid_session_clicks_still_answer_then_share_again(
    replicas, redis, scene_object, one_process
):
    a, b = replicas
    obj = scene_object
    single = one_process()
    _post(single, 1, obj, "box")
    reference = _post(single, 1, obj, "click")

    redis.stop()
    ask(a.url, 10, obj, "box")  # remembered by replica A alone
    assert np.array_equal(ask(a.url, 10, obj, "click"), reference)
    assert ask(b.url, 11, obj, "box").any()
    start = time.monotonic()
    while time.monotonic() - start < 4.0:  # past the back-off: Redis is asked again, still down
        assert ask(a.url, 10, obj, "click").any()
        time.sleep(0.5)
    for replica in (a, b):
        assert _count(replica, "is unreachable") == 1, replica.log()

    redis.start()  # same port, empty
    deadline = time.monotonic() + 15
    task = 100
    while True:  # the next box reaches Redis once the back-off is over
        task += 1
        ask(a.url, task, obj, "box")
        if np.array_equal(ask(b.url, task, obj, "click"), reference):
            break
        assert time.monotonic() < deadline, "prompt memory never shared again after Redis came back"
        time.sleep(0.5)
    assert _count(a, "is back; boxes and masks are shared again") == 1
    assert _count(a, "is unreachable") == 1


def _count(backend: Backend, text: str) -> int:
    return backend.log_path.read_text().count(text)


# --- /metrics of a gunicorn with two workers -----------------------------------------------------


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? (\S+)$" if want else rf"^{name} (\S+)$"
    values = [float(m.group(1)) for m in re.finditer(pattern, text, re.M)]
    assert len(values) == 1, f"{name}{labels} in:\n{text}"
    return values[0]


def test_metrics_add_up_every_gunicorn_worker(tmp_path):
    port = free_port()
    log_path = tmp_path / "gunicorn.log"
    # the worker pid in each access-log line: which worker answered what
    proc = start_gunicorn(
        FIXTURE,
        port,
        log_path,
        "--access-logformat",
        "%(p)s %(r)s %(s)s",
        WORKERS="2",
        THREADS="2",
        ADMISSION_QUEUE_SIZE="1",
        TORCH_THREADS="1",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        while not port_in_use("127.0.0.1", port):  # the master binds before it forks the workers
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        sent = 0
        deadline = time.monotonic() + 90
        while True:  # until both workers have answered some (each request on a new connection)
            with ThreadPoolExecutor(4) as pool:
                assert set(pool.map(lambda _: _health(base), range(20))) == {200}
            sent += 20
            pids = set(re.findall(r"<(\d+)> GET /health", log_path.read_text()))
            if len(pids) >= 2:
                break
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
        for _ in range(3):  # whichever worker answers the scrape counts every worker's requests
            text = requests.get(f"{base}/metrics", timeout=10).text
            assert _metric(text, "sam2_requests_total", endpoint="/health", outcome="ok") == sent
            assert (
                _metric(text, "sam2_admission_capacity") == 2
            )  # ADMISSION_QUEUE_SIZE=1 per worker, both alive
        metrics_dir = re.search(r"workers keep their metrics in (\S+)", log_path.read_text()).group(1)
        assert Path(metrics_dir).is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:  # killed: no on_exit hook removes its metrics directory
            proc.kill()
            proc.wait(10)
            made = re.search(r"workers keep their metrics in (\S+)", log_path.read_text())
            if made:
                shutil.rmtree(made.group(1), ignore_errors=True)
    assert not Path(metrics_dir).exists()  # the temporary directory goes with gunicorn


def _health(base: str) -> int:
    with requests.Session() as s:  # a new connection: any worker may take it
        return s.get(f"{base}/health", timeout=60).status_code
