"""Training and what it loads (issue 23, must-deliver 5, 6, 7 and 9): a planted checkpoint never
runs, hostile annotations are skipped and counted, trainings are capped and locked across
processes, their children reaped, their files private."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from devkit.rings import ring_examples
from label_studio_sam2.engine.finetune import FinetuneConfig, finetune
from label_studio_sam2.engine.finetuned_decoders import DecoderVersions, ProjectDecoders
from label_studio_sam2.engine.image import ImagePredictor

FIXTURE = Path(__file__).resolve().parent.parent / "devkit" / "sam2-shapes"


class _Planted:
    """Unpickling this writes `marker`: what a planted checkpoint would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": "0" * 16, "state": {}, "evil": _Planted(marker)}, path)


@pytest.fixture(scope="module")
def shapes_model():
    from label_studio_sam2.engine.models import load_image_model

    return load_image_model(str(FIXTURE), "cpu")


def test_a_planted_checkpoint_never_runs_when_training_starts(shapes_model, tmp_path, caplog):
    predictor = ImagePredictor(shapes_model)
    train, val = ring_examples(predictor, range(4), "train"), ring_examples(predictor, range(2), "val")
    versions = DecoderVersions(tmp_path, 3)
    marker = tmp_path / "pwned"
    _plant(versions.checkpoint, marker)
    cfg = FinetuneConfig(epochs=1, batch=4, corrective_clicks=1)
    with caplog.at_level(logging.INFO, "label_studio_sam2.engine.finetune"):
        result = finetune(shapes_model, train, val, cfg, checkpoint=versions.checkpoint)
    assert not marker.exists()
    assert result.steps == 1 and result.after is not None  # the run started over and finished
    refused = [r.getMessage() for r in caplog.records if "refused, not loaded" in r.getMessage()]
    assert refused and str(versions.checkpoint) in refused[0], caplog.text
    # and no temporary file of the run is left beside it
    assert not [p.name for p in versions.dir.iterdir() if p.name.endswith(".tmp")]


def test_a_planted_decoder_version_never_runs_when_a_server_loads_it(tiny_model, tmp_path, caplog):
    versions = DecoderVersions(tmp_path, 7)
    marker = tmp_path / "pwned"
    _plant(versions.dir / "v0001" / "decoder.safetensors", marker)
    (versions.dir / "v0001" / "manifest.json").write_text(json.dumps({"base_model": tiny_model.model_id}))
    (versions.dir / "active.json").write_text(json.dumps({"version": "v0001", "history": ["v0001"]}))
    decoders = ProjectDecoders(tiny_model, tmp_path, refresh_s=0)
    with caplog.at_level(logging.WARNING, "label_studio_sam2.engine.finetuned_decoders"):
        loaded, version = decoders.get(7)
    assert not marker.exists()
    assert loaded is tiny_model and version is None  # the base model is served
    assert "cannot load fine-tuned v0001" in caplog.text


