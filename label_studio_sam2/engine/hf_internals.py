"""The private parts of `transformers`' SAM2 that this project uses, behind one door.

The public `Sam2VideoModel.forward` runs every object of a session on every frame and fails for
an object whose first prompt is still ahead; it also keeps every frame's outputs forever. The
streaming tracker (`label_studio_sam2.engine.tracker`) and the video fine-tuning in `tools/train_tiny.py` therefore
drive the model's per-object steps themselves and prune the session. Each private name they need
is wrapped here once, with why it is needed:

- `Sam2VideoModel._run_single_frame_inference`: one object on one frame (a box prompt makes a
  conditioning frame, otherwise the frame is tracked from memory); `frame_step`.
- `Sam2VideoModel._batch_encode_memories`: turns that frame's masks into memories the next
  frames attend to, batched over objects; `encode_memories`.
- `Sam2VideoInferenceSession.output_dict_per_obj`: the per-object outputs the memory bank reads;
  the tracker drops the ones it will not read again (flat memory in video length); `outputs_of`.
- `Sam2VideoInferenceSession.processed_frames`: the preprocessed frames, dropped after their
  step; `forget_frame`, `close`.
- `Sam2VideoInferenceSession.cache._vision_features`: the cached image features, counted in the
  tracker's state size; `held_tensors`. Its entry for a frame, `{"vision_feats": [...],
  "vision_pos_embeds": [...]}` (what `Sam2VideoModel._prepare_vision_features` caches: one
  (HW, 1, C) tensor per feature level, high to low resolution), is what the tracker keeps in the
  embedding store and puts back with `Sam2VideoInferenceCache.cache_vision_features`, so a
  frame seen before runs no encoder; `frame_features`, `put_frame_features`.
- `Sam2VisionModel.neck.position_encoding`: the sine positional encodings of each feature level,
  a function of the level's size alone; rebuilt for frames whose features come from the store
  instead of being stored with every frame (they are 5x the features' size); `position_encodings`.
- `Sam2VideoConfig.max_cond_frame_num`, changed for the duration of one step and restored: how
  many prompted frames memory attention reads; `prompt_frames_attended`.
- `transformers.models.sam2.modeling_sam2.Sam2Attention`: the decoder's attention layers, whose
  query/key projections `tools/train_tiny.py` initialises equal (`ATTENTION`).

A transformers upgrade that renames or reshapes any of these fails one named test,
tests/test_hf_internals.py (`problems()` lists what changed), not a tracking call deep inside.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import Sam2VideoConfig, Sam2VideoInferenceSession, Sam2VideoModel
from transformers.models.sam2.modeling_sam2 import Sam2Attention

ATTENTION = Sam2Attention

# name -> the parameters this module passes (a subset of the signature is enough)
_METHODS = {
    "_run_single_frame_inference": {
        "inference_session",
        "frame_idx",
        "obj_idx",
        "batch_size",
        "is_init_cond_frame",
        "point_inputs",
        "mask_inputs",
        "reverse",
        "streaming",
    },
    "_batch_encode_memories": {
        "inference_session",
        "frame_idx",
        "objects_needing_memory_encoding",
        "high_res_masks_for_memory",
        "object_score_logits_for_memory",
        "is_mask_from_pts_per_obj",
    },
}
_SESSION_ATTRIBUTES = ("output_dict_per_obj", "processed_frames")
_FEATURE_KEYS = ("vision_feats", "vision_pos_embeds")  # the session cache's entry for one frame


def frame_step(
    model,
    session,
    frame: int,
    obj_idx: int,
    box_points: torch.Tensor | None = None,
    reverse: bool = False,
) -> dict[str, Any]:
    """One object on one frame. `box_points`: (2, 2) box corners in model coordinates, which make
    this a conditioning (prompted) frame; None tracks the frame from memory. Returns the model's
    output dict (`pred_masks`, `high_res_masks`, `object_score_logits`, ...)."""
    point_inputs = None
    if box_points is not None:
        device = box_points.device
        point_inputs = {
            "point_coords": box_points.view(1, 1, 2, 2),
            "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32, device=device),
        }
    return model._run_single_frame_inference(
        inference_session=session,
        frame_idx=frame,
        obj_idx=obj_idx,
        batch_size=1,
        is_init_cond_frame=box_points is not None,
        point_inputs=point_inputs,
        mask_inputs=None,
        reverse=reverse,
        streaming=True,
    )


def encode_memories(model, session, frame: int, outs: dict[int, dict], conditioning: bool) -> None:
    """Store `outs` (obj_idx -> `frame_step` output) in the session and encode their memories."""
    for obj_idx, out in outs.items():
        session.store_output(obj_idx, frame, output_value=out, is_conditioning_frame=conditioning)
    model._batch_encode_memories(
        inference_session=session,
        frame_idx=frame,
        objects_needing_memory_encoding=list(outs),
        high_res_masks_for_memory=[out["high_res_masks"] for out in outs.values()],
        object_score_logits_for_memory=[out["object_score_logits"] for out in outs.values()],
        is_mask_from_pts_per_obj=[conditioning] * len(outs),
    )


def outputs_of(session) -> dict[int, dict[str, dict[int, dict]]]:
    """obj_idx -> {"cond_frame_outputs" | "non_cond_frame_outputs": {frame: output}}."""
    return session.output_dict_per_obj


def forget_frame(session, frame: int) -> None:
    """Drop a frame's preprocessed pixels once its step is done (None until a frame is added:
    a session given only stored features has none)."""
    if session.processed_frames is not None:
        session.processed_frames.pop(frame, None)


def held_tensors(session) -> list:
    """What the session holds: outputs, preprocessed frames, cached image features."""
    return [session.output_dict_per_obj, session.processed_frames, session.cache._vision_features]


def frame_features(session, frame: int) -> list[torch.Tensor] | None:
    """The image features the session computed (or was given) for `frame`, one (HW, 1, C)
    tensor per level, high to low resolution; None once the session's cache has dropped them."""
    cached = session.cache._vision_features.get(frame)
    return None if cached is None else list(cached["vision_feats"])


