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
from sam2.decoders import DecoderVersions, ProjectDecoders
from sam2.finetune import FinetuneConfig, finetune
from sam2.image import ImagePredictor

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
    from sam2.models import load_image_model

    return load_image_model(str(FIXTURE), "cpu")


def test_a_planted_checkpoint_never_runs_when_training_starts(shapes_model, tmp_path, caplog):
    predictor = ImagePredictor(shapes_model)
    train, val = ring_examples(predictor, range(4), "train"), ring_examples(predictor, range(2), "val")
    versions = DecoderVersions(tmp_path, 3)
    marker = tmp_path / "pwned"
    _plant(versions.checkpoint, marker)
    cfg = FinetuneConfig(epochs=1, batch=4, corrective_clicks=1)
    with caplog.at_level(logging.INFO, "sam2.finetune"):
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
    with caplog.at_level(logging.WARNING, "sam2.decoders"):
        loaded, version = decoders.get(7)
    assert not marker.exists()
    assert loaded is tiny_model and version is None  # the base model is served
    assert "cannot load fine-tuned v0001" in caplog.text


def test_hostile_regions_are_skipped_and_counted_and_the_rest_trains(app_factory, media_server, monkeypatch):
    """A 3-point polygon declaring 40000 x 40000 pixels is never drawn (its image is 60 x 40); a
    16-byte malformed brush RLE is one skipped region, not the end of the run."""
    import threading

    import numpy as np

    import backend.train as train
    from backend.rle import encode_mask
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