def test_hostile_regions_are_skipped_and_counted_and_the_rest_trains(app_factory, media_server, monkeypatch):
    """A 3-point polygon declaring 40000 x 40000 pixels is never drawn (its image is 60 x 40); a
    16-byte malformed brush RLE is one skipped region, not the end of the run."""
    import threading

    import numpy as np

    import label_studio_sam2.labelstudio.train as train
    from label_studio_sam2.labelstudio.rle import encode_mask
    from tests.conftest import noise_image
    from tests.test_preannotate import FakeLabelStudio
    from tests.test_rle import MALFORMED_16
    from tests.test_train import POLYGON_CONFIG

    drawn = []
    real_polygon, real_decode = train.polygon_mask, train.decode_mask
    monkeypatch.setattr(train, "polygon_mask", lambda p, h, w: drawn.append((h, w)) or real_polygon(p, h, w))
    monkeypatch.setattr(train, "decode_mask", lambda r, h, w: drawn.append((h, w)) or real_decode(r, h, w))

    def region(kind, value, w=60, h=40):
        return {"type": kind, "to_name": "image", "original_width": w, "original_height": h, "value": value}

    square = np.zeros((40, 60), bool)
    square[5:30, 10:40] = True
    good_brush = region(
        "brushlabels", {"format": "rle", "rle": encode_mask(square), "brushlabels": ["object"]}
    )
    good_polygon = region("polygonlabels", {"points": [[20, 20], [80, 20], [80, 90], [20, 90]]})
    huge_polygon = region("polygonlabels", {"points": [[1, 1], [99, 1], [50, 99]]}, w=40000, h=40000)
    bad_rle = region("brushlabels", {"format": "rle", "rle": MALFORMED_16, "brushlabels": ["object"]})
    url = media_server.add_image("a.png", noise_image(40, 60))
    tasks = [
        {
            "id": 1,
            "data": {"image": url},
            "annotations": [{"id": 1, "result": [good_brush, huge_polygon, bad_rle]}],
        },
        {"id": 2, "data": {"image": url}, "annotations": [{"id": 2, "result": [good_polygon]}]},
    ]
    segmenter = app_factory().extensions["sam2"].require()
    api = FakeLabelStudio(config=POLYGON_CONFIG, tasks=tasks)
    examples, n_tasks, skipped = train.collect_examples(api, 1, segmenter, threading.Event(), tty=False)

    assert n_tasks == 2 and len(examples) == 2  # the good regions of both tasks train
    assert set(drawn) == {(40, 60)}  # nothing was decoded at a size other than the image's
    assert skipped["a region's size differs from its image's"] == 1
    [rle_reason] = [why for why in skipped if "brushlabels region could not be read" in why]
    assert "ValueError" in rle_reason and skipped[rle_reason] == 1
    report = train.TrainReport(1, tasks=n_tasks, examples=len(examples), skipped=skipped)
    lines = "\n".join(report.lines())
    assert "skipped 1: a region's size differs from its image's" in lines and rle_reason in lines


# --- training processes: a cap, one run per project, children reaped (must-deliver 7) ------------

HOLD = """
import sys
from label_studio_sam2.service.trainlock import training_slot
with training_slot(sys.argv[1], int(sys.argv[2]), 1):
    print("held", flush=True)
    sys.stdin.read()
"""


def _gone(pid: int, deadline_s: float = 300.0) -> bool:
    """True once `pid` no longer exists (ended and reaped); False while it lives or is a zombie
    (<defunct>) up to the deadline. Waits on the event, never on a time guess."""
    import time

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state not in ("Z", "X"):
            time.sleep(0.2)  # still running
            continue
        time.sleep(0.2)  # a zombie: reaped soon, or never
    return False


