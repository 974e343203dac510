"""Train a tiny SAM2 from scratch on synthetic shapes (the behavioural-test fixture).

    .venv/bin/python tools/train_tiny.py --steps 3000 --out /tmp/sam2-image
    .venv/bin/python tools/train_tiny.py --init /tmp/sam2-image --steps 0 --video-steps 600 \
        --clip-frames 10 --out devkit/sam2-shapes
    .venv/bin/python tools/train_tiny.py --eval devkit/sam2-shapes --split test

Image stage. Scenes come from `devkit/scenes.py` (split "train" only); every step encodes a batch
of scenes once and decodes several prompts per scene, SAM2-style: a box or one positive click,
then a corrective click sampled from the prediction's errors (positive in a missed region,
negative in a false one), with the previous low-res logits fed back as a mask prompt half the
time (as the backend refines). Losses as in SAM: 20 x focal + dice on the masks (for a single
click, the best of the three candidates), MSE of the predicted IoU against the actual one, BCE on
the object score. Images and prompts go through the product's own transforms
(`label_studio_sam2/engine/transforms.py`) at the config's input size, so the model works through the backend.

Video stage (--video-steps). The memory modules learn on clips of moving shapes
(`make_clip`): a box on frame 0, tracked over the others the way `label_studio_sam2/engine/tracker.py` runs the
model; the image encoder is frozen, and the prompt encoder and decoder keep training on images
between clips so that they do not unlearn prompts.

The result is a `Sam2VideoModel` checkpoint (float16 weights): it loads with
`Sam2Model.from_pretrained` and `Sam2VideoModel.from_pretrained` alike. Seeded, one CPU thread;
the learning-rate schedules depend on the step counts only. --minutes is a wall-clock cap that
stops early (the result then depends on the machine).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devkit.scenes import box_of, interior_point, iou, make_clip, make_scene  # noqa: E402
from label_studio_sam2.engine import hf_internals as hf  # noqa: E402
from label_studio_sam2.engine.models import tiny_config  # noqa: E402
from label_studio_sam2.engine.transforms import preprocess, to_model_coords, upscale_logits  # noqa: E402

PAD = -10  # transformers' "ignore this point" label


@dataclass
class Batch:
    """One training step's data: B images, N objects (each with its image index)."""

    pixels: torch.Tensor  # (B, 3, S, S)
    image_of: torch.Tensor  # (N,) long
    targets: torch.Tensor  # (N, S, S) float in [0, 1], the object's mask at model resolution
    first_click: torch.Tensor  # (N, 2) model coords
    box: torch.Tensor  # (N, 4) model coords, jittered
    use_box: torch.Tensor  # (N,) bool


def image_model(image_size: int, seed: int):
    from transformers import Sam2Config, Sam2Model

    cfg = tiny_config(image_size)
    torch.manual_seed(seed)
    icfg = Sam2Config(
        vision_config=cfg.vision_config,
        prompt_encoder_config=cfg.prompt_encoder_config,
        mask_decoder_config=cfg.mask_decoder_config,
    )
    model = Sam2Model(icfg)
    # transformers initialises every layer with N(0, 0.02), fine for loading weights but slow to
    # train from scratch (activations shrink layer by layer); PyTorch's defaults, which the
    # original SAM2 code trains from, learn several times faster here.
    for module in model.modules():
        if isinstance(
            module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Embedding)
        ):
            module.reset_parameters()
    # Clicks are found by attention between the prompt's positional encoding and the image's.
    # Random query and key projections scramble that similarity and the decoder needs hundreds
    # of steps to find it again; starting each attention with equal query and key projections
    # keeps it (q.k ~ the encodings' similarity, peaked where the click is) and the decoder
    # follows prompts after ~150 steps instead of ~1000.
    with torch.no_grad():
        for module in model.mask_decoder.modules():
            if isinstance(module, hf.ATTENTION):
                module.k_proj.weight.copy_(module.q_proj.weight)
                module.q_proj.bias.zero_()
                module.k_proj.bias.zero_()
    # Points are located by matching their Fourier features against the image's positional
    # encoding: both must use the same random basis, as in released checkpoints (two buffers,
    # equal values). Initialised separately they differ and clicks can hardly be localised.
    model.shared_image_embedding.positional_embedding.copy_(
        model.prompt_encoder.shared_embedding.positional_embedding
    )
    return cfg, model


