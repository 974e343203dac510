"""Issue 23's attack on "Retrieve predictions" against the real Label Studio 1.23.2 and a real
backend process: what the background job writes comes from Label Studio, never from the request.

An anonymous request (no basic auth configured, as the default is) names project A. Its first
task's image trickles past PREDICT_DEADLINE_S, so the rest is handed to the background job. The
rest names a real task of project B, and a real task of project A, each with a `data:` image, a
rectangle labelled HACKED and a label config that has that label. Project B's task must get no
prediction; project A's gets one predicted from what Label Studio holds (its "object" rectangle).
"""

from __future__ import annotations

import base64

import pytest
import requests

from devkit import lsserver
from devkit.media_server import MediaServer
from devkit.sample_media import make_scene, rectangle
from tests.conftest import noise_image
from tests.e2e.test_queue import CONFIG, make_project, wait_for

pytestmark = pytest.mark.e2e

HACKED_CONFIG = CONFIG.replace('<Label value="object"/>', '<Label value="object"/><Label value="HACKED"/>')


def test_an_anonymous_retrieve_cannot_write_into_another_project(label_studio, backend_model_dir, tmp_path):
    ls = label_studio
    for folder in ("media", "slow"):
        (tmp_path / folder).mkdir()
    fast = MediaServer(tmp_path / "media").serve_files()
    slow = MediaServer(tmp_path / "slow", delay_s=3.0).serve_files()  # past the 1 s deadline
    backend = None
    try:
        project_a, (first, second) = make_project(ls, (tmp_path / "media", fast.url), "handoff A", 2)
        project_b, (victim,) = make_project(ls, (tmp_path / "media", fast.url), "handoff B", 1)
        backend = lsserver.start_backend(
            backend_model_dir,
            ls,
            log_path=tmp_path / "backend.log",
            extra_env={
                "PREDICT_DEADLINE_S": "1",
                "RETRIEVE_MODE": "boxes",
                "MEDIA_ALLOWED_HOSTS": "127.0.0.1",  # the media hosts, beside Label Studio
                "EMBEDDING_STORE_DIR": "off",
            },
        )
        trickle = slow.add_image("trickle.png", noise_image(48, 64))
        scene = make_scene(tmp_path / "scene.png", seed=7)  # a shape the model segments
        sent = "data:image/png;base64," + base64.b64encode(scene.path.read_bytes()).decode()
        hacked = [rectangle(scene, label="HACKED")]
        body = {
            "tasks": [
                {"id": first, "data": {"image": trickle}, "annotations": [{"result": [rectangle(scene)]}]},
                {"id": victim, "data": {"image": sent}, "annotations": [{"result": hacked}]},
                {"id": second, "data": {"image": sent}, "annotations": [{"result": hacked}]},
            ],
            "project": f"{project_a.id}.1795498385",
            "label_config": HACKED_CONFIG,
            "params": {"login": None, "password": None, "context": None},
        }
        resp = requests.post(f"{backend.url}/predict", json=body, timeout=60)
        assert resp.status_code == 200, resp.text[:300]
        assert resp.json()["results"][1:] == [[], []]  # handed to the background job
        # the job takes the tasks in order: the victim first, then project A's own
        wait_for(
            "the background job wrote task A",
            lambda: lsserver.predictions(ls, second),
            120,
            [backend.log_path],
        )
        assert lsserver.predictions(ls, victim) == [], backend.log()[-2000:]
        [prediction] = lsserver.predictions(ls, second)
        labels = {label for region in prediction.result for label in region["value"]["brushlabels"]}
        assert labels == {"object"}  # Label Studio's rectangle, not the request's
        assert f"task {victim} failed: not a task of project {project_a.id}" in backend.log()
    finally:
        if backend is not None:
            backend.stop()
        fast.close()
        slow.close()
