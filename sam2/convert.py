"""Meta SAM2 checkpoints (`sam2.1_hiera_tiny.pt`, ...) -> Hugging Face directories.

Meta's `.pt` files hold `{"model": state_dict}` in the parameter names of
facebookresearch/sam2 (`image_encoder.trunk.blocks.0.attn.qkv.weight`,
`sam_mask_decoder.transformer.layers.0.mlp.layers.1.bias`, ...). `transformers`' `Sam2VideoModel`
names the same tensors differently. The renaming rules follow transformers'
`convert_sam2_video_to_hf.py` (not shipped in the wheel); the only change of values is the prompt
encoder's four point embeddings, stacked into one `(4, C)` table.

The config (size and release) is read from the weights themselves: the Hiera width and depth give
the size, the presence of `no_obj_embed_spatial` gives SAM2.1. A name like `sam2.1_hiera_large.pt`
or an explicit `config=` only has to agree with them.

Usage: `convert_checkpoint("sam2.1_hiera_tiny.pt", "sam2.1-tiny-hf")`, or
`python -m backend convert sam2.1_hiera_tiny.pt sam2.1-tiny-hf`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from sam2.models import SIZES, ModelUnavailable

log = logging.getLogger(__name__)


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


# --- key mapping -------------------------------------------------------------------------------

# Substring renames, applied in this order to every Meta key (order matters: `obj_ptr_tpos_proj`
# before `obj_ptr`, `image_encoder.neck` before `image_encoder`, `out_proj` before the memory
# encoder's projection rule below).
_RENAMES: tuple[tuple[str, str], ...] = (
    ("iou_prediction_head.layers.0", "iou_prediction_head.proj_in"),
    ("iou_prediction_head.layers.1", "iou_prediction_head.layers.0"),
    ("iou_prediction_head.layers.2", "iou_prediction_head.proj_out"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("dwconv", "depthwise_conv"),
    ("pwconv", "pointwise_conv"),
    ("fuser", "memory_fuser"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("obj_ptr_tpos_proj", "temporal_positional_encoding_projection_layer"),
    ("no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),
    ("sam_prompt_encoder", "prompt_encoder"),
    ("sam_mask_decoder", "mask_decoder"),
    ("maskmem_tpos_enc", "memory_temporal_positional_encoding"),
    ("gamma", "scale"),
    ("image_encoder.neck", "vision_encoder.neck"),
    ("image_encoder", "vision_encoder.backbone"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("pix_feat_proj", "feature_projection"),
    ("patch_embed.proj", "patch_embed.projection"),
    ("no_mem_embed", "no_memory_embedding"),
    ("no_mem_pos_enc", "no_memory_positional_encoding"),
    ("obj_ptr", "object_pointer"),
    (".norm", ".layer_norm"),
    ("trunk.", ""),
    ("out_proj", "o_proj"),
)

# Meta's MLP keeps its linear layers in `layers.{i}`; transformers names the first `proj_in`,
# the last `proj_out` and the middle ones `layers.{i-1}`.
_MLPS = (
    re.compile(r"^vision_encoder\.backbone\.blocks\.\d+\.mlp\.layers\.(\d+)\."),
    re.compile(r"^mask_decoder\.transformer\.layers\.\d+\.mlp\.layers\.(\d+)\."),
    re.compile(r"^mask_decoder\.pred_obj_score_head\.layers\.(\d+)\."),
    re.compile(r"^mask_decoder\.output_hypernetworks_mlps\.\d+\.layers\.(\d+)\."),
    re.compile(r"^object_pointer_proj\.layers\.(\d+)\."),
)
_DOWNSAMPLER = re.compile(r"^memory_encoder\.mask_downsampler\.encoder\.(\d+)\.")


def _mlp_depths(keys: list[str]) -> dict[tuple[int, str], int]:
    """Number of linear layers of every MLP instance, keyed by (pattern index, key prefix)."""
    depth: dict[tuple[int, str], int] = {}
    for key in keys:
        for i, pattern in enumerate(_MLPS):
            m = pattern.match(key)
            if m:
                prefix = key[: m.start(1)]
                depth[(i, prefix)] = max(depth.get((i, prefix), 0), int(m.group(1)) + 1)
    return depth


def meta_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Meta SAM2 state dict to `Sam2VideoModel`'s parameter names.

    Returns a new dict; tensors are shared, except the prompt encoder's point embeddings, which are
    concatenated into `prompt_encoder.point_embed.weight` (4, C).
    """
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for old, new in _RENAMES:
            if old in key:
                key = key.replace(old, new)
        key = re.sub(r"^(vision_encoder\.neck\.convs\.\d+)\.conv\.", r"\1.", key)
        key = re.sub(r"^memory_encoder\.o_proj\.", "memory_encoder.projection.", key)
        renamed[key] = value

    depths = _mlp_depths(list(renamed))
    downsampler_last = max((int(m.group(1)) for k in renamed if (m := _DOWNSAMPLER.match(k))), default=-1)
    out: dict[str, torch.Tensor] = {}
    for key, value in renamed.items():
        for i, pattern in enumerate(_MLPS):
            m = pattern.match(key)
            if m:
                prefix, n = key[: m.start(1)], int(m.group(1))
                last = depths[(i, prefix)] - 1
                name = "proj_in" if n == 0 else "proj_out" if n == last else f"layers.{n - 1}"
                key = prefix[: -len("layers.")] + name + key[m.end(1) :]
                break
        m = _DOWNSAMPLER.match(key)
        if m:
            # Sequential of (conv, LayerNorm2d, GELU) per layer, then a final 1x1 conv
            n = int(m.group(1))
            if n == downsampler_last:
                name = "final_conv"
            elif n % 3 == 0:
                name = f"layers.{n // 3}.conv"
            elif n % 3 == 1:
                name = f"layers.{n // 3}.layer_norm"
            else:
                raise ConversionError(f"unexpected parameter {key} in the memory encoder's downsampler")
            key = f"memory_encoder.mask_downsampler.{name}." + key[m.end() :]
        out[key] = value

    point_keys = sorted(
        (k for k in out if re.fullmatch(r"prompt_encoder\.point_embed\.\d+\.weight", k)),
        key=lambda k: int(k.split(".")[2]),
    )
    if point_keys:
        out["prompt_encoder.point_embed.weight"] = torch.cat([out.pop(k) for k in point_keys], dim=0)
    if "prompt_encoder.shared_embedding.positional_embedding" in out:
        # the image-wide positional embedding is the prompt encoder's, shared
        out["shared_image_embedding.positional_embedding"] = out[
            "prompt_encoder.shared_embedding.positional_embedding"
        ]
    return out


