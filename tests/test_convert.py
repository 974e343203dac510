"""Meta checkpoint -> HF directory: a model written in Meta's key layout converts back to itself.

The inverse mapping (HF -> Meta) is written here on its own, from the module names of
facebookresearch/sam2 (sam2_base.py, hieradet.py, memory_encoder.py, sam/*.py), so the test does
not just run the converter's rules backwards.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from label_studio_sam2.engine.convert import convert_checkpoint, meta_to_hf
from label_studio_sam2.engine.models import tiny_config
from label_studio_sam2.engine.releases import (
    ConversionError,
    guess_from_name,
    guess_from_weights,
    released_config,
)

# HF name -> Meta name, applied in order (regex, replacement).
_TO_META = [
    (r"^vision_encoder\.backbone\.", "image_encoder.trunk."),
    (r"^vision_encoder\.neck\.convs\.(\d+)\.", r"image_encoder.neck.convs.\1.conv."),
    (r"patch_embed\.projection", "patch_embed.proj"),
    (r"(trunk\.blocks\.\d+)\.layer_norm(\d)", r"\1.norm\2"),
    (r"(trunk\.blocks\.\d+\.mlp)\.proj_in", r"\1.layers.0"),
    (r"(trunk\.blocks\.\d+\.mlp)\.proj_out", r"\1.layers.1"),
    (r"^prompt_encoder\.", "sam_prompt_encoder."),
    (r"shared_embedding\.positional_embedding", "pe_layer.positional_encoding_gaussian_matrix"),
    (r"mask_embed\.conv1", "mask_downscaling.0"),
    (r"mask_embed\.layer_norm1", "mask_downscaling.1"),
    (r"mask_embed\.conv2", "mask_downscaling.3"),
    (r"mask_embed\.layer_norm2", "mask_downscaling.4"),
    (r"mask_embed\.conv3", "mask_downscaling.6"),
    (r"^mask_decoder\.", "sam_mask_decoder."),
    (r"(transformer\.layers\.\d+)\.layer_norm(\d)", r"\1.norm\2"),
    (r"(transformer\.layers\.\d+\.mlp)\.proj_in", r"\1.layers.0"),
    (r"(transformer\.layers\.\d+\.mlp)\.proj_out", r"\1.layers.1"),
    (r"transformer\.layer_norm_final_attn", "transformer.norm_final_attn"),
    (r"upscale_conv1", "output_upscaling.0"),
    (r"upscale_layer_norm", "output_upscaling.1"),
    (r"upscale_conv2", "output_upscaling.3"),
    # three-layer MLPs: proj_in, layers.0, proj_out -> layers.0, 1, 2
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)\.layers\.0", r"\1.layers.1"),
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)\.proj_in", r"\1.layers.0"),
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)\.proj_out", r"\1.layers.2"),
    (r"^object_pointer_proj\.layers\.0", "obj_ptr_proj.layers.1"),
    (r"^object_pointer_proj\.proj_in", "obj_ptr_proj.layers.0"),
    (r"^object_pointer_proj\.proj_out", "obj_ptr_proj.layers.2"),
    (r"\.o_proj\.", ".out_proj."),
    (r"^(memory_attention\.layers\.\d+)\.layer_norm(\d)", r"\1.norm\2"),
    (r"^memory_attention\.layer_norm\.", "memory_attention.norm."),
    (r"^memory_encoder\.feature_projection", "memory_encoder.pix_feat_proj"),
    (r"^memory_encoder\.projection", "memory_encoder.out_proj"),
    (r"memory_fuser\.layers\.(\d+)\.depthwise_conv", r"fuser.layers.\1.dwconv"),
    (r"memory_fuser\.layers\.(\d+)\.layer_norm", r"fuser.layers.\1.norm"),
    (r"memory_fuser\.layers\.(\d+)\.pointwise_conv", r"fuser.layers.\1.pwconv"),
    (r"memory_fuser\.layers\.(\d+)\.scale", r"fuser.layers.\1.gamma"),
    (r"^temporal_positional_encoding_projection_layer", "obj_ptr_tpos_proj"),
    (r"^no_memory_embedding$", "no_mem_embed"),
    (r"^no_memory_positional_encoding$", "no_mem_pos_enc"),
    (r"^memory_temporal_positional_encoding$", "maskmem_tpos_enc"),
    (r"^no_object_pointer$", "no_obj_ptr"),
    (r"^occlusion_spatial_embedding_parameter$", "no_obj_embed_spatial"),
]

# Names as they are in Meta's checkpoints (read off facebookresearch/sam2's modules).
META_NAMES = [
    "image_encoder.trunk.pos_embed",
    "image_encoder.trunk.pos_embed_window",
    "image_encoder.trunk.patch_embed.proj.weight",
    "image_encoder.trunk.blocks.0.norm1.weight",
    "image_encoder.trunk.blocks.0.attn.qkv.weight",
    "image_encoder.trunk.blocks.0.mlp.layers.1.bias",
    "image_encoder.trunk.blocks.1.proj.weight",
    "image_encoder.neck.convs.0.conv.weight",
    "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "sam_prompt_encoder.point_embeddings.3.weight",
    "sam_prompt_encoder.mask_downscaling.6.weight",
    "sam_prompt_encoder.not_a_point_embed.weight",
    "sam_mask_decoder.transformer.layers.0.mlp.layers.1.weight",
    "sam_mask_decoder.transformer.layers.0.cross_attn_token_to_image.out_proj.weight",
    "sam_mask_decoder.transformer.norm_final_attn.weight",
    "sam_mask_decoder.output_upscaling.3.weight",
    "sam_mask_decoder.output_hypernetworks_mlps.0.layers.2.weight",
    "sam_mask_decoder.iou_prediction_head.layers.1.weight",
    "sam_mask_decoder.pred_obj_score_head.layers.2.weight",
    "sam_mask_decoder.conv_s0.weight",
    "memory_attention.layers.0.cross_attn_image.out_proj.weight",
    "memory_attention.layers.0.norm3.weight",
    "memory_attention.norm.weight",
    "memory_encoder.mask_downsampler.encoder.0.weight",
    "memory_encoder.mask_downsampler.encoder.10.weight",
    "memory_encoder.mask_downsampler.encoder.12.weight",
    "memory_encoder.pix_feat_proj.weight",
    "memory_encoder.fuser.layers.0.dwconv.weight",
    "memory_encoder.fuser.layers.0.gamma",
    "memory_encoder.out_proj.weight",
    "mask_downsample.weight",
    "obj_ptr_proj.layers.2.weight",
    "obj_ptr_tpos_proj.weight",
    "maskmem_tpos_enc",
    "no_mem_embed",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "no_obj_embed_spatial",
]


def hf_to_meta(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    n_down = 1 + max(
        int(m.group(1))
        for k in state
        if (m := re.match(r"memory_encoder\.mask_downsampler\.layers\.(\d+)\.", k))
    )
    for key, value in state.items():
        if key == "shared_image_embedding.positional_embedding":
            continue  # Meta keeps one copy, in the prompt encoder
        if key == "prompt_encoder.point_embed.weight":
            for i in range(value.shape[0]):
                out[f"sam_prompt_encoder.point_embeddings.{i}.weight"] = value[i : i + 1].clone()
            continue
        m = re.match(r"memory_encoder\.mask_downsampler\.layers\.(\d+)\.(conv|layer_norm)\.(.*)", key)
        if m:
            index = 3 * int(m.group(1)) + (0 if m.group(2) == "conv" else 1)
            out[f"memory_encoder.mask_downsampler.encoder.{index}.{m.group(3)}"] = value.clone()
            continue
        if key.startswith("memory_encoder.mask_downsampler.final_conv."):
            out[f"memory_encoder.mask_downsampler.encoder.{3 * n_down}." + key.rsplit(".", 1)[1]] = (
                value.clone()
            )
            continue
        for pattern, repl in _TO_META:
            key = re.sub(pattern, repl, key)
        out[key] = value.clone()
    return out


def _tiny_video_model(seed=0):
    from transformers import Sam2VideoModel

    torch.manual_seed(seed)
    model = Sam2VideoModel(tiny_config(128)).eval()
    with torch.no_grad():  # no zero-initialised tensors: every one must land in its place
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        # Meta has one positional embedding; HF keeps a copy for the image side
        model.shared_image_embedding.positional_embedding.copy_(
            model.prompt_encoder.shared_embedding.positional_embedding
        )
    return model


def test_inverse_mapping_produces_metas_names():
    meta = hf_to_meta(_tiny_video_model().state_dict())
    missing = [n for n in META_NAMES if n not in meta]
    assert not missing, missing
    leftovers = [k for k in meta if re.search(r"proj_in|proj_out|layer_norm|vision_encoder|o_proj\.", k)]
    assert not leftovers, leftovers


def test_meta_checkpoint_round_trips_to_identical_outputs(tmp_path):
    from transformers import Sam2VideoModel

    from label_studio_sam2.engine.image import EmbeddingCache, ImagePredictor, Prompt
    from label_studio_sam2.engine.models import load_image_model

    model = _tiny_video_model()
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": hf_to_meta(model.state_dict())}, ckpt)
    out = convert_checkpoint(ckpt, tmp_path / "tiny-hf", config=tiny_config(128))
    assert (out / "config.json").is_file()

    back = Sam2VideoModel.from_pretrained(out, local_files_only=True).eval()
    original, converted = model.state_dict(), back.state_dict()
    assert original.keys() == converted.keys()
    for k in original:
        assert torch.equal(original[k], converted[k]), k

    # the image model the backend serves gives bit-identical masks and scores
    rgb = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    prompts = [
        Prompt(points_xy=np.array([[40.0, 30.0]], np.float32), point_labels=np.array([1])),
        Prompt(box_xyxy=np.array([10.0, 10.0, 80.0, 70.0])),
    ]
    model.save_pretrained(tmp_path / "reference")
    ref = ImagePredictor(load_image_model(str(tmp_path / "reference"), "cpu"), EmbeddingCache())
    conv = ImagePredictor(load_image_model(str(out), "cpu"), EmbeddingCache())
    for a, b in zip(ref.predict("img", rgb, prompts), conv.predict("img", rgb, prompts), strict=True):
        assert np.array_equal(a.mask, b.mask)
        assert a.score == b.score and a.object_score == b.object_score
        assert torch.equal(a.low_res_logits, b.low_res_logits)


def test_converting_twice_keeps_the_first_output(tmp_path):
    model = _tiny_video_model()
    ckpt = tmp_path / "tiny.pt"
    torch.save(hf_to_meta(model.state_dict()), ckpt)  # a bare state dict is accepted too
    out = convert_checkpoint(ckpt, tmp_path / "out", config=tiny_config(128))
    stamp = (out / "config.json").stat().st_mtime_ns
    convert_checkpoint(ckpt, tmp_path / "out", config=tiny_config(128))
    assert (out / "config.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]  # no temp dirs left


def test_released_size_and_release_are_read_from_the_weights():
    from transformers import Sam2VideoModel

    # the real hiera-tiny architecture, both releases (random weights: only names and shapes count)
    for release in ("sam2", "sam2.1"):
        cfg = released_config("tiny", release)
        state = hf_to_meta(Sam2VideoModel(cfg).state_dict())
        assert guess_from_weights(state) == (release, "tiny")
        assert ("no_obj_embed_spatial" in state) == (release == "sam2.1")
        renamed = meta_to_hf(state)
        assert set(renamed) == set(Sam2VideoModel(cfg).state_dict())


def test_released_configs_have_the_published_backbones():
    widths = {
        s: released_config(s).vision_config.backbone_config.hidden_size
        for s in ("tiny", "base-plus", "large")
    }
    assert widths == {"tiny": 96, "base-plus": 112, "large": 144}
    depths = {
        s: sum(released_config(s).vision_config.backbone_config.blocks_per_stage)
        for s in ("tiny", "small", "base-plus", "large")
    }
    assert depths == {"tiny": 12, "small": 16, "base-plus": 24, "large": 48}
    assert released_config("large").vision_config.backbone_channel_list == [1152, 576, 288, 144]
    assert not released_config("small", "sam2").enable_occlusion_spatial_embedding


@pytest.mark.parametrize(
    "name, expected",
    [
        ("sam2.1_hiera_tiny.pt", ("sam2.1", "tiny")),
        ("/ckpts/sam2_hiera_base_plus.pt", ("sam2", "base-plus")),
        ("sam2.1-hiera-large.pt", ("sam2.1", "large")),
        ("my_model.pt", (None, None)),
    ],
)
def test_guess_from_name(name, expected):
    assert guess_from_name(name) == expected


def test_unknown_backbone_without_a_config_says_what_to_pass(tmp_path):
    ckpt = tmp_path / "custom.pt"
    torch.save({"model": hf_to_meta(_tiny_video_model().state_dict())}, ckpt)
    with pytest.raises(ConversionError, match="pass the config"):
        convert_checkpoint(ckpt, tmp_path / "out")
    with pytest.raises(ConversionError, match="does not match the weights"):
        # a size that contradicts the weights is refused, not silently loaded
        torch.save({"model": hf_to_meta(_real_tiny_state())}, tmp_path / "t.pt")
        convert_checkpoint(tmp_path / "t.pt", tmp_path / "out2", config="large")


def _real_tiny_state():
    from transformers import Sam2VideoModel

    return Sam2VideoModel(released_config("tiny", "sam2.1")).state_dict()


def test_files_that_are_not_sam2_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="cannot read"):
        convert_checkpoint(bad, tmp_path / "o1")
    other = tmp_path / "other.pt"
    torch.save({"model": {"layer.weight": torch.zeros(2)}}, other)
    with pytest.raises(ConversionError, match="not a Meta SAM2 checkpoint"):
        convert_checkpoint(other, tmp_path / "o2")
    with pytest.raises(ConversionError, match="does not exist"):
        convert_checkpoint(tmp_path / "missing.pt", tmp_path / "o3")


class _Evil:
    def __reduce__(self):
        return (exec, ("import os; os.environ['SAM2_PWNED'] = '1'",))


def test_checkpoints_are_read_as_data_never_run_as_code(tmp_path, monkeypatch):
    monkeypatch.delenv("SAM2_PWNED", raising=False)
    evil = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": {"image_encoder.x": _Evil()}}, evil)
    with pytest.raises(ConversionError):
        convert_checkpoint(evil, tmp_path / "out")
    import os

    assert "SAM2_PWNED" not in os.environ


def test_model_resolution_converts_a_pt_on_the_fly_and_cli_converts(tmp_path, capsys):
    from label_studio_sam2.cli.main import main
    from label_studio_sam2.engine.models import load_image_model, resolve

    # the real hiera-tiny architecture under Meta's file name: size and release come from the weights
    ckpt = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": hf_to_meta(_real_tiny_state())}, ckpt)
    source = resolve(str(ckpt))
    assert source.endswith("sam2.1_hiera_tiny-hf")
    loaded = load_image_model(str(ckpt), "cpu")  # second call: reuses the converted directory
    assert loaded.image_size == 1024 and loaded.source == source

    main(["convert", str(ckpt), str(tmp_path / "cli-out"), "--config", "tiny"])
    assert "converted" in capsys.readouterr().out
    assert (tmp_path / "cli-out" / "model.safetensors").is_file()
