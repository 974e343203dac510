"""Fine-tuning through the real Label Studio: 30 tasks labeled with ring masks (a shape the
trained fixture fills in), training started by Label Studio's "Start Training", measured on 20
held-out tasks through Label Studio's interactive endpoint; and a fine-tune that does not improve
is kept but not activated."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from devkit import lsserver
from devkit.rings import make_ring
from label_studio_sam2.engine.finetune import deepest_point, mask_iou
from label_studio_sam2.engine.finetuned_decoders import DecoderVersions
from label_studio_sam2.engine.transforms import mask_box
from label_studio_sam2.labelstudio.rle import encode_mask
from tests.conftest import keypoint, rectangle
from tests.e2e.regions import IMAGE_CONFIG, brush_masks, region_id

pytestmark = pytest.mark.e2e

N_TRAIN, N_HELD_OUT, N_RETRIEVE = 30, 20, 3


def _brush(mask: np.ndarray) -> dict:
    h, w = mask.shape
    return {
        "id": region_id(),
        "type": "brushlabels",
        "from_name": "tag",
        "to_name": "image",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": encode_mask(mask), "brushlabels": ["object"]},
    }


def _rectangle(mask: np.ndarray) -> dict:
    h, w = mask.shape
    x1, y1, x2, y2 = (float(v) for v in mask_box(mask))
    return rectangle(100 * x1 / w, 100 * y1 / h, 100 * (x2 - x1) / w, 100 * (y2 - y1) / h, w=w, h=h)


def _click(mask: np.ndarray) -> dict:
    h, w = mask.shape
    x, y = (float(v) for v in deepest_point(mask))
    return keypoint(100 * x / w, 100 * y / h, w=w, h=h)


@pytest.fixture(scope="module")
def rings_project(label_studio, tmp_path_factory):
    """A project of ring images: the first 30 tasks annotated with brush masks through the API,
    20 held out (3 of them with a rectangle, for "Retrieve predictions" in boxes mode)."""
    media = tmp_path_factory.mktemp("rings")
    project = lsserver.create_project(label_studio, "SAM2 fine-tuning E2E", IMAGE_CONFIG)
    labeled, held_out = [], []
    for split, n, out in (("train", N_TRAIN, labeled), ("val", N_HELD_OUT, held_out)):
        for seed in range(n):
            ring = make_ring(seed, split)
            path = media / f"{split}-{seed}.png"
            Image.fromarray(ring.image).save(path)
            out.append((label_studio.upload(project.id, path), ring.mask))
    for task, mask in labeled:
        label_studio.client.annotations.create(id=task["id"], result=[_brush(mask)])
    for task, mask in held_out[:N_RETRIEVE]:
        label_studio.client.annotations.create(id=task["id"], result=[_rectangle(mask)])
    return project, labeled, held_out


@pytest.fixture(scope="module")
def finetune_backend(label_studio, rings_project, backend_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetuned")
    log_path = root.parent / "finetune-backend.log"
    backend = lsserver.start_backend(
        backend_model_dir,
        label_studio,
        log_path=log_path,
        extra_env={
            "SAM2_FINETUNE_DIR": str(root),
            "FINETUNE_EPOCHS": "4",
            "FINETUNE_LR": "1e-3",
            "FINETUNE_REFRESH_S": "2",
        },
    )
    try:
        backend.wait_for_model(120)
        project = rings_project[0]
        ml = lsserver.connect_backend(label_studio, project.id, backend.url, title="SAM2 fine-tune")
        yield backend, ml, root
    finally:
        backend.stop()
    bad = [line for line in log_path.read_text().splitlines() if "Traceback" in line or " ERROR " in line]
    assert not bad, "\n".join(bad[:20])


def _held_out_click_miou(label_studio, ml, held_out) -> tuple[float, set[str]]:
    ious, versions = [], set()
    for task, mask in held_out:
        data = lsserver.predict_interactive(label_studio, ml.id, task["id"], [_click(mask)])
        (pred,) = brush_masks(data["result"], mask.shape[1], mask.shape[0])
        ious.append(mask_iou(pred, mask))
        versions.add(data["model_version"])
    return float(np.mean(ious)), versions


def test_a_fine_tune_that_does_not_improve_is_not_activated(
    label_studio, rings_project, finetune_backend, backend_model_dir
):
    project, _, held_out = rings_project
    backend, ml, root = finetune_backend
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}
    proc = subprocess.run(
        [sys.executable, "-m", "label_studio_sam2", "train", "--project", str(project.id), "--dir", str(root)]
        + ["--model", str(backend_model_dir), "--device", "cpu", "--epochs", "1", "--lr", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=lsserver.REPO_ROOT,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert label_studio.token not in out
    assert f"{N_TRAIN} mask(s) from {N_TRAIN} task(s)" in out
    assert f"skipped {N_RETRIEVE}: no brush or polygon region" in out
    assert "not activated" in out and "held-out 1-click mIoU" in out
    versions = DecoderVersions(root, project.id)
    assert versions.active() is None
    (version,) = versions.versions()
    manifest = versions.manifest(version)
    assert manifest["activated"] is False and manifest["examples"]["tasks"] == N_TRAIN
    time.sleep(2.5)  # past the server's refresh interval: it still serves the base model
    _, served = _held_out_click_miou(label_studio, ml, held_out[:2])
    assert served and not any(f"-p{project.id}-" in v for v in served)


def test_start_training_in_label_studio_activates_a_better_decoder_for_this_project(
    label_studio, rings_project, finetune_backend
):
    project, _, held_out = rings_project
    backend, ml, root = finetune_backend
    before, base_versions = _held_out_click_miou(label_studio, ml, held_out)
    (base_version,) = base_versions

    label_studio.client.ml.train(id=ml.id)  # the "Start Training" button
    versions = DecoderVersions(root, project.id)
    deadline = time.monotonic() + 600
    while versions.active() is None and time.monotonic() < deadline:
        time.sleep(2)
    log = (versions.dir / "train.log").read_text()
    assert versions.active() is not None, f"no activated version; train.log:\n{log[-3000:]}"
    assert label_studio.token not in log
    new_version = f"{base_version}-p{project.id}-{versions.active()}"

    # the server says how the run ended, and `train --status` shows it
    backend_log = root.parent / "finetune-backend.log"
    deadline = time.monotonic() + 60
    while "fine-tuning finished" not in backend_log.read_text() and time.monotonic() < deadline:
        time.sleep(1)
    [ended] = [line for line in backend_log.read_text().splitlines() if "fine-tuning finished" in line]
    assert f"project {project.id}: " in ended and f"activated {versions.active()}" in ended, ended
    assert "held-out 1-click mIoU" in ended and f"written to {versions.dir / versions.active()}" in ended
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "label_studio_sam2",
            "train",
            "--project",
            str(project.id),
            "--status",
            "--dir",
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=lsserver.REPO_ROOT,
    )
    assert status.returncode == 0, status.stderr
    # this run, beside the CLI's earlier one of the same project (test above: not activated)
    finished = [line for line in status.stdout.splitlines() if line.startswith("finished")]
    [run] = [line for line in finished if f"activated {versions.active()}" in line]
    assert "->" in run and "not activated" not in run, status.stdout

    deadline = time.monotonic() + 60  # a running server picks it up within a minute
    while True:
        task, mask = held_out[-1]
        data = lsserver.predict_interactive(label_studio, ml.id, task["id"], [_click(mask)])
        if data["model_version"] == new_version or time.monotonic() > deadline:
            break
        time.sleep(1)
    after, served = _held_out_click_miou(label_studio, ml, held_out)
    print(f"\nheld-out 1-click mIoU through Label Studio: {before:.3f} -> {after:.3f}")
    assert served == {new_version}
    assert after >= before + 0.15, f"held-out 1-click mIoU {before:.3f} -> {after:.3f}"

    # "Retrieve predictions" uses the new version (boxes mode: the held-out tasks with a rectangle)
    ids = [task["id"] for task, _ in held_out[:N_RETRIEVE]]
    lsserver.retrieve_predictions(label_studio, project.id, ids)
    for task, mask in held_out[:N_RETRIEVE]:
        preds = [p for p in lsserver.predictions(label_studio, task["id"]) if p.model_version == new_version]
        assert len(preds) == 1, [p.model_version for p in lsserver.predictions(label_studio, task["id"])]
        (pred,) = brush_masks(preds[0].result, mask.shape[1], mask.shape[0])
        assert mask_iou(pred, mask) > 0.5