def make_batch(
    rng: np.random.Generator, step: int, batch: int, size: int, per_image: int, pairs: bool | None = None
) -> Batch:
    """`pairs`: every scene with a touching same-colour pair (True), or as the generator draws
    them (None: 40 %)."""
    pixels, image_of, targets, clicks, boxes, use_box = [], [], [], [], [], []
    for b in range(batch):
        scene = make_scene(step * batch + b, split="train", pair=pairs)
        h, w = scene.hw
        pixels.append(preprocess(scene.image, size))
        masks = torch.from_numpy(scene.masks).float()[:, None]
        small = F.interpolate(masks, size=(size, size), mode="bilinear", antialias=True)[:, 0]
        order = rng.permutation(len(scene.masks))[:per_image]
        for i in order:
            m = scene.masks[i]
            ys, xs = np.nonzero(m)
            k = rng.integers(len(xs))
            click = np.array([xs[k], ys[k]]) + rng.uniform(0, 1, 2)  # continuous pixels
            box = box_of(m).reshape(2, 2)
            side = box[1] - box[0]
            box = box + rng.normal(0, 0.04, (2, 2)) * side  # a hand-drawn box is never exact
            image_of.append(b)
            targets.append(small[i])
            clicks.append(to_model_coords(click, (h, w), size))
            boxes.append(to_model_coords(box, (h, w), size).reshape(4))
            use_box.append(rng.random() < 0.35)
    return Batch(
        torch.cat(pixels),
        torch.tensor(image_of),
        torch.stack(targets),
        torch.from_numpy(np.array(clicks, np.float32)),
        torch.from_numpy(np.array(boxes, np.float32)),
        torch.tensor(use_box),
    )


