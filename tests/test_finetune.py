"""Fine-tuning the decoder (label_studio_sam2/engine/finetune.py) and its versions on disk (label_studio_sam2/engine/finetuned_decoders.py), on the
shapes fixture and a domain it does badly on (rings with holes, tests/rings.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from devkit.rings import make_ring, ring_examples
from label_studio_sam2.engine.finetune import (
    Example,
    FinetuneConfig,
    decoder_state,
    deepest_point,
    evaluate,
    finetune,
    split,
    with_decoder,
)
from label_studio_sam2.engine.finetuned_decoders import DecoderVersions, ProjectDecoders, model_version
from label_studio_sam2.engine.image import ImagePredictor, Prompt

FIXTURE = Path(__file__).resolve().parent.parent / "devkit" / "sam2-shapes"
FAST = FinetuneConfig(epochs=4, batch=8, lr=1e-3)


@pytest.fixture(scope="module")
def shapes_model():
    from label_studio_sam2.engine.models import load_image_model

    return load_image_model(str(FIXTURE), "cpu")


@pytest.fixture(scope="module")
def rings(shapes_model):
    predictor = ImagePredictor(shapes_model)
    return ring_examples(predictor, range(16), "train"), ring_examples(predictor, range(10), "val")


@pytest.fixture(scope="module")
def trained(shapes_model, rings):
    base_state = {k: v.clone() for k, v in decoder_state(shapes_model.model).items()}
    result = finetune(shapes_model, *rings, FAST)
    return result, base_state


def test_finetune_on_rings_improves_held_out_click_and_box(trained):
    result, _ = trained
    assert result.before.click < 0.5  # the fixture fills the ring's hole
    assert result.after.click >= result.before.click + 0.15
    assert result.after.box > result.before.box
    assert result.improved(0.02)
    assert result.steps == FAST.epochs * 2


def test_finetune_never_changes_the_served_model(shapes_model, trained, rings):
    result, base_state = trained
    now = decoder_state(shapes_model.model)
    assert all(torch.equal(now[k], base_state[k]) for k in base_state)
    assert not all(torch.equal(result.state[k], base_state[k]) for k in base_state)
    assert evaluate(shapes_model, rings[1]).click == pytest.approx(result.before.click)


def test_no_learning_is_no_improvement(shapes_model, rings):
    cfg = FinetuneConfig(epochs=1, batch=8, lr=0.0)
    result = finetune(shapes_model, *rings, cfg)
    assert result.after.click == pytest.approx(result.before.click)
    assert not result.improved(0.02)


def test_ctrl_c_leaves_a_checkpoint_and_the_rerun_resumes_to_the_same_weights(shapes_model, rings, tmp_path):
    train, val = rings[0][:8], rings[1][:3]
    cfg = FinetuneConfig(epochs=3, batch=4, lr=1e-3, corrective_clicks=1)
    whole = finetune(shapes_model, train, val, cfg)

    stop = threading.Event()
    ckpt = tmp_path / "checkpoint.pt"
    first = finetune(
        shapes_model,
        train,
        val,
        cfg,
        checkpoint=ckpt,
        stop=stop,
        on_progress=lambda p: stop.set() if p.step == 3 else None,
    )
    assert first.stopped and first.after is None and ckpt.is_file()
    steps = []
    second = finetune(
        shapes_model, train, val, cfg, checkpoint=ckpt, on_progress=lambda p: steps.append(p.step)
    )
    assert steps[0] == 4 and second.steps == whole.steps == 6
    assert not ckpt.exists()
    for k, v in whole.state.items():
        torch.testing.assert_close(second.state[k], v, rtol=1e-4, atol=1e-5)


def test_split_is_by_group_and_stable():
    ex = [Example([], np.zeros((2, 2), bool), f"task-{i // 2}") for i in range(40)]
    train, val = split(ex, 0.25)
    assert {e.group for e in train}.isdisjoint({e.group for e in val})
    assert 2 <= len({e.group for e in val}) <= 9 and len(train) + len(val) == 40
    more = ex + [Example([], np.zeros((2, 2), bool), f"task-{i}") for i in range(20, 30)]
    assert {e.group for e in val} <= {e.group for e in split(more, 0.25)[1]}


def test_versions_activate_rollback_and_the_server_view(shapes_model, trained, tmp_path):
    result, _ = trained
    versions = DecoderVersions(tmp_path, 7)
    manifest = {"base_model": shapes_model.model_id, "examples": {"train": 16, "val": 10}}
    v1 = versions.save(result.state, manifest)
    assert versions.active() is None  # saved, not served
    decoders = ProjectDecoders(shapes_model, tmp_path, refresh_s=0)
    assert decoders.get(7) == (shapes_model, None)
    versions.activate(v1)
    loaded, version = decoders.get(7)
    assert version == v1 and model_version("sam2-x", 7, version) == "sam2-x-p7-v0001"
    # one encoder, the same embedding keys and lock; another decoder
    assert loaded.model.vision_encoder is shapes_model.model.vision_encoder
    assert loaded.model_id == shapes_model.model_id and loaded.lock is shapes_model.lock
    assert loaded.model.mask_decoder is not shapes_model.model.mask_decoder
    assert decoders.get(8) == (shapes_model, None)  # other projects keep the base model

    ring = make_ring(3, "test")
    click = Prompt(points_xy=deepest_point(ring.mask)[None], point_labels=np.ones(1, np.int64))
    base_pred = ImagePredictor(shapes_model).predict("r3", ring.image, [click])[0]
    tuned_pred = ImagePredictor(loaded).predict("r3", ring.image, [click])[0]
    inter = lambda m: (m & ring.mask).sum() / (m | ring.mask).sum()  # noqa: E731
    assert inter(tuned_pred.mask) > inter(base_pred.mask) + 0.15

    v2 = versions.save(result.state, {**manifest, "note": "second"})
    versions.activate(v2)
    assert decoders.get(7)[1] == v2
    assert versions.rollback() == v1 and decoders.get(7)[1] == v1
    assert versions.rollback() is None and decoders.get(7) == (shapes_model, None)
    assert versions.versions() == [v1, v2]  # earlier versions are kept
    assert versions.manifest(v2)["base_model"] == shapes_model.model_id


def test_a_decoder_of_another_base_model_is_not_served(shapes_model, trained, tmp_path):
    result, _ = trained
    versions = DecoderVersions(tmp_path, 3)
    versions.activate(versions.save(result.state, {"base_model": "some-other-model"}))
    assert ProjectDecoders(shapes_model, tmp_path, refresh_s=0).get(3) == (shapes_model, None)


def test_with_decoder_refuses_weights_of_another_shape(shapes_model):
    state = {k: v.clone() for k, v in decoder_state(shapes_model.model).items()}
    name = next(iter(state))
    state[name] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        with_decoder(shapes_model.model, state)
