"""Bulk pre-annotation against a real Label Studio 1.23.2: the CLI and "Retrieve predictions".

- `python -m label_studio_sam2 preannotate` over a project, interrupted with Ctrl-C (SIGINT) part way and
  run again: every task with a rectangle ends with exactly one prediction of the model version,
  the annotations are untouched, the summaries say what was done, skipped and why.
- "Retrieve predictions" on more tasks than fit before a (shortened) deadline: the backend answers
  what it finished, its background job writes the rest through the LS API; each task once.

Some media are uploaded (the token exchange path); the others come from a local server that
answers slowly, so a run lasts long enough to be interrupted and the deadline bites. Everything
is read back from Label Studio.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle

from devkit import lsserver
from devkit.media_server import MediaServer
from devkit.sample_media import make_scene, rectangle

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/><Label value="car"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="object"/><Label value="car"/></PolygonLabels>
  <RectangleLabels name="box" toName="image"><Label value="object"/><Label value="car"/></RectangleLabels>
</View>"""

MEDIA_DELAY_S = 0.3


@pytest.fixture(scope="module")
def slow_media(tmp_path_factory):
    """A media host that takes MEDIA_DELAY_S per image; yields (directory, base URL)."""
    root = tmp_path_factory.mktemp("slow-media")
    server = MediaServer(root, delay_s=MEDIA_DELAY_S).serve_files()
    yield root, server.url
    server.close()


def make_project(ls, slow_media, title: str, n_uploaded: int, n_slow: int, annotate=True):
    """A project of scenes: `n_uploaded` uploaded to LS, `n_slow` on the slow host, each with one
    rectangle annotation (label alternating car/object), plus one task without annotation.
    Returns (project, {task_id: scene})."""
    root, base = slow_media
    project = lsserver.create_project(ls, title, CONFIG)
    scenes = {}
    for i in range(n_uploaded):
        scene = make_scene(root / f"{title}-up{i}.png", seed=i)
        scenes[ls.upload(project.id, scene.path, "image/png")["id"]] = scene
    slow = [make_scene(root / f"{title}-slow{i}.png", seed=100 + i) for i in range(n_slow + 1)]
    imported = ls.client.projects.import_tasks(
        id=project.id, request=[{"image": f"{base}/{s.path.name}"} for s in slow], return_task_ids=True
    )
    scenes.update(zip(imported.task_ids, slow, strict=True))
    unannotated = imported.task_ids[-1]
    if annotate:
        for k, (task_id, scene) in enumerate(scenes.items()):
            if task_id != unannotated:
                ls.client.annotations.create(id=task_id, result=[rectangle(scene, ("car", "object")[k % 2])])
    return project, scenes, unannotated


def predictions_by_task(ls, task_ids) -> dict[int, list]:
    return {t: list(ls.client.predictions.list(task=t)) for t in task_ids}


def annotations(ls, task_ids) -> dict[int, list]:
    return {t: [(a.id, a.result) for a in ls.client.annotations.list(id=t)] for t in task_ids}


def cli(ls, model_dir, project_id, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "label_studio_sam2",
        "preannotate",
        "--project",
        str(project_id),
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--threads",
        "2",
        *extra,
    ]


def run_cli(ls, model_dir, project_id, *extra) -> tuple[subprocess.CompletedProcess, str]:
    """`preannotate` to its end; returns the process and its whole output."""
    done = subprocess.run(
        cli(ls, model_dir, project_id, *extra),
        env=cli_env(ls),
        cwd=lsserver.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, done.stdout + done.stderr


def cli_env(ls) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))}
    return {
        **env,
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
        "PYTHONUNBUFFERED": "1",
        # the media host is on loopback beside Label Studio: only Label Studio's own port is trusted
        "MEDIA_ALLOWED_HOSTS": "127.0.0.1",
    }


def predicted_count(ls, project_id) -> int:
    return sum(1 for n in lsserver.prediction_counts(ls, project_id).values() if n)


def check_brush(prediction, scene, label):
    [region] = prediction.result
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == [label]
    assert (region["original_width"], region["original_height"]) == (scene.width, scene.height)
    flat = np.asarray(decode_rle(region["value"]["rle"]))
    assert flat.size == scene.width * scene.height * 4


