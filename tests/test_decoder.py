"""The decoder with per-image precomputation (label_studio_sam2/engine/mask_decoder.py) equals transformers' Sam2Model.

A random model of the real hiera-tiny architecture at its real 1024 px input, encoded once for
the module (~2-10 s on 2 cores): the shapes and the numbers of heads/layers are the released ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from label_studio_sam2.engine.image import ImagePredictor, Prompt
from label_studio_sam2.engine.models import random_model, real_config
from tests.conftest import BOTH_PRECISIONS

H, W = 480, 640
# The decoder runs in fp32 either way; what it decodes comes from an fp32 or a bf16 encoder.
pytestmark = BOTH_PRECISIONS


@pytest.fixture(scope="module")
def real_size(cpu_precision):
    torch.manual_seed(0)
    loaded = random_model(real_config(), "image", cpu_precision)
    fast = ImagePredictor(loaded)
    reference = ImagePredictor(loaded, cache=fast.cache, fast_decoder=False)
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    emb = fast.embedding("img", rgb)
    return loaded, fast, reference, emb


def _prompt(points=(), labels=(), box=None, mask=None) -> Prompt:
    return Prompt(
        np.asarray(points, np.float32).reshape(-1, 2),
        np.asarray(labels, np.int64),
        None if box is None else np.asarray(box, np.float32),
        mask,
    )


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a > 0, b > 0
    return (a & b).sum((-1, -2)) / (a | b).sum((-1, -2)).clamp(min=1)


def _assert_same(fast, reference, emb, prompts):
    f_logits, f_iou, f_obj = fast.decode_logits(emb, prompts)
    r_logits, r_iou, r_obj = reference.decode_logits(emb, prompts)
    assert f_logits.shape == r_logits.shape
    fg = (r_logits > 0).float().mean().item()
    assert 0.0 < fg < 1.0, "the reference masks are blank or full: the comparison would say nothing"
    assert _iou(f_logits, r_logits).min().item() >= 0.999
    torch.testing.assert_close(f_logits, r_logits, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(f_iou, r_iou, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(f_obj, r_obj, atol=1e-4, rtol=1e-4)


PROMPT_KINDS = {
    "one click (3 candidates)": [_prompt([[300, 200]], [1])],
    "clicks, one negative": [_prompt([[300, 200], [500, 400], [100, 300]], [1, 0, 1])],
    "box": [_prompt(box=[100, 80, 500, 400])],
    "box and a negative click": [_prompt([[300, 200]], [0], box=[100, 80, 500, 400])],
    "three objects, unequal clicks": [
        _prompt([[300, 200]], [1]),
        _prompt([[30, 20], [60, 40]], [1, 1]),
        _prompt([[600, 450]], [1]),
    ],
    "grid batch (all threads)": [
        _prompt([[x, y]], [1]) for x in range(20, W, 160) for y in range(20, H, 120)
    ],
}


@pytest.mark.parametrize("kind", list(PROMPT_KINDS))
def test_fast_decoder_equals_transformers(real_size, kind):
    _, fast, reference, emb = real_size
    _assert_same(fast, reference, emb, PROMPT_KINDS[kind])


def test_mask_prompt_equals_transformers(real_size):
    _, fast, reference, emb = real_size
    previous = reference.predict("img", lambda: None, [_prompt([[300, 200]], [1])])[0]
    _assert_same(
        fast, reference, emb, [_prompt([[300, 200], [320, 240]], [1, 1], mask=previous.low_res_logits)]
    )


def test_candidates_under_the_iou_bar_skip_upscaling_and_nothing_else_changes(real_size):
    """Automatic masks drop candidates under their IoU bar: `min_iou` spares their upscaling."""
    from label_studio_sam2.engine.mask_decoder import DROPPED_LOGIT

    _, fast, _, emb = real_size
    prompts = PROMPT_KINDS["grid batch (all threads)"]
    logits, iou, obj = fast.decode_logits(emb, prompts)
    bar = float(iou.max(dim=1).values.median())  # half the objects above, half under
    s_logits, s_iou, s_obj = fast.decode_logits(emb, prompts, min_iou=bar)
    kept = (iou >= bar).any(dim=1)
    assert 0 < int(kept.sum()) < len(prompts)
    torch.testing.assert_close(s_iou, iou)
    torch.testing.assert_close(s_obj, obj)
    torch.testing.assert_close(s_logits[kept], logits[kept])
    assert bool((s_logits[~kept] == DROPPED_LOGIT).all())


def test_cached_click_runs_no_per_image_work_twice(real_size):
    _, fast, _, emb = real_size
    ctx = fast.decoder_context(emb)
    fast.predict("img", lambda: None, [_prompt([[100, 100]], [1])])
    assert fast.decoder_context(emb) is ctx  # computed once per image, reused by every click


def test_swapped_decoder_weights_are_used(real_size):
    """Fine-tuning swaps the decoder's weights in place: the next click must use them."""
    loaded, fast, reference, emb = real_size
    prompts = PROMPT_KINDS["box"]
    before = fast.decode_logits(emb, prompts)[0]
    k_proj = loaded.model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj
    saved = k_proj.weight.detach().clone()
    try:
        with torch.no_grad():
            k_proj.weight.mul_(-1.5)
        after = fast.decode_logits(emb, prompts)[0]
        assert not torch.allclose(before, after)
        _assert_same(fast, reference, emb, prompts)
    finally:
        with torch.no_grad():
            k_proj.weight.copy_(saved)