def encode(model, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The multiscale image embeddings with gradients (`get_image_embeddings` is no_grad)."""
    feats = model.get_image_features(pixels, return_dict=True).fpn_hidden_states
    feats[-1] = feats[-1] + model.no_memory_embedding
    b = pixels.shape[0]
    return [
        f.permute(1, 2, 0).view(b, -1, *s) for f, s in zip(feats, model.backbone_feature_sizes, strict=True)
    ]


def decode(model, emb, image_of, points, labels, boxes, masks, multimask: bool):
    """One prompt per row. Returns logits (N, k, h, w), iou (N, k), object-score logits (N,)."""
    kwargs = {}
    if points is not None:
        kwargs.update(input_points=points[:, None], input_labels=labels[:, None])
    if boxes is not None:
        kwargs["input_boxes"] = boxes[:, None]
    if masks is not None:
        kwargs["input_masks"] = masks[:, None]
    out = model(image_embeddings=[e[image_of] for e in emb], multimask_output=multimask, **kwargs)
    return out.pred_masks[:, 0], out.iou_scores[:, 0], out.object_score_logits[:, 0, 0]


def mask_losses(logits: torch.Tensor, target: torch.Tensor):
    """Per-candidate losses. logits (N, k, h, w) low-res; target (N, S, S) soft.
    Returns (focal*20 + dice) (N, k) and actual IoU (N, k)."""
    n, k = logits.shape[:2]
    up = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    t = target[:, None].expand_as(up)
    p = torch.sigmoid(up)
    ce = F.binary_cross_entropy_with_logits(up, t, reduction="none")
    pt = p * t + (1 - p) * (1 - t)
    alpha = 0.25 * t + 0.75 * (1 - t)
    focal = (alpha * ce * (1 - pt) ** 2).flatten(2).mean(-1)
    dice = 1 - (2 * (p * t).flatten(2).sum(-1) + 1) / (p.flatten(2).sum(-1) + t.flatten(2).sum(-1) + 1)
    with torch.no_grad():
        hard, gt = up > 0, t > 0.5
        inter = (hard & gt).flatten(2).sum(-1).float()
        union = (hard | gt).flatten(2).sum(-1).float()
        actual = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return 20 * focal + dice, actual


def corrective_click(rng: np.random.Generator, logits: torch.Tensor, target: torch.Tensor):
    """A click where the prediction is wrong: positive in a missed part, negative in a false one.

    logits (N, h, w) low-res, target (N, S, S). Returns points (N, 2) model coords, labels (N,).
    Clicks fall on pixels whose 3x3 neighbourhood is all wrong when there are any (a user clicks
    inside an error, not on its edge).
    """
    s = target.shape[-1]
    pred = F.interpolate(logits[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0] > 0
    gt = target > 0.5
    fn, fp = gt & ~pred, pred & ~gt
    err = (fn | fp).float()[:, None]
    core = (-F.max_pool2d(-err, 3, 1, 1))[:, 0] > 0
    pts, labels = np.zeros((len(gt), 2), np.float32), np.zeros(len(gt), np.int64)
    for i in range(len(gt)):
        cand = core[i] if core[i].any() else (fn[i] | fp[i])
        if not cand.any():  # already perfect: another positive click inside
            cand = gt[i] if gt[i].any() else torch.ones_like(gt[i])
        ys, xs = torch.nonzero(cand, as_tuple=True)
        k = rng.integers(len(xs))
        y, x = int(ys[k]), int(xs[k])
        pts[i] = (x + rng.uniform(-0.5, 0.5), y + rng.uniform(-0.5, 0.5))  # pixel index = model coord
        labels[i] = 1 if gt[i, y, x] else 0
    return torch.from_numpy(pts), torch.from_numpy(labels)


def _prompt_loss(logits, pred_iou, obj, target, best_of: bool):
    """Mask loss (the best candidate's when `best_of`, else the first's), IoU-head MSE, presence
    BCE (the object is always there in an image). Returns (loss, actual IoUs (N, k))."""
    loss, actual = mask_losses(logits, target)
    mask = loss.min(1).values if best_of else loss[:, 0]
    presence = F.binary_cross_entropy_with_logits(obj, torch.ones_like(obj))
    return mask.mean() + F.mse_loss(pred_iou, actual) + presence, actual


def train_step(model, batch: Batch, rng: np.random.Generator, rounds: int, encoder_frozen: bool = False):
    """Round 0: a box (single mask) or one click (three candidates, the best one trained). Then
    `rounds` corrective clicks, each decoded with all the object's prompts (single mask), half
    the time with the previous mask's logits as a dense prompt (as the backend refines)."""
    with torch.set_grad_enabled(not encoder_frozen):
        emb = encode(model, batch.pixels)
    n = len(batch.image_of)
    rows = torch.arange(n)
    low = 4 * emb[-1].shape[-1]  # the decoder's masks are 4x its embedding's side
    chosen = torch.zeros(n, low, low)
    total, stats = 0.0, {}
    is_box = batch.use_box
    for group, box in ((torch.nonzero(is_box)[:, 0], True), (torch.nonzero(~is_box)[:, 0], False)):
        if len(group) == 0:
            continue
        io, target = batch.image_of[group], batch.targets[group]
        if box:
            out = decode(model, emb, io, None, None, batch.box[group], None, multimask=False)
        else:
            click, one = batch.first_click[group, None], torch.ones(len(group), 1, dtype=torch.long)
            out = decode(model, emb, io, click, one, None, None, multimask=True)
        loss, actual = _prompt_loss(*out, target, best_of=not box)
        total = total + loss * len(group) / n
        pick = out[1].argmax(1)  # what the backend shows: the candidate with the best score
        chosen[group] = out[0][torch.arange(len(group)), pick].detach()
        stats["box" if box else "click"] = float(actual[torch.arange(len(group)), pick].mean())
    # All objects' prompts as points from here on: a box is its two corners with labels 2 and 3
    # (exactly how the prompt encoder embeds a box), so boxes and clicks share one decoder call;
    # shorter prompts are padded with the ignore label, as the backend batches them.
    points = torch.zeros(n, 2 + rounds, 2)
    labels = torch.full((n, 2 + rounds), PAD, dtype=torch.long)
    points[is_box, :2] = batch.box[is_box].view(-1, 2, 2)
    labels[is_box, 0], labels[is_box, 1] = 2, 3
    points[~is_box, 0] = batch.first_click[~is_box]
    labels[~is_box, 0] = 1
    used = torch.where(is_box, 2, 1)
    for rnd in range(1, rounds + 1):
        p, lab = corrective_click(rng, chosen, batch.targets)
        points[rows, used], labels[rows, used] = p, lab
        used = used + 1
        k = int(used.max())
        mask_in = chosen if rng.random() < 0.5 else None
        out = decode(model, emb, batch.image_of, points[:, :k], labels[:, :k], None, mask_in, multimask=False)
        loss, actual = _prompt_loss(*out, batch.targets, best_of=False)
        total = total + loss
        chosen = out[0][:, 0].detach()
        stats[f"+{rnd}"] = float(actual[:, 0].mean())
    return total / (rounds + 1), stats


# --- evaluation through the product's transforms ---------------------------------------------


@torch.inference_mode()
def predict(model, emb, hw, size, points=None, labels=None, box=None, mask_in=None):
    """One prompt in continuous original pixels, decoded as the backend does (label_studio_sam2/engine/image.py):
    one click alone -> three candidates, the best by predicted IoU; otherwise a single mask.
    `mask_in`: low-res logits of the previous mask of this object (the backend feeds them back
    when clicks are added). Returns ((H, W) bool mask, its low-res logits (1, h, w))."""
    kwargs = {}
    if points is not None:
        kwargs["input_points"] = torch.from_numpy(to_model_coords(np.asarray(points), hw, size))[None, None]
        kwargs["input_labels"] = torch.tensor(labels)[None, None]
    if box is not None:
        corners = to_model_coords(np.asarray(box).reshape(2, 2), hw, size)
        kwargs["input_boxes"] = torch.from_numpy(corners).reshape(1, 1, 4)
    if mask_in is not None:
        kwargs["input_masks"] = mask_in[None]
    multimask = box is None and len(points) == 1
    out = model(image_embeddings=emb, multimask_output=multimask, **kwargs)
    best = int(out.iou_scores[0, 0].argmax())
    low = out.pred_masks[0, 0, best : best + 1]
    return (upscale_logits(low, hw)[0] > 0).numpy(), low


@torch.inference_mode()
def evaluate(model, size: int, split: str, seeds) -> dict:
    """IoUs on scenes of `split`: a click at the deepest point of each isolated shape, its tight
    box; for each touching pair, a click on one member then a negative click on the other added
    (refining the first mask): IoU with the member, and the fraction of the other one left."""
    model.eval()
    res = {"click": [], "box": [], "pair_click": [], "pair_neg": [], "pair_left": [], "pair_left0": []}
    for seed in seeds:
        scene = make_scene(seed, split=split)
        hw = scene.hw
        emb = model.get_image_embeddings(preprocess(scene.image, size))
        for i, m in enumerate(scene.masks):
            if not scene.isolated(i):
                continue
            res["click"].append(iou(predict(model, emb, hw, size, [interior_point(m)], [1])[0], m))
            res["box"].append(iou(predict(model, emb, hw, size, box=box_of(m))[0], m))
        for a, b in scene.pairs:
            for i, j in ((a, b), (b, a)):
                mi, mj = scene.masks[i], scene.masks[j]
                pi, pj = interior_point(mi), interior_point(mj)
                alone, low = predict(model, emb, hw, size, [pi], [1])
                both, _ = predict(model, emb, hw, size, [pi, pj], [1, 0], mask_in=low)
                res["pair_click"].append(iou(alone, mi))
                res["pair_left0"].append(float((alone & mj).sum() / mj.sum()))
                res["pair_neg"].append(iou(both, mi))
                res["pair_left"].append(float((both & mj).sum() / mj.sum()))
    model.train()
    return {k: np.array(v) for k, v in res.items()}


def summary(res: dict) -> str:
    def q(v, thr=None):
        if len(v) == 0:
            return "-"
        s = f"mean {v.mean():.3f} min {v.min():.3f} n {len(v)}"
        return s + (f" >= {thr}: {(v >= thr).mean():.0%}" if thr is not None else "")

    return (
        f"click [{q(res['click'], 0.8)}] box [{q(res['box'], 0.85)}] "
        f"pair: click alone [{q(res['pair_click'])}] other in it [{q(res['pair_left0'])}] "
        f"+neg [{q(res['pair_neg'], 0.8)}] other left [{q(res['pair_left'])}]"
    )


def vsummary(res: dict) -> str:
    v = res["box"]
    return (
        f"box IoU mean {v.mean():.3f} min {v.min():.3f} >= 0.7: {(v >= 0.7).mean():.0%} "
        f"mask IoU mean {res['mask'].mean():.3f} (n {len(v)})"
    )


# --- video: memory modules on moving shapes ------------------------------------------------------


def video_model(image, cfg, seed: int):
    """A Sam2VideoModel holding `image`'s weights; its memory modules start from PyTorch's
    default initialisation (see `image_model`)."""
    from transformers import Sam2VideoModel

    torch.manual_seed(seed)
    video = Sam2VideoModel(cfg)
    for module in video.modules():
        if isinstance(
            module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Embedding)
        ):
            module.reset_parameters()
    trained = image.state_dict()
    own = video.state_dict()
    bad = [k for k in trained if k not in own or own[k].shape != trained[k].shape]
    if bad:
        raise RuntimeError(f"image weights without a place in the video model: {bad[:5]}")
    video.load_state_dict(trained, strict=False)
    return video


