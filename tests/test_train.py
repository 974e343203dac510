"""The backend side of fine-tuning: reading corrected masks, per-project serving, the webhook."""

from __future__ import annotations

import numpy as np
import torch

from label_studio_sam2.engine.finetune import decoder_state
from label_studio_sam2.engine.finetuned_decoders import DecoderVersions
from label_studio_sam2.labelstudio.protocol import latest_annotation, parse_label_config
from label_studio_sam2.labelstudio.rle import encode_mask
from label_studio_sam2.labelstudio.train import annotation_masks
from tests.conftest import IMAGE_CONFIG, decode_brush, keypoint, noise_image, predict_body

POLYGON_CONFIG = IMAGE_CONFIG.replace(
    "</View>",
    '<PolygonLabels name="poly" toName="image"><Label value="object"/></PolygonLabels></View>',
)


def _brush(mask: np.ndarray) -> dict:
    h, w = mask.shape
    return {
        "type": "brushlabels",
        "from_name": "tag",
        "to_name": "image",
        "original_width": w,
        "original_height": h,
        "value": {"format": "rle", "rle": encode_mask(mask), "brushlabels": ["object"]},
    }


def test_brush_and_polygon_regions_of_the_latest_annotation_become_masks():
    ring = np.zeros((40, 60), bool)
    ring[5:30, 10:40] = True
    ring[12:22, 18:30] = False  # a hole survives the round trip
    polygon = {
        "type": "polygonlabels",
        "from_name": "poly",
        "to_name": "image",
        "original_width": 60,
        "original_height": 40,
        "value": {"points": [[50, 50], [90, 50], [90, 95], [50, 95]], "polygonlabels": ["object"]},
    }
    keypoint_region = {"type": "keypointlabels", "original_width": 60, "original_height": 40, "value": {}}
    task = {
        "id": 3,
        "annotations": [
            {"id": 1, "updated_at": "2026-01-01", "result": [_brush(~ring)]},
            {"id": 2, "updated_at": "2026-01-02", "result": [_brush(ring), polygon, keypoint_region]},
            {"id": 3, "updated_at": "2026-01-03", "was_cancelled": True, "result": [_brush(~ring)]},
        ],
    }
    masks = annotation_masks(latest_annotation(task), parse_label_config(POLYGON_CONFIG))
    assert [name for name, _ in masks] == ["image", "image"]
    assert np.array_equal(masks[0][1], ring)
    square = np.zeros((40, 60), bool)
    square[20:38, 30:54] = True  # pixels whose centres lie inside x 30..54, y 20..38
    got = masks[1][1]
    assert (got & square).sum() / (got | square).sum() > 0.9  # PIL's rasteriser: edges within a pixel


def test_a_project_with_an_active_fine_tune_gets_its_decoder_and_model_version(
    app_factory, tiny_model, media_server, tmp_path
):
    state = {k: v.clone() for k, v in decoder_state(tiny_model.model).items()}
    bias = next(k for k in state if k.endswith("mask_decoder.iou_prediction_head.proj_out.bias"))
    state[bias] += 5.0  # a decoder that differs in its scores: visible in the answer
    versions = DecoderVersions(tmp_path, 5)
    versions.activate(versions.save(state, {"base_model": tiny_model.model_id}))
    client = app_factory(finetune_dir=str(tmp_path), finetune_refresh_s=0).test_client()

    url = media_server.add_image("a.png", noise_image(48, 64))
    body = predict_body([{"id": 1, "data": {"image": url}}], [keypoint(50, 50)])
    base = client.post("/predict", json={**body, "project": "6.1700000000"}).get_json()
    tuned = client.post("/predict", json={**body, "project": "5.1700000000"}).get_json()
    assert tuned["results"][0]["model_version"] == base["results"][0]["model_version"] + "-p5-v0001"
    assert tuned["model_version"] == tuned["results"][0]["model_version"]
    assert decode_brush(tuned["results"][0]["result"][0]).shape == (48, 64)
    assert tuned["results"][0]["score"] != base["results"][0]["score"]
    setup = client.post("/setup", json={"project": "5.1700000000", "schema": IMAGE_CONFIG}).get_json()
    assert setup["model_version"].endswith("-p5-v0001")
    # the base model was not touched, and rollback serves it to project 5 again
    assert all(
        torch.equal(v, decoder_state(tiny_model.model)[k]) for k, v in decoder_state(tiny_model.model).items()
    )
    versions.rollback()
    again = client.post("/predict", json={**body, "project": "5.1700000000"}).get_json()
    assert again["results"][0]["model_version"] == base["results"][0]["model_version"]


