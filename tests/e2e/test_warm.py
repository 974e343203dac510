"""Pre-encoding a real Label Studio project into the embedding store, and idle-time prefetch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import requests

from devkit import lsserver
from devkit.sample_media import keypoint, make_scene
from tests.conftest import BOTH_PRECISIONS
from tests.e2e.regions import IMAGE_CONFIG, brush_masks

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def warm_project(label_studio, tmp_path_factory):
    media = tmp_path_factory.mktemp("warm-media")
    project = lsserver.create_project(label_studio, "SAM2 pre-encoding E2E", IMAGE_CONFIG)
    scenes = [make_scene(media / f"w{i}.png", 64 + 8 * i, 48, seed=20 + i) for i in range(4)]
    tasks = [label_studio.upload(project.id, s.path) for s in scenes]
    return project, list(zip(tasks, scenes, strict=True))


def _warm(label_studio, project_id, store, model_dir, *extra) -> str:
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "label_studio_sam2",
            "warm",
            "--project",
            str(project_id),
            "--store",
            str(store),
        ]
        + ["--model", str(model_dir), "--device", "cpu", "--quiet", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=lsserver.REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert label_studio.token not in proc.stdout + proc.stderr
    return proc.stdout


def _metric(backend_url: str, name: str) -> float:
    text = requests.get(f"{backend_url}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@BOTH_PRECISIONS  # CPU_PRECISION for warm and the server: bf16 is what `auto` picks on many CPUs
def test_warm_encodes_every_image_once_and_resumes(
    label_studio, warm_project, backend_model_dir, tmp_path, cpu_precision
):
    project, tasks = warm_project
    store = tmp_path / "store"
    first = _warm(label_studio, project.id, store, backend_model_dir)
    assert "encoded 4, already stored 0, failed 0" in first
    assert f"encoder precision {cpu_precision}" in first  # why another precision encodes again
    assert len(list(store.rglob("*.emb"))) == 4
    again = _warm(label_studio, project.id, store, backend_model_dir)
    assert "encoded 0, already stored 4, failed 0" in again

    # a server started afterwards (a restart) answers the first click without the encoder
    backend = lsserver.start_backend(
        backend_model_dir,
        label_studio,
        log_path=tmp_path / "backend.log",
        extra_env={"EMBEDDING_STORE_DIR": str(store)},
    )
    try:
        backend.wait_for_model(120)
        ml = lsserver.connect_backend(label_studio, project.id, backend.url, title="SAM2 warm")
        task, scene = tasks[0]
        data = lsserver.predict_interactive(label_studio, ml.id, task["id"], [keypoint(scene)])
        brush_masks(data["result"], scene.width, scene.height)
        assert _metric(backend.url, "sam2_embedding_store_hits") == 1
        assert _metric(backend.url, 'sam2_model_seconds_count{part="encoder"}') == 0
    finally:
        backend.stop()


def test_a_click_prefetches_the_next_tasks_in_the_background(
    label_studio, warm_project, backend_model_dir, tmp_path
):
    project, tasks = warm_project
    store = tmp_path / "store"
    backend = lsserver.start_backend(
        backend_model_dir,
        label_studio,
        log_path=tmp_path / "backend.log",
        extra_env={"EMBEDDING_STORE_DIR": str(store), "PREFETCH_TASKS": "2"},
    )
    try:
        backend.wait_for_model(120)
        ml = lsserver.connect_backend(label_studio, project.id, backend.url, title="SAM2 prefetch")
        task, scene = tasks[0]
        lsserver.predict_interactive(label_studio, ml.id, task["id"], [keypoint(scene)])
        deadline = time.monotonic() + 120
        while len(list(store.rglob("*.emb"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        # the clicked image (stored by the click) and the next two tasks (by the prefetch job)
        assert len(list(store.rglob("*.emb"))) == 3
        next_task, next_scene = tasks[1]
        data = lsserver.predict_interactive(label_studio, ml.id, next_task["id"], [keypoint(next_scene)])
        brush_masks(data["result"], next_scene.width, next_scene.height)
        assert _metric(backend.url, "sam2_embedding_store_hits") == 1
        assert _metric(backend.url, 'sam2_model_seconds_count{part="encoder"}') == 1
    finally:
        backend.stop()