# --- conversion --------------------------------------------------------------------------------


def load_meta_state_dict(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a Meta `.pt` file (`{"model": ...}` or a bare state dict).

    Read with `weights_only=True`: a checkpoint is data, never code to run.
    """
    try:
        ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor payloads
        raise ConversionError(
            f"cannot read {checkpoint} as a PyTorch checkpoint: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(str(k).startswith("image_encoder.") for k in state):
        raise ConversionError(
            f"{checkpoint} is not a Meta SAM2 checkpoint (no image_encoder.* weights under 'model')"
        )
    return state


def _pick_config(checkpoint: Path, state: Mapping[str, torch.Tensor], config):
    release, size = guess_from_weights(state)
    if config is not None and not isinstance(config, str):
        return config  # a ready Sam2VideoConfig (custom or test models)
    if isinstance(config, str):
        rel_given, size_given = guess_from_name(config) if "hiera" in config else (None, config)
        size_given = {"b+": "base-plus", "base_plus": "base-plus", "baseplus": "base-plus"}.get(
            size_given, size_given
        )
        if size is not None and size_given != size:
            raise ConversionError(
                f"--config {config} does not match the weights of {checkpoint.name}, which are SAM2 {size}"
            )
        if rel_given and rel_given != release:
            raise ConversionError(f"--config {config} says {rel_given}, the weights are {release}")
        size = size_given
    name_release, name_size = guess_from_name(checkpoint.name)
    if size is None:
        if name_size is None:
            raise ConversionError(
                f"cannot tell the size of {checkpoint.name}: its backbone matches no released SAM2 and "
                f"its name says nothing; pass the config ({', '.join(SIZES)})"
            )
        size = name_size
    if name_size and name_size != size:
        log.warning(
            "%s is named %s but its weights are SAM2 %s: using %s", checkpoint.name, name_size, size, size
        )
    if name_release and name_release != release:
        log.warning("%s is named %s but its weights are %s", checkpoint.name, name_release, release)
    return released_config(size, release)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One converter at a time per output (gunicorn workers starting together); POSIX only,
    elsewhere the atomic rename alone keeps the output whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, config=None) -> Path:
    """Convert a Meta SAM2 `.pt` checkpoint into a Hugging Face directory (config.json +
    model.safetensors) that `sam2.models.load_image_model` / `load_video_model` read.

    Arguments:
        checkpoint: path to Meta's `.pt` file.
        out_dir: the directory to write; written to a temporary sibling first and renamed, so a
            reader never sees half a model. If it already holds a config.json it is kept.
        config: None (read from the weights, checked against the file name), a size
            (`tiny`, `small`, `base-plus`, `large`, or a Meta name such as `sam2.1_hiera_large`),
            or a `Sam2VideoConfig` for a custom model.
    Returns:
        `out_dir` as a Path.
    Raises:
        ConversionError (a `ModelUnavailable`) with a message saying what is wrong.
    """
    from transformers import Sam2VideoModel

    checkpoint, out = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file():
        raise ConversionError(f"checkpoint {checkpoint} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out.parent / f".{out.name}.lock"):
        if (out / "config.json").is_file():
            return out  # another process converted it while we waited
        state = load_meta_state_dict(checkpoint)
        cfg = _pick_config(checkpoint, state, config)
        model = Sam2VideoModel(cfg).eval()
        hf_state = meta_to_hf(state)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(hf_state))
        unexpected = sorted(set(hf_state) - set(expected))
        wrong_shape = [
            k for k in expected if k in hf_state and tuple(hf_state[k].shape) != tuple(expected[k].shape)
        ]
        if missing or unexpected or wrong_shape:
            raise ConversionError(
                f"{checkpoint.name} does not fit the SAM2 config: "
                + "; ".join(
                    f"{what} {len(keys)} (e.g. {', '.join(keys[:3])})"
                    for what, keys in (
                        ("missing", missing),
                        ("unexpected", unexpected),
                        ("wrong shape", wrong_shape),
                    )
                    if keys
                )
            )
        model.load_state_dict(hf_state, strict=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            model.save_pretrained(tmp)
            if out.exists():
                shutil.rmtree(out)  # a leftover without config.json: not a model
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("converted %s (%d tensors) -> %s", checkpoint, len(state), out)
    return out
