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