def _session(hw: tuple[int, int], n_frames: int):
    from transformers import Sam2VideoInferenceSession

    return Sam2VideoInferenceSession(
        video_height=hw[0], video_width=hw[1], dtype=torch.float32, max_vision_features_cache_size=n_frames
    )


def _cache_frames(video, session, pixels: torch.Tensor) -> None:
    """Encode all frames in one batch and put their features where the session looks for them."""
    out = video.get_image_features(pixels, return_dict=True)
    feats, pos = out.fpn_hidden_states, out.fpn_position_encoding  # lists of (HW, T, C)
    for t in range(pixels.shape[0]):
        session.cache.cache_vision_features(
            t,
            {
                "vision_feats": [f[:, t : t + 1] for f in feats],
                "vision_pos_embeds": [p[:, t : t + 1] for p in pos],
            },
        )


def _video_frame(video, session, frame: int, obj_idxs: list[int], boxes: dict[int, np.ndarray] | None):
    """One frame for these objects, the way label_studio_sam2/engine/tracker.py runs it: a box prompt makes a
    conditioning frame, otherwise the frame is tracked from memory; then memories are encoded.
    Returns per object (low-res logits (h, w), object-score logit ())."""
    outs = {}
    for k in obj_idxs:
        box_points = None if boxes is None else torch.as_tensor(boxes[k], dtype=torch.float32)
        outs[k] = hf.frame_step(video, session, frame, k, box_points)
    hf.encode_memories(video, session, frame, outs, conditioning=boxes is not None)
    outs = list(outs.values())
    return [
        (o["pred_masks"].reshape(o["pred_masks"].shape[-2:]), o["object_score_logits"].reshape(()))
        for o in outs
    ]


