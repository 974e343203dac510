"""SAM2's mask decoder with its prompt-independent work done once per image.

`transformers`' `Sam2Model.forward` redoes on every click what depends only on the image: the
image-wide positional encoding (sin/cos over 64x64 positions), the no-mask dense prompt added to
the image embedding, the first two-way layer's image-side projections (keys and values the tokens
attend to, queries of the image-to-token attention), and copies of the image features per object.
`DecoderContext.of()` computes these once per image; `decode()` runs the rest, reading every
weight from the model object at call time (a fine-tuned decoder swapped in is used as-is; a
context computed with older weights is recomputed, see `weights_version`).

The arithmetic is the transformers decoder's, in the same order, so masks equal its output up to
float rounding (tests/test_decoder.py compares the two on every prompt kind).

Shapes: B = 1 image, n = objects decoded together, T = tokens per object, L = h*w image
positions, C = decoder width; attention heads split C into (heads, C/heads) after projection.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Objects per decoder call from which the decoder uses every intra-op thread. Below it (the
# interactive case: one or a few objects) it runs on one thread: its ~50 operations are small
# (8-70 token rows; 4096x256 on the image side), and each ends at a thread-pool barrier. On a busy
# machine every barrier waits for a descheduled worker: measured on 2 cores at load ~7, one
# 8x256 product took ~10 ms, and a click decoded 4-5x faster on one thread than on two.
BATCH_FOR_ALL_THREADS = 16


def threads_for(objects: int):
    """A context running decoder work for this many objects on the thread count chosen above."""
    return _threads(torch.get_num_threads() if objects >= BATCH_FOR_ALL_THREADS else 1)


@contextlib.contextmanager
def _threads(n: int):
    """Run the block on n intra-op threads (OpenMP: the setting is the calling thread's own)."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _heads(x: torch.Tensor, attn) -> torch.Tensor:
    """(n, L, internal) -> (n, heads, L, head_dim)."""
    n, length, _ = x.shape
    return x.view(n, length, attn.num_attention_heads, attn.head_dim).transpose(1, 2)


def _attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`Sam2Attention` after its input projections: q/k/v (n, heads, L, head_dim) -> (n, Lq, C)."""
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
    n, heads, length, hd = out.shape
    return attn.o_proj(out.transpose(1, 2).reshape(n, length, heads * hd))


def _image_positional_encoding(model) -> torch.Tensor:
    """The dense positional encoding of the image grid, (L, C) (Sam2Model's, flattened)."""
    return model.get_image_wide_positional_embeddings()[0].flatten(1).transpose(0, 1).contiguous()


def _masks(dec, ctx, image: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
    """Upscale the image side and read masks out with the mask tokens' hypernetwork outputs:
    image (n, C, h, w), hyper (n, k, C/8) -> logits (n, k, 4h, 4w)."""
    n = image.shape[0]
    up = dec.activation(dec.upscale_layer_norm(dec.upscale_conv1(image) + ctx.feat_s1))
    up = dec.activation(dec.upscale_conv2(up) + ctx.feat_s0)  # (n, C/8, 4h, 4w)
    _, c8, hh, ww = up.shape
    return (hyper @ up.view(n, c8, hh * ww)).view(n, hyper.shape[1], hh, ww)


def weights_version(model) -> tuple:
    """Identifies the weights a context was computed from: storage and in-place version of the
    tensors the context reads, so loading other decoder weights invalidates it."""
    layer = model.mask_decoder.transformer.layers[0]
    tensors = [
        model.shared_image_embedding.positional_embedding,
        model.prompt_encoder.no_mask_embed.weight,
        *layer.cross_attn_token_to_image.k_proj.parameters(),
        *layer.cross_attn_token_to_image.v_proj.parameters(),
        *layer.cross_attn_image_to_token.q_proj.parameters(),
    ]
    return tuple((t.data_ptr(), t._version) for t in tensors)


@dataclass
class DecoderContext:
    """What the decoder needs from one image that no prompt changes.

    image: (1, C, h, w) the image embedding (the embedding's own tensor, not a copy);
    keys: (1, L, C) image embedding plus the no-mask dense prompt (the first layer's keys);
    pos: (1, L, C) image-wide positional encoding;
    k0, v0: (1, heads, L, d) first layer token-to-image keys/values;
    q0: (1, heads, L, d) first layer image-to-token queries;
    feat_s0 (1, C/8, 4h, 4w), feat_s1 (1, C/4, 2h, 2w): high-resolution features.
    """

    image: torch.Tensor
    keys: torch.Tensor
    pos: torch.Tensor
    k0: torch.Tensor
    v0: torch.Tensor
    q0: torch.Tensor
    feat_s0: torch.Tensor
    feat_s1: torch.Tensor
    hw: tuple[int, int]
    version: tuple

    @classmethod
    @torch.inference_mode()
    def of(cls, model, features: list[torch.Tensor]) -> DecoderContext:
        """features: the image embedding's multiscale maps [(1, C/8, 4h, 4w), (1, C/4, 2h, 2w), (1, C, h, w)]."""
        image = features[-1]
        h, w = image.shape[-2:]
        no_mask = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        keys = (image + no_mask).flatten(2).transpose(1, 2).contiguous()  # (1, L, C)
        pos = _image_positional_encoding(model)[None]
        layer = model.mask_decoder.transformer.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        keys_pos = keys + pos
        return cls(
            image=image,
            keys=keys,
            pos=pos,
            k0=_heads(t2i.k_proj(keys_pos), t2i),
            v0=_heads(t2i.v_proj(keys), t2i),
            q0=_heads(i2t.q_proj(keys_pos), i2t),
            feat_s0=features[0],
            feat_s1=features[1],
            hw=(h, w),
            version=weights_version(model),
        )


@torch.inference_mode()
def decode(
    model,
    ctx: DecoderContext,
    sparse: torch.Tensor,
    dense: torch.Tensor | None,
    multimask_output: bool,
    min_iou: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`Sam2MaskDecoder.forward` for one image and n objects, from a per-image context.

    Arguments:
        sparse: (1, n, Np, C) point/box embeddings from the prompt encoder.
        dense: (n or 1, C, h, w) mask-prompt embeddings, or None for "no mask" (the context's keys).
        min_iou: with multimask_output, objects none of whose candidates predicts an IoU of at
            least this skip the mask upscaling (about a third of the decoder's work), and their
            masks come back as DROPPED_LOGIT everywhere: for callers that drop such candidates
            anyway (automatic masks), so their output is unchanged.
    Returns:
        masks (1, n, k, 4h, 4w) logits, iou (1, n, k), object_score_logits (1, n, 1);
        k = 3 when multimask_output else 1.
    """
    with threads_for(sparse.shape[1]):
        return _decode(model, ctx, sparse, dense, multimask_output, min_iou)


DROPPED_LOGIT = -1e4  # the mask logit of a candidate `decode(min_iou=...)` did not upscale


def _decode(model, ctx, sparse, dense, multimask_output, min_iou=None):
    dec = model.mask_decoder
    tf = dec.transformer
    n = sparse.shape[1]
    h, w = ctx.hw
    output_tokens = torch.cat([dec.obj_score_token.weight, dec.iou_token.weight, dec.mask_tokens.weight])
    tokens = torch.cat([output_tokens.expand(1, n, -1, -1), sparse], dim=2)[0]  # (n, T, C)
    tokens = tokens.to(dec.iou_token.weight.dtype)
    pos = ctx.pos  # (1, L, C): broadcasts over objects
    if dense is None:
        keys = ctx.keys  # (1, L, C), shared by all objects until the first image-side update
        first = (ctx.k0, ctx.v0, ctx.q0)
    else:
        keys = (ctx.image + dense).flatten(2).transpose(1, 2).expand(n, -1, -1)
        first = None

    queries = tokens
    for i, layer in enumerate(tf.layers):
        # self-attention of the tokens (the first layer without positional encoding)
        if layer.skip_first_layer_pe:
            q = k = v = queries
        else:
            q = k = queries + tokens
            v = queries
        sa = layer.self_attn
        queries = layer.layer_norm1(
            (queries if not layer.skip_first_layer_pe else 0)
            + _attend(sa, _heads(sa.q_proj(q), sa), _heads(sa.k_proj(k), sa), _heads(sa.v_proj(v), sa))
        )
        # tokens attend to the image
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        if i == 0 and first is not None:
            k_img, v_img, q_img = first
            k_img, v_img = k_img.expand(n, -1, -1, -1), v_img.expand(n, -1, -1, -1)
        else:
            keys_pos = keys + pos
            k_img, v_img, q_img = (
                _heads(t2i.k_proj(keys_pos), t2i),
                _heads(t2i.v_proj(keys), t2i),
                _heads(i2t.q_proj(keys_pos), i2t),
            )
        q_tok = queries + tokens
        attn_out = _attend(t2i, _heads(t2i.q_proj(q_tok), t2i), k_img, v_img)
        queries = layer.layer_norm2(queries + attn_out)
        queries = layer.layer_norm3(queries + layer.mlp(queries))
        # the image attends to the tokens
        q_tok = queries + tokens
        k_tok, v_tok = _heads(i2t.k_proj(q_tok), i2t), _heads(i2t.v_proj(queries), i2t)
        keys = layer.layer_norm4(keys + _attend(i2t, q_img.expand(n, -1, -1, -1), k_tok, v_tok))
    fa = tf.final_attn_token_to_image
    q_fin = _heads(fa.q_proj(queries + tokens), fa)
    attn_out = _attend(fa, q_fin, _heads(fa.k_proj(keys + pos), fa), _heads(fa.v_proj(keys), fa))
    queries = tf.layer_norm_final_attn(queries + attn_out)  # (n, T, C)

    # upscale the image side and read masks out with the mask tokens
    num_mask_tokens = dec.num_mask_tokens
    mask_tokens_out = queries[:, 2 : 2 + num_mask_tokens]
    hyper = torch.stack(
        [mlp(mask_tokens_out[:, j]) for j, mlp in enumerate(dec.output_hypernetworks_mlps)], 1
    )
    iou = dec.iou_prediction_head(queries[:, 1])[None]  # (1, n, 4)
    object_logits = dec.pred_obj_score_head(queries[:, 0])[None]  # (1, n, 1)
    image = keys.transpose(1, 2).reshape(n, -1, h, w)
    wanted = None
    if min_iou is not None and multimask_output:
        wanted = (iou[0, :, 1:] >= min_iou).any(-1)  # (n,)
    if wanted is None or bool(wanted.all()):
        masks = _masks(dec, ctx, image, hyper)[None]
    else:
        masks = torch.full(
            (1, n, num_mask_tokens, 4 * h, 4 * w), DROPPED_LOGIT, dtype=hyper.dtype, device=hyper.device
        )
        if bool(wanted.any()):
            masks[0, wanted] = _masks(dec, ctx, image[wanted], hyper[wanted]).to(masks.dtype)
    if multimask_output:
        return masks[:, :, 1:], iou[:, :, 1:], object_logits
    if dec.dynamic_multimask_via_stability:
        masks, iou = dec._dynamic_multimask_via_stability(masks, iou)
        return masks, iou, object_logits
    return masks[:, :, :1], iou[:, :, :1], object_logits
