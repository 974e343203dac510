"""What Meta released: model sizes and releases, their architectures, and how to tell them apart.

Both the loader (`label_studio_sam2.engine.models`) and the checkpoint converter (`label_studio_sam2.engine.convert`) need these facts,
so they live here and import nothing else of this package: no import circle between the two.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

SIZES = ("tiny", "small", "base-plus", "large")
RELEASES = ("sam2", "sam2.1")
DEFAULT_MODEL = "facebook/sam2.1-hiera-tiny"


class ModelUnavailable(RuntimeError):
    """The requested weights cannot be loaded; the message says how to provide them."""


def hub_id(release: str, size: str) -> str:
    """`("sam2.1", "tiny") -> "facebook/sam2.1-hiera-tiny"`."""
    if release not in RELEASES or size not in SIZES:
        raise ValueError(f"unknown SAM2 model {release}-{size}: releases {RELEASES}, sizes {SIZES}")
    return f"facebook/{release}-hiera-{size}"


class ConversionError(ModelUnavailable):
    """The checkpoint is not a SAM2 checkpoint this converter understands; the message says why."""


# Hiera backbone of each released size (facebookresearch/sam2 configs/sam2.1/*.yaml).
# width: embed_dim of the first stage; depth: total blocks. `tiny` and `small` share a width.
_BACKBONES = {
    "tiny": dict(blocks_per_stage=[1, 2, 7, 2], global_attention_blocks=[5, 7, 9]),
    "small": dict(blocks_per_stage=[1, 2, 11, 2], global_attention_blocks=[7, 10, 13]),
    "base-plus": dict(
        hidden_size=112,
        embed_dim_per_stage=[112, 224, 448, 896],
        num_attention_heads_per_stage=[2, 4, 8, 16],
        blocks_per_stage=[2, 3, 16, 3],
        global_attention_blocks=[12, 16, 20],
        window_positional_embedding_background_size=[14, 14],
    ),
    "large": dict(
        hidden_size=144,
        embed_dim_per_stage=[144, 288, 576, 1152],
        num_attention_heads_per_stage=[2, 4, 8, 16],
        blocks_per_stage=[2, 6, 36, 4],
        global_attention_blocks=[23, 33, 43],
        window_positional_embedding_background_size=[7, 7],
        window_size_per_stage=[8, 4, 16, 8],
    ),
}
_WIDTH_DEPTH = {(96, 12): "tiny", (96, 16): "small", (112, 24): "base-plus", (144, 48): "large"}


def released_config(size: str, release: str = "sam2.1"):
    """The `Sam2VideoConfig` of a released model: `released_config("base-plus", "sam2")`."""
    from transformers import Sam2HieraDetConfig, Sam2VideoConfig, Sam2VisionConfig

    if size not in _BACKBONES:
        raise ConversionError(f"unknown SAM2 size {size!r}: one of {', '.join(SIZES)}")
    if release not in ("sam2", "sam2.1"):
        raise ConversionError(f"unknown SAM2 release {release!r}: sam2 or sam2.1")
    backbone = Sam2HieraDetConfig(**_BACKBONES[size])
    channels = list(reversed(backbone.embed_dim_per_stage))
    is_21 = release == "sam2.1"
    return Sam2VideoConfig(
        vision_config=Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=channels),
        # SAM2.1 added a projection of the object pointers' temporal encoding and a learned
        # embedding for occluded frames; SAM2.0 checkpoints hold neither.
        enable_temporal_pos_encoding_for_object_pointers=is_21,
        enable_occlusion_spatial_embedding=is_21,
    )


_NAME = re.compile(r"(?P<rel>sam2(?:\.1)?)[-_]hiera[-_](?P<size>tiny|small|base[-_]plus|b\+|large)")


def guess_from_name(name: str) -> tuple[str | None, str | None]:
    """`"sam2.1_hiera_base_plus.pt" -> ("sam2.1", "base-plus")`; (None, None) if not a Meta name."""
    m = _NAME.search(Path(name).name.lower())
    if not m:
        return None, None
    size = m.group("size").replace("_", "-")
    return m.group("rel"), {"b+": "base-plus"}.get(size, size)


def guess_from_weights(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, str | None]:
    """(release, size) read from Meta-layout weights; size is None for a width/depth no
    release has (a custom model: pass its config)."""
    release = "sam2.1" if "no_obj_embed_spatial" in state_dict else "sam2"
    patch = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    blocks = {m.group(1) for k in state_dict if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))}
    width = int(patch.shape[0]) if patch is not None else 0
    return release, _WIDTH_DEPTH.get((width, len(blocks)))