def video_step(video, rng: np.random.Generator, seed: int, size: int, n_frames: int, n_objects: int):
    """Box the objects on frame 0 of a clip, track them over the others; mask and presence
    losses on every frame (the memory path gets gradients through the whole clip)."""
    clip = make_clip(seed, split="train", n_frames=n_frames, n_shapes=n_objects)
    hw = clip.frames.shape[1:3]
    pixels = torch.cat([preprocess(f, size) for f in clip.frames])
    masks = torch.from_numpy(clip.masks.reshape(-1, *hw)).float()[:, None]
    small = F.interpolate(masks, size=(size, size), mode="bilinear", antialias=True)[:, 0]
    small = small.view(n_frames, -1, size, size)
    session = _session(hw, n_frames)
    with torch.no_grad():  # the image encoder is not trained here
        _cache_frames(video, session, pixels)
    objs = list(range(clip.masks.shape[1]))
    idxs = [session.obj_id_to_idx(k) for k in objs]
    boxes = {}
    for k in objs:
        box = box_of(clip.masks[0, k]).reshape(2, 2)
        box = box + rng.normal(0, 0.03, (2, 2)) * (box[1] - box[0])
        boxes[idxs[k]] = to_model_coords(box, hw, size)
    total, ious = 0.0, []
    for t in range(n_frames):
        outs = _video_frame(video, session, t, idxs, boxes if t == 0 else None)
        for k, (logits, score) in zip(objs, outs, strict=True):
            target = small[t, k][None]
            present = float(clip.masks[t, k].any())
            loss, actual = mask_losses(logits[None, None], target)
            # an object scored absent gets constant logits (no gradient): only presence is trained
            mask_term = loss[0, 0] if present and score > 0 else 0.0
            total = total + mask_term + F.binary_cross_entropy_with_logits(score, torch.tensor(present))
            if t == n_frames - 1:
                ious.append(float(actual[0, 0]))
    return total / (n_frames * len(objs)), {"track": float(np.mean(ious))}


