"""Canary: the private transformers names the video tracker and tools/train_tiny.py rely on
(label_studio_sam2/engine/hf_internals.py) still exist with the parameters passed to them. After a transformers
upgrade this is the one test that names what changed."""

from __future__ import annotations

import torch
from transformers import Sam2VideoInferenceSession

from label_studio_sam2.engine import hf_internals
from label_studio_sam2.engine.models import random_model, tiny_config


def test_transformers_private_api_is_still_there():
    problems = hf_internals.problems()
    assert not problems, (
        "transformers changed what label_studio_sam2/engine/hf_internals.py relies on (update that module): "
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


def test_rebuilt_position_encodings_are_the_encoders():
    # A frame whose image features come from the embedding store gets these instead of the
    # ones the encoder returns beside the features: they must be the same, values and layout.
    model = random_model(tiny_config(64), kind="video").model
    session = Sam2VideoInferenceSession(video_height=64, video_width=64, dtype=torch.float32)
    session.add_new_frame(torch.rand(3, 64, 64), 0)
    box = torch.tensor([[4.0, 4.0], [40.0, 40.0]])
    with torch.inference_mode():
        hf_internals.frame_step(model, session, 0, session.obj_id_to_idx(1), box)
    features = hf_internals.frame_features(session, 0)
    encoders = session.cache.get_vision_features(0)["vision_pos_embeds"]
    rebuilt = hf_internals.position_encodings(model, torch.device("cpu"), features[-1].dtype)
    assert len(rebuilt) == len(encoders) == len(features) == 3
    for mine, theirs in zip(rebuilt, encoders, strict=True):
        assert torch.equal(mine, theirs) and mine.stride() == theirs.stride()
