"""Canary: the private transformers names the video tracker and tools/train_tiny.py rely on
(sam2/hf_internals.py) still exist with the parameters passed to them. After a transformers
upgrade this is the one test that names what changed."""

from __future__ import annotations

import torch

from sam2 import hf_internals
from sam2.models import random_model, tiny_config


def test_transformers_private_api_is_still_there():
    problems = hf_internals.problems()
    assert not problems, (
        "transformers changed what sam2/hf_internals.py relies on (update that module): "
        + "; ".join(problems)
    )


def test_decoder_attention_layers_have_query_and_key_projections():
    model = random_model(tiny_config(64), kind="image").model
    layers = [m for m in model.mask_decoder.modules() if isinstance(m, hf_internals.ATTENTION)]
    assert layers, "the mask decoder has no hf_internals.ATTENTION layers (tools/train_tiny.py's init)"
    assert all(
        isinstance(m.q_proj, torch.nn.Linear) and isinstance(m.k_proj, torch.nn.Linear) for m in layers
    )


def test_prompt_frames_attended_is_restored():
    model = random_model(tiny_config(64), kind="video").model
    before = model.config.max_cond_frame_num
    with hf_internals.prompt_frames_attended(model, 3):
        assert model.config.max_cond_frame_num == 3
    assert model.config.max_cond_frame_num == before