@torch.inference_mode()
def evaluate_video(video, size: int, split: str, seeds, n_frames: int = 21) -> dict:
    """Box every shape of a clip on frame 0, track it; the tight box of the mask against the
    shape's on the last frame (after n_frames - 1 tracked frames)."""
    res = {"box": [], "mask": []}
    for seed in seeds:
        clip = make_clip(seed, split=split, n_frames=n_frames)
        hw = clip.frames.shape[1:3]
        session = _session(hw, n_frames)
        _cache_frames(video, session, torch.cat([preprocess(f, size) for f in clip.frames]))
        objs = list(range(clip.masks.shape[1]))
        idxs = [session.obj_id_to_idx(k) for k in objs]
        boxes = {idxs[k]: to_model_coords(box_of(clip.masks[0, k]).reshape(2, 2), hw, size) for k in objs}
        for t in range(n_frames):
            outs = _video_frame(video, session, t, idxs, boxes if t == 0 else None)
        for k, (logits, score) in zip(objs, outs, strict=True):
            gt = clip.masks[-1, k]
            pred = (upscale_logits(logits[None], hw)[0] > 0).numpy() if score > 0 else np.zeros(hw, bool)
            res["mask"].append(iou(pred, gt))
            res["box"].append(box_iou(box_of(pred), box_of(gt)) if pred.any() and gt.any() else 0.0)
    return {k: np.array(v) for k, v in res.items()}


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# --- saving -------------------------------------------------------------------------------------


def save_fixture(video, out: Path, meta: dict) -> None:
    """Save the Sam2VideoModel with its weights in float16 (half the size; the config still says
    float32, so both model classes load them as float32)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    video.save_pretrained(out)
    weights = out / "model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def share_image_parts(image, video) -> None:
    """Make the image model use the video model's modules (one set of weights, two forwards)."""
    for name in ("vision_encoder", "prompt_encoder", "mask_decoder", "shared_image_embedding"):
        setattr(image, name, getattr(video, name))
    image.no_memory_embedding = video.no_memory_embedding


