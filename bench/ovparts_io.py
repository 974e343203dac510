"""SAM2's parts beyond the image encoder as functions of tensors, converted to OpenVINO for
bench/ovparts.py only: none is converted in the product (docs/benchmarks.md says what each gave).

- memory attention (video, every frame after the first): OpenVINO f32 gained with a short memory
  bank (1.6x at 1 frame) but not once the bank holds 7 frames (0.76-1.13x), every frame from
  the 8th on;
- the memory encoder (video, every frame): 1.46-1.74x at f32, but ~3.5 % of a frame, so ~2 % of a
  frame's time for a second conversion (8-14 s) at the first video;
- the mask decoder on the automatic-mask grid's batch: 1.57x, 1.26x and 0.92x at f32 against the
  project's fast decoder in three runs (bf16 gains more, but the decoder stays fp32 by policy).
"""

from __future__ import annotations

import warnings

import torch


class MemoryAttentionIO(torch.nn.Module):
    """`Sam2VideoMemoryAttention` with the memory bank split into its spatial part and its object
    pointer tokens, so the number of pointer tokens is a shape (dynamic in OpenVINO), not a Python
    int frozen at conversion.

    Inputs (seq-first, as transformers passes them): features, features_pos (HW, B, C);
    spatial, spatial_pos (frames*HW, B, Cm); pointers, pointers_pos (P, B, Cm).
    Output: what the module returns.
    """

    def __init__(self, memory_attention: torch.nn.Module):
        super().__init__()
        self.memory_attention = memory_attention

    def forward(self, features, features_pos, spatial, spatial_pos, pointers, pointers_pos):
        return self.memory_attention(
            current_vision_features=features,
            memory=torch.cat([spatial, pointers], dim=0),
            current_vision_position_embeddings=features_pos,
            memory_posision_embeddings=torch.cat([spatial_pos, pointers_pos], dim=0),
            num_object_pointer_tokens=pointers.shape[0],
        )


class MemoryEncoderIO(torch.nn.Module):
    """`Sam2VideoMemoryEncoder(vision_features, masks)` -> (features, position encoding)."""

    def __init__(self, memory_encoder: torch.nn.Module):
        super().__init__()
        self.memory_encoder = memory_encoder

    def forward(self, vision_features, masks):
        return tuple(self.memory_encoder(vision_features, masks))


class MaskDecoderIO(torch.nn.Module):
    """`Sam2MaskDecoder` with three candidates per prompt (the automatic-mask grid's call):
    (image, image_pe, sparse, dense, feat_s0, feat_s1) -> (masks, iou, object_score_logits)."""

    def __init__(self, mask_decoder: torch.nn.Module, multimask_output: bool = True):
        super().__init__()
        self.mask_decoder = mask_decoder
        self.multimask_output = multimask_output

    def forward(self, image, image_pe, sparse, dense, feat_s0, feat_s1):
        masks, iou, _, object_logits = self.mask_decoder(
            image_embeddings=image,
            image_positional_embeddings=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.multimask_output,
            high_resolution_features=[feat_s0, feat_s1],
        )
        return masks, iou, object_logits


def convert(module: torch.nn.Module, example: tuple, shapes: list[list[int]]):
    """`openvino.convert_model` of a module of tensors; `shapes` gives each input's shape with -1
    where it varies between calls. Returns the ov.Model (weights in f32)."""
    import openvino as ov

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return ov.convert_model(
            module.eval(), example_input=example, input=[ov.PartialShape(s) for s in shapes]
        )


def compile_cpu(ov_model, precision: str, threads: int | None = None):
    """Compile for the CPU with the precision hint (f32 | bf16) and thread count."""
    import openvino as ov

    if precision not in ("f32", "bf16"):
        raise ValueError(f"OpenVINO precision {precision!r}: expected f32 or bf16")
    return ov.Core().compile_model(
        ov_model,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
            "PERFORMANCE_HINT": "LATENCY",
        },
    )


def infer(compiled, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One call on its own infer request (concurrent callers never share one)."""
    request = compiled.create_infer_request()
    request.infer({i: t.detach().float().cpu().contiguous().numpy() for i, t in enumerate(inputs)})
    return [torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(len(compiled.outputs))]


def memory_attention_example(config, frames: int = 2, pointers: int = 2, batch: int = 1):
    """Inputs of MemoryAttentionIO as the video model builds them (random values)."""
    hw = config.memory_attention_rope_feat_sizes[0] * config.memory_attention_rope_feat_sizes[1]
    c = config.memory_attention_hidden_size
    cm = config.memory_encoder_output_channels
    p = pointers * (c // cm)  # each 256-d pointer is split into c/cm tokens of cm
    g = torch.Generator().manual_seed(frames * 100 + pointers)
    return (
        torch.randn(hw, batch, c, generator=g),
        torch.randn(hw, batch, c, generator=g),
        torch.randn(frames * hw, batch, cm, generator=g),
        torch.randn(frames * hw, batch, cm, generator=g),
        torch.randn(p, batch, cm, generator=g),
        torch.randn(p, batch, cm, generator=g),
    )


def memory_attention_shapes(config) -> list[list[int]]:
    hw = config.memory_attention_rope_feat_sizes[0] * config.memory_attention_rope_feat_sizes[1]
    c, cm = config.memory_attention_hidden_size, config.memory_encoder_output_channels
    return [[hw, -1, c], [hw, -1, c], [-1, -1, cm], [-1, -1, cm], [-1, -1, cm], [-1, -1, cm]]
