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
`label-studio-sam2 convert sam2.1_hiera_tiny.pt sam2.1-tiny-hf`.
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

from label_studio_sam2.engine.releases import (
    SIZES,
    ConversionError,
    guess_from_name,
    guess_from_weights,
    released_config,
)

log = logging.getLogger(__name__)


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
    model.safetensors) that `label_studio_sam2.engine.models.load_image_model` / `load_video_model` read.

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