def test_another_process_training_a_project_blocks_the_webhook_and_the_cli(app_factory, tmp_path):
    """A real file lock held by another process (as a `train` CLI run holds it): the webhook
    answers "already training" for that project and 429 naming MAX_TRAININGS for any other; the
    CLI refuses both before loading anything."""
    import os
    import subprocess
    import sys

    from label_studio_sam2.service.trainlock import check_free

    root = tmp_path / "finetuned"
    env = {**os.environ, "PYTHONPATH": str(FIXTURE.parent.parent)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        app = app_factory(
            finetune_dir=str(root),
            label_studio_url="http://127.0.0.1:9",
            label_studio_api_key="k",
            max_trainings=1,
        )
        client = app.test_client()
        same = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 5}})
        assert same.status_code == 200 and same.get_json()["status"] == "already training"
        assert f"pid {holder.pid}" in same.get_json()["detail"]
        other = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 6}})
        assert other.status_code == 429 and "MAX_TRAININGS=1" in other.get_json()["error"]
        trainer = app.extensions["sam2"]._trainer
        assert trainer is not None and not trainer._running  # nothing was started
        for project, expected in ((5, "project 5 is already training"), (6, "MAX_TRAININGS=1")):
            cli = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "label_studio_sam2",
                    "train",
                    "--project",
                    str(project),
                    "--dir",
                    str(root),
                ],
                env={**env, "LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "k"},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert cli.returncode != 0 and expected in cli.stderr, cli.stderr
    finally:
        holder.stdin.close()
        holder.wait(60)
    check_free(root, 6, 1)  # the holder's end released its locks (nothing stays held)
    check_free(root, 5, 1)


def test_webhook_trainings_are_capped_and_their_children_reaped(app_factory, media_server, tmp_path):
    """MAX_TRAININGS=1: a second START_TRAINING while the first run lives is a 429 naming the
    setting; the run's process, once ended, is reaped (never <defunct>); its log is 0600."""
    root = tmp_path / "finetuned"
    # Label Studio here is a server that answers 404 to the API: the run fails once it asks
    app = app_factory(
        finetune_dir=str(root), label_studio_url=media_server.url, label_studio_api_key="k", max_trainings=1
    )
    client = app.test_client()
    first = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert first.status_code == 200 and first.get_json()["status"] == "training", first.get_json()
    trainer = app.extensions["sam2"]._trainer
    proc = trainer._running[1]
    # the run is a Python process that imports torch and loads a model before its first request:
    # it is still running when the next webhook arrives
    second = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 2}})
    assert second.status_code == 429 and "MAX_TRAININGS=1" in second.get_json()["error"]
    assert _gone(proc.pid), f"train process {proc.pid} left <defunct>"
    log = root / "project-1" / "train.log"
    assert log.stat().st_mode & 0o777 == 0o600
    assert "train:" in log.read_text()  # it said why it stopped
    third = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 2}})
    assert third.status_code == 200 and third.get_json()["status"] == "training"
    assert _gone(trainer._running[2].pid)


def test_the_prefetch_warm_process_is_reaped_when_it_ends(media_server, tmp_path, monkeypatch):
    from label_studio_sam2.service.prefetch import Prefetcher
    from label_studio_sam2.service.settings import Settings

    settings = Settings.from_env(
        prefetch_tasks=2,
        store_dir=str(tmp_path / "store"),
        label_studio_url=media_server.url,  # 404 to the API: the warm run ends at once
        label_studio_api_key="k",
    )
    prefetcher = Prefetcher(settings, str(FIXTURE))
    assert prefetcher.after_click(1, 10)
    assert _gone(prefetcher._proc.pid), "warm process left <defunct>"


def test_two_runs_saving_checkpoints_of_one_project_never_share_a_temporary_file(tmp_path):
    import threading

    from label_studio_sam2.engine.finetune import Scores, _save_checkpoint

    model = torch.nn.Module()
    model.mask_decoder = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / "project-1" / "checkpoint.pt"
    errors = []

    def run():
        try:
            for step in range(30):
                _save_checkpoint(path, model, opt, step, Scores(0.5, 0.5, 1), 1.0, "f")
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.load(path, weights_only=True)["fingerprint"] == "f"
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]


# --- files that hold secrets (must-deliver 9) -------------------------------------------------------


def test_the_url_index_holding_presigned_tokens_is_readable_by_its_owner_only(tmp_path):
    from label_studio_sam2.service.warm import INDEX, UrlIndex

    store = tmp_path / "store"
    store.mkdir()
    index = UrlIndex(store)
    index.add("https://bucket.example.com/a.jpg?X-Amz-Signature=secret", "k1")
    assert (store / INDEX).stat().st_mode & 0o777 == 0o600
    (store / INDEX).chmod(0o644)  # a file an older version wrote
    again = UrlIndex(store)
    assert (store / INDEX).stat().st_mode & 0o777 == 0o600
    assert again.keys == {"https://bucket.example.com/a.jpg?X-Amz-Signature=secret": "k1"}