def cosine(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000, help="image steps")
    ap.add_argument("--video-steps", type=int, default=0, help="then video steps (each with an image step)")
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock cap (stops early)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "devkit/sam2-shapes")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="scenes per step")
    ap.add_argument("--objects", type=int, default=4, help="objects per scene per step")
    ap.add_argument("--rounds", type=int, default=1, help="corrective clicks per object")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--video-lr", type=float, default=1e-3, help="memory modules (decoder: a quarter)")
    ap.add_argument("--clip-frames", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--init", type=Path, help="start from this model directory's image weights")
    ap.add_argument("--eval", type=Path, help="only evaluate this model directory")
    ap.add_argument("--split", default="val", help="scenes to evaluate on (val, test)")
    ap.add_argument("--scenes", type=int, default=60, help="scenes (and clips) to evaluate on")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the machine is shared; one thread is also what makes runs repeatable

    if args.eval:
        from transformers import Sam2Model, Sam2VideoModel

        model = Sam2Model.from_pretrained(args.eval).eval()
        size = int(model.config.prompt_encoder_config.image_size)
        print(f"{args.split}: {summary(evaluate(model, size, args.split, range(args.scenes)))}", flush=True)
        video = Sam2VideoModel.from_pretrained(args.eval).eval()
        res = evaluate_video(video, size, args.split, range(args.scenes // 3))
        print(f"{args.split} tracking: {vsummary(res)}", flush=True)
        return

    size = args.image_size
    cfg, model = image_model(size, args.seed)
    if args.init:
        from transformers import Sam2Model

        model.load_state_dict(Sam2Model.from_pretrained(args.init).state_dict())
    print(f"parameters: image {sum(p.numel() for p in model.parameters()):,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 7]))
    start = time.time()
    capped = False
    avg: dict[str, float] = {}

    def log(step: int, lr: float, values: dict) -> None:
        for k, v in values.items():
            avg[k] = 0.98 * avg.get(k, v) + 0.02 * v
        if step % 50 == 0:
            line = " ".join(f"{k} {v:.3f}" for k, v in avg.items())
            print(f"step {step} {time.time() - start:.0f}s lr {lr:.2e} {line}", flush=True)

    def image_step(step: int, encoder_frozen: bool = False, pairs: bool | None = None) -> dict:
        batch = make_batch(rng, args.seed * 10_000_000 + step, args.batch, size, args.objects, pairs)
        loss, stats = train_step(model, batch, rng, args.rounds, encoder_frozen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        return {"loss": float(loss.detach()), **stats}

    model.train()
    done = 0
    for step in range(args.steps):
        if time.time() - start > args.minutes * 60:
            capped = True
            break
        lr = cosine(step, args.steps, args.lr, min(300, args.steps // 10))
        for g in opt.param_groups:
            g["lr"] = lr
        log(step, lr, image_step(step))
        done = step + 1
        if args.eval_every and step and step % args.eval_every == 0:
            print(f"eval {step}: {summary(evaluate(model, size, 'val', range(40)))}", flush=True)
    image_minutes = (time.time() - start) / 60
    print(f"image stage: {done} steps in {image_minutes:.1f} min", flush=True)
    # The fixture stores float16: round now, so that the video stage starts from what a saved
    # image-stage model holds (as after `--init`).
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.copy_(t.half().float())
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 8]))

    video = video_model(model, cfg, args.seed)
    share_image_parts(model, video)
    video_done = 0
    if args.video_steps and not capped:
        # The image encoder stays as it is; the decoder keeps training on images too, so that
        # learning to read memories does not unlearn prompts.
        # The memory modules start from scratch; the prompt encoder and decoder only adapt.
        trained_names = {n for n, _ in model.named_parameters()}
        fresh = [p for n, p in video.named_parameters() if n not in trained_names]
        adapt = [
            p
            for n, p in video.named_parameters()
            if n in trained_names and not n.startswith("vision_encoder.")
        ]
        params = fresh + adapt
        opt = torch.optim.AdamW(
            [{"params": fresh, "scale": 1.0}, {"params": adapt, "scale": 0.25}],
            lr=args.video_lr,
            weight_decay=0.05,
        )
        avg.clear()
        for vstep in range(args.video_steps):
            if time.time() - start > args.minutes * 60:
                capped = True
                break
            lr = cosine(vstep, args.video_steps, args.video_lr, 50)
            for g in opt.param_groups:
                g["lr"] = lr * g["scale"]
            seed = args.seed * 10_000_000 + vstep
            video.eval()  # as the tracker runs it (eval mode is also what returns object scores)
            loss, stats = video_step(video, rng, seed, size, args.clip_frames, int(rng.integers(1, 4)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            model.train()
            # every other image step on scenes with a touching pair: telling two same-coloured
            # shapes apart with a negative click is what the image stage learned least well
            pairs = True if vstep % 2 else None
            stats = {"vloss": float(loss.detach()), **stats, **image_step(args.steps + vstep, True, pairs)}
            log(vstep, lr, stats)
            video_done = vstep + 1
            if args.eval_every and vstep and vstep % args.eval_every == 0:
                print(
                    f"video eval {vstep}: {vsummary(evaluate_video(video, size, 'val', range(12)))}",
                    flush=True,
                )
    minutes = (time.time() - start) / 60
    if capped:
        print("wall-clock cap reached: this model is not the reproducible one", flush=True)
    print(f"trained {minutes:.1f} min: {done} image steps, {video_done} video steps", flush=True)
    save_fixture(video, args.out, {})
    # evaluate what was saved (float16 weights), through the classes the backend loads
    from transformers import Sam2Model, Sam2VideoModel

    saved = Sam2Model.from_pretrained(args.out).eval()
    res = evaluate(saved, size, "val", range(args.scenes))
    print(f"val: {summary(res)}", flush=True)
    vres = evaluate_video(
        Sam2VideoModel.from_pretrained(args.out).eval(), size, "val", range(args.scenes // 3)
    )
    print(f"val tracking: {vsummary(vres)}", flush=True)
    meta = {
        "tool": "tools/train_tiny.py",
        "args": {k: str(v) for k, v in vars(args).items()},
        "image_steps": done,
        "video_steps": video_done,
        "capped": capped,
        "minutes": round(minutes, 1),
        "val": {k: round(float(v.mean()), 4) for k, v in res.items() if len(v)},
        "val_tracking": {k: round(float(v.mean()), 4) for k, v in vres.items() if len(v)},
    }
    (args.out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