def test_cli_interrupted_and_resumed_predicts_every_task_once(label_studio, backend_model_dir, slow_media):
    ls = label_studio
    project, scenes, unannotated = make_project(ls, slow_media, "bulk cli", n_uploaded=2, n_slow=6)
    annotated = [t for t in scenes if t != unannotated]
    before = annotations(ls, scenes)

    proc = subprocess.Popen(
        cli(ls, backend_model_dir, project.id, "--prefetch", "1"),
        env=cli_env(ls),
        cwd=lsserver.REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while predicted_count(ls, project.id) < 2:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the first run predicted nothing within 60 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "stopping after the current task" in out and "interrupted after" in out, out
    first = predicted_count(ls, project.id)
    assert 2 <= first < len(annotated), out

    done, out = run_cli(ls, backend_model_dir, project.id)
    assert done.returncode == 0, out
    assert "finished after" in out and f"{len(annotated) - first} predicted" in out, out
    assert f"skipped {first}: already has a prediction of" in out and "skipped 1: no annotation" in out, out

    preds = predictions_by_task(ls, scenes)
    versions = {p.model_version for ps in preds.values() for p in ps}
    assert len(versions) == 1 and versions.pop().startswith("sam2"), versions
    assert [len(preds[t]) for t in annotated] == [1] * len(annotated)  # each exactly once
    assert preds[unannotated] == []
    for k, task_id in enumerate(scenes):
        if task_id != unannotated:
            check_brush(preds[task_id][0], scenes[task_id], ("car", "object")[k % 2])
    assert annotations(ls, scenes) == before  # a labeler's work is never touched


def test_cli_predicts_a_task_whose_prediction_of_this_version_is_empty(
    label_studio, backend_model_dir, slow_media
):
    """Earlier backends answered a task opened in Label Studio with an empty result, which Label
    Studio stored as a prediction of the backend's model version ("0.00%"); the CLI treats such a
    prediction as absent."""
    ls = label_studio
    project, scenes, unannotated = make_project(ls, slow_media, "bulk empty", n_uploaded=1, n_slow=0)
    [task_id] = [t for t in scenes if t != unannotated]
    version = "sam2-e2e-empty"
    ls.client.predictions.create(task=task_id, result=[], score=0.0, model_version=version)
    done, out = run_cli(
        ls, backend_model_dir, project.id, "--tasks", str(task_id), "--model-version", version
    )
    assert done.returncode == 0 and "1 predicted" in out, out
    stored = lsserver.predictions(ls, task_id)
    assert sorted(bool(p.result) for p in stored) == [False, True]
    assert all(p.model_version == version for p in stored)


def test_cli_auto_masks_as_polygons(label_studio, backend_model_dir, slow_media):
    ls = label_studio
    project, scenes, _ = make_project(ls, slow_media, "bulk auto", n_uploaded=1, n_slow=1, annotate=False)
    args = ["--mode", "auto", "--output", "polygon", "--label", "car", "--points-per-side", "4"]
    args += ["--iou-thresh", "0", "--stability-thresh", "0", "--min-area", "0", "--filter", "unannotated"]
    done, out = run_cli(ls, backend_model_dir, project.id, *args)
    assert done.returncode == 0, out
    assert "3 task(s) selected, 3 predicted" in out, out
    for ps in predictions_by_task(ls, scenes).values():
        [p] = ps
        for region in p.result:
            assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == ["car"], region
            assert len(region["value"]["points"]) >= 3


@pytest.fixture(scope="module")
def impatient_backend(label_studio, backend_model_dir, e2e_output_dir):
    """The backend with a 0.5 s /predict deadline: "Retrieve predictions" hands off at once."""
    backend = lsserver.start_backend(
        backend_model_dir,
        label_studio,
        log_path=e2e_output_dir / "backend-impatient.log",
        extra_env={"PREDICT_DEADLINE_S": "0.5", "RETRIEVE_MODE": "boxes", "MEDIA_ALLOWED_HOSTS": "127.0.0.1"},
    )
    yield backend
    backend.stop()


def test_retrieve_predictions_hands_the_rest_to_the_background_job(
    label_studio, impatient_backend, slow_media
):
    ls = label_studio
    project, scenes, unannotated = make_project(ls, slow_media, "bulk retrieve", n_uploaded=1, n_slow=6)
    annotated = [t for t in scenes if t != unannotated]
    lsserver.connect_backend(ls, project.id, impatient_backend.url)
    start = time.monotonic()
    lsserver.retrieve_predictions(ls, project.id, annotated)
    assert time.monotonic() - start < 20  # answered long before all the slow downloads were done
    deadline = time.monotonic() + 60
    while predicted_count(ls, project.id) < len(annotated):
        assert time.monotonic() < deadline, impatient_backend.log()[-3000:]
        time.sleep(0.2)
    lsserver.retrieve_predictions(ls, project.id, annotated)  # again: nothing new
    time.sleep(1.0)
    preds = predictions_by_task(ls, annotated)
    assert [len(preds[t]) for t in annotated] == [1] * len(annotated), preds
    log = impatient_backend.log()
    assert "handing the rest of this request to the background job" in log
    assert "background job:" in log and " done, " in log
    metrics = requests.get(f"{impatient_backend.url}/metrics", timeout=10).text
    assert 'sam2_background_tasks_total{outcome="done"}' in metrics
    assert "Traceback" not in log and " ERROR " not in log