def test_decoder_contexts_are_bounded(tiny_model):
    pred = ImagePredictor(tiny_model)
    rng = np.random.default_rng(1)
    for i in range(pred.MAX_DECODER_CONTEXTS + 3):
        rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
        pred.predict(f"k{i}", rgb, [_prompt([[10, 10]], [1])])
    assert len(pred._contexts) == pred.MAX_DECODER_CONTEXTS


# --- bf16 encoder on CPU (CPU_PRECISION) ------------------------------------------------------


def _agreement(fp32: ImagePredictor, bf16: ImagePredictor, key, rgb, prompts) -> list[float]:
    ious = []
    for p in prompts:
        a = fp32.predict(key, rgb, [p])[0].mask
        b = bf16.predict(key, rgb, [p])[0].mask
        assert 0 < a.sum() < a.size
        ious.append(float((a & b).sum() / (a | b).sum()))
    return ious


@pytest.mark.slow  # a bf16 encode of 1024 px: seconds with native bf16, 2-4x more without it
@pytest.mark.cpu_precision("fp32")  # real_size's predictor is the fp32 reference
def test_bf16_encoder_masks_agree_with_fp32_on_a_real_size_model(real_size):
    """Forced bf16 (this CPU may lack native bf16, where `auto` would keep fp32): the masks agree."""
    import copy

    loaded, fast, _, _ = real_size
    bf16 = copy.copy(loaded)
    bf16.cpu_encoder_autocast = torch.bfloat16
    pred = ImagePredictor(bf16)
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    prompts = [p for kind in list(PROMPT_KINDS)[:4] for p in PROMPT_KINDS[kind]]
    ious = _agreement(fast, pred, "img", rgb, prompts)
    assert pred.encoder_calls == 1 and min(ious) >= 0.98, ious


@pytest.mark.cpu_precision("fp32")  # it loads both precisions itself
def test_bf16_encoder_masks_agree_with_fp32_on_the_trained_fixture():
    from devkit.scenes import box_of, interior_point, make_scene
    from label_studio_sam2.engine.models import load_image_model
    from tests.test_behaviour import FIXTURE

    fp32 = ImagePredictor(load_image_model(str(FIXTURE), "cpu", cpu_precision="fp32"))
    bf16 = ImagePredictor(load_image_model(str(FIXTURE), "cpu", cpu_precision="bf16"))
    assert bf16.loaded.precision.startswith("encoder bfloat16") and fp32.loaded.precision == "fp32"
    ious = []
    for seed in range(4):
        scene = make_scene(seed)
        prompts = []
        for m in scene.masks:
            if m.sum() > 50:
                prompts.append(_prompt([interior_point(m)], [1]))
                prompts.append(_prompt(box=box_of(m)))
        ious += _agreement(fp32, bf16, f"scene{seed}", scene.image, prompts)
    assert len(ious) >= 8 and min(ious) >= 0.98, ious