def test_start_training_webhook_needs_label_studio_and_a_project(app_factory):
    client = app_factory(label_studio_url=None, label_studio_api_key=None).test_client()
    resp = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 4}})
    assert resp.status_code == 400 and "LABEL_STUDIO_URL" in resp.get_json()["error"]
    resp = client.post("/webhook", json={"action": "START_TRAINING", "project": {"title": "x"}})
    assert resp.status_code == 400 and "project" in resp.get_json()["error"]
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED"}).status_code == 200


def _label_studio_refusing(httpserver):
    """A Label Studio that refuses the token: every API call answers 401."""
    import re

    httpserver.expect_request(re.compile(".*")).respond_with_json({"detail": "Invalid token."}, status=401)
    return httpserver.url_for("/").rstrip("/")


def test_start_training_answers_a_job_id_and_the_server_logs_how_the_run_ended(
    app_factory, httpserver, tmp_path, caplog
):
    import logging
    import subprocess
    import sys
    import time
    from pathlib import Path

    url = _label_studio_refusing(httpserver)
    app = app_factory(label_studio_url=url, label_studio_api_key="s3cret-token", finetune_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="label_studio_sam2.service.train"):
        resp = app.test_client().post("/webhook", json={"action": "START_TRAINING", "project": {"id": 4}})
        assert resp.status_code == 200
        job = resp.get_json()["job"]
        assert job.startswith("train-4-")  # Label Studio keeps it as the backend's training job
        assert app.extensions["sam2"]._trainer.wait(4, 300) not in (None, 0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "fine-tuning failed" not in caplog.text:
            time.sleep(0.2)
    [ended] = [r for r in caplog.records if "fine-tuning failed" in r.getMessage()]
    assert ended.levelname == "WARNING"
    assert "project 4" in ended.getMessage() and "HTTP 401" in ended.getMessage()
    assert "s3cret-token" not in caplog.text

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "label_studio_sam2",
            "train",
            "--project",
            "4",
            "--status",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:3] == ["state", "started", "(UTC)"]  # a table, not a Python dict
    assert lines[2].startswith("failed") and "HTTP 401" in lines[2] and job.rsplit("-", 1)[1] in lines[2]
    assert "{" not in proc.stdout


def test_train_status_and_list_show_the_running_and_the_last_runs_as_tables(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from label_studio_sam2.service.trainruns import end_run, start_run

    versions = DecoderVersions(tmp_path, 7)
    state = {"w": torch.zeros(2)}
    manifest = {
        "base_model": "sam2-shapes-abc",
        "examples": {"train": 24, "val": 6, "tasks": 30},
        "metrics": {
            "before": {"click_miou": 0.27, "box_miou": 0.5},
            "after": {"click_miou": 0.97, "box_miou": 0.9},
        },
    }
    versions.activate(versions.save(state, manifest))
    finished = start_run(versions.dir, "test")
    end_run(
        versions.dir,
        finished,
        "finished",
        metrics=manifest["metrics"],
        version="v0001",
        activated=True,
        model_version="sam2-shapes-abc-p7-v0001",
        path=str(versions.dir / "v0001"),
    )
    running = start_run(versions.dir, "test")  # this test's own process: alive
    assert running["pid"] == os.getpid()

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "label_studio_sam2",
            "train",
            "--project",
            "7",
            "--status",
            "--list",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "{'" not in out and '{"' not in out  # no Python dict
    runs = out.split("\n\n")[0].splitlines()
    assert runs[2].startswith("running") and f"pid {os.getpid()}" in runs[2]
    assert runs[3].startswith("finished") and "0.270 -> 0.970" in runs[3] and "activated v0001" in runs[3]
    assert str(versions.dir / "v0001") in runs[3]
    table = out.split("\n\n")[1].splitlines()
    assert "served: v0001" in table[0]
    assert table[1].split()[:2] == ["version", "active"]
    assert table[2].split()[:2] == ["v0001", "yes"] and "24/6" in table[2] and "0.500 -> 0.900" in table[2]