def put_frame_features(session, frame: int, features: list[torch.Tensor], pos: list[torch.Tensor]) -> None:
    """Give the session `frame`'s image features (`frame_features` of an earlier session) and
    the levels' positional encodings (`position_encodings`): its next step on that frame runs
    no encoder. The session's cache holds one frame: this replaces the one before."""
    session.cache.cache_vision_features(frame, dict(zip(_FEATURE_KEYS, (features, pos), strict=True)))


def position_encodings(model, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """The positional encodings the vision encoder returns beside a frame's features, one per
    level in `frame_features`' order and layout (they depend only on the levels' sizes)."""
    vision = model.config.vision_config
    encode = model.vision_encoder.neck.position_encoding
    channels = int(vision.fpn_hidden_size)
    out = []
    for h, w in vision.backbone_feature_sizes:
        pos = encode((1, channels, int(h), int(w)), device, dtype).to(dtype)
        out.append(pos.flatten(2).permute(2, 0, 1))
    return out


def close(session) -> None:
    session.reset_inference_session()
    session.processed_frames = None


@contextmanager
def prompt_frames_attended(model, cap: int) -> Iterator[None]:
    """Within the block, memory attention reads at most `cap` prompted frames (0: no change)."""
    saved = model.config.max_cond_frame_num
    if cap > 0 and (saved < 0 or saved > cap):
        model.config.max_cond_frame_num = cap
    try:
        yield
    finally:
        model.config.max_cond_frame_num = saved


def problems() -> list[str]:
    """What this module relies on and the installed transformers lacks (empty when all is well)."""
    found = []
    for name, wanted in _METHODS.items():
        method = getattr(Sam2VideoModel, name, None)
        if method is None:
            found.append(f"Sam2VideoModel.{name} is gone")
            continue
        missing = wanted - set(inspect.signature(method).parameters)
        if missing:
            found.append(f"Sam2VideoModel.{name} lost parameter(s) {', '.join(sorted(missing))}")
    session = Sam2VideoInferenceSession(video_height=8, video_width=8, dtype=torch.float32)
    session.add_new_frame(torch.zeros(3, 8, 8), 0)  # processed_frames exists from the first frame
    for name in _SESSION_ATTRIBUTES:
        if not isinstance(getattr(session, name, None), dict):
            found.append(f"Sam2VideoInferenceSession.{name} is no longer a dict")
    if not isinstance(getattr(getattr(session, "cache", None), "_vision_features", None), dict):
        found.append("Sam2VideoInferenceSession.cache._vision_features is no longer a dict")
    cache = getattr(session, "cache", None)
    if not callable(getattr(cache, "cache_vision_features", None)):
        found.append("Sam2VideoInferenceCache.cache_vision_features is gone")
    prepare = getattr(Sam2VideoModel, "_prepare_vision_features", None)
    if prepare is None or not all(f'"{key}"' in inspect.getsource(prepare) for key in _FEATURE_KEYS):
        found.append(
            f"Sam2VideoModel._prepare_vision_features no longer caches {' and '.join(_FEATURE_KEYS)}"
        )
    if not isinstance(getattr(Sam2VideoConfig(), "max_cond_frame_num", None), int):
        found.append("Sam2VideoConfig.max_cond_frame_num is gone")
    return found
