"""Fine-tuning SAM2's prompt encoder and mask decoder on a project's own masks.

The image encoder stays frozen, so every stored embedding stays valid and a training step costs
no encoder pass: examples carry their image's cached multiscale features. Prompts are simulated
as SAM2 trains: a box with jitter or one positive click sampled inside the mask, then corrective
clicks sampled in the error region of the previous prediction (positive where the object was
missed, negative where background was taken), with the previous logits fed back as a mask prompt
half the time (as the backend refines a mask). Losses as in SAM: 20 x focal + dice on the mask
(for a single click, the best of the three candidates), MSE of the predicted IoU against the
actual one, BCE on the object score.

Held-out examples are scored before and after through the product's own decoder call
(`ImagePredictor.decode_logits`): one click at the point deepest inside the mask and the mask's
tight box, IoU at the original image size. A fine-tune counts as an improvement only when the
mean of the two mIoUs rises by `min_gain` and neither falls by more than that.

Shapes: masks are (H, W) bool at the original image size; features are the encoder's output for
one image, each (1, C, h, w). Points and boxes are continuous original pixels (transforms.py).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from label_studio_sam2.engine.image import PAD_LABEL, ImageEmbedding, ImagePredictor, Prompt
from label_studio_sam2.engine.models import LoadedModel, module_view
from label_studio_sam2.engine.transforms import mask_box, to_model_coords, upscale_logits

log = logging.getLogger(__name__)

TRAINED = ("prompt_encoder", "mask_decoder")  # the parts a fine-tune changes; the encoder is shared
BOX_CORNER_LABELS = (2, 3)  # how SAM2's prompt encoder labels a box's two corners


@dataclass
class Example:
    """One object to learn: its image's embedding and its mask.

    features: the encoder's multiscale maps of the image, each (1, C, h, w) float32 on CPU.
    mask: (H, W) bool at the original image size.
    group: what keeps examples together in the train/val split (the task id: objects of one
        image never land on both sides).
    """

    features: list[torch.Tensor]
    mask: np.ndarray
    group: str

    @property
    def hw(self) -> tuple[int, int]:
        return self.mask.shape[0], self.mask.shape[1]


def split(examples: list[Example], val_fraction: float = 0.2, min_val: int = 1) -> tuple[list, list]:
    """Deterministic train/val split by a hash of each example's group (stable as data grows:
    adding tasks never moves an old one to the other side)."""

    def bucket(g: str) -> float:
        return int(hashlib.sha256(g.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    groups = sorted({e.group for e in examples}, key=bucket)
    n_val = min(len(groups) - 1, max(min_val, round(val_fraction * len(groups))))
    val_groups = {g for g in groups if bucket(g) < val_fraction} or set(groups[:n_val])
    if len(val_groups) >= len(groups):
        val_groups = set(groups[:n_val])
    train = [e for e in examples if e.group not in val_groups]
    val = [e for e in examples if e.group in val_groups]
    return train, val


# --- the decoder a project uses ------------------------------------------------------------------


def with_decoder(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """A view of `model` that shares its image encoder (and every other module) but has its own
    prompt encoder and mask decoder: copies of `model`'s, with `state` (names as in
    `decoder_state`) loaded when given. The original model is never changed."""
    view = module_view(model)
    for name in TRAINED:
        view._modules[name] = copy.deepcopy(model._modules[name])
    if state is not None:
        own = decoder_state(view)
        missing = set(own) - set(state)
        unexpected = set(state) - set(own)
        if missing or unexpected:
            raise ValueError(
                f"decoder weights do not fit this model: {len(missing)} missing, {len(unexpected)} unexpected"
            )
        with torch.no_grad():
            for k, t in own.items():
                if tuple(state[k].shape) != tuple(t.shape):
                    raise ValueError(
                        f"decoder weight {k} has shape {tuple(state[k].shape)}, expected {tuple(t.shape)}"
                    )
                t.copy_(state[k].to(t.dtype))
    return view


def decoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fine-tuned parts' parameters and buffers, by their names in the full model."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if k.split(".")[0] in TRAINED}


def view_of(base: LoadedModel, model: torch.nn.Module) -> LoadedModel:
    """`base` with another decoder: same model_id (embeddings cached for the base stay valid, as
    the encoder is the same, in the same precision: label_studio_sam2.engine.models.store_key), same device and the
    same lock (one model at a time per process)."""
    return LoadedModel(
        model,
        base.source,
        base.model_id,
        base.device,
        base.image_size,
        base.autocast,
        base.lock,
        cpu_encoder_autocast=base.cpu_encoder_autocast,
        ov_encoder=base.ov_encoder,
    )


# --- held-out scores -----------------------------------------------------------------------------


@dataclass
class Scores:
    """Held-out mean IoUs: `click` one click at the mask's deepest point, `box` its tight box."""

    click: float
    box: float
    n: int

    @property
    def mean(self) -> float:
        return (self.click + self.box) / 2


def deepest_point(mask: np.ndarray) -> np.ndarray:
    """(2,) float XY: the centre of the pixel farthest from the mask's edge (where people click)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x + 0.5, y + 0.5], np.float32)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def evaluate(loaded: LoadedModel, examples: list[Example]) -> Scores:
    """1-click and box mIoU on `examples`, decoded as the server decodes (best of three
    candidates by predicted IoU for a single click)."""
    predictor = ImagePredictor(loaded)
    clicks, boxes = [], []
    for ex in examples:
        emb = ImageEmbedding.of(ex.features, ex.hw)
        click = Prompt(points_xy=deepest_point(ex.mask)[None], point_labels=np.ones(1, np.int64))
        for prompt, out in ((click, clicks), (Prompt(box_xyxy=mask_box(ex.mask)), boxes)):
            logits, iou, _ = predictor.decode_logits(emb, [prompt])
            best = logits[0, int(iou[0].argmax())]
            mask = (upscale_logits(best[None], ex.hw)[0] > 0).cpu().numpy()
            out.append(mask_iou(mask, ex.mask))
    return Scores(float(np.mean(clicks)), float(np.mean(boxes)), len(examples))


# --- training ------------------------------------------------------------------------------------


@dataclass
class FinetuneConfig:
    epochs: int = 20
    batch: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    corrective_clicks: int = 2  # simulated correction rounds after the first prompt
    box_fraction: float = 0.5  # first prompt: a jittered box this often, else one click
    box_jitter: float = 0.1  # std of each box corner's noise, as a fraction of the box side
    loss_side: int = 256  # masks are compared at this square resolution (at most the input side)
    min_gain: float = 0.02  # activation margin on held-out mIoU
    seed: int = 0


@dataclass
class Progress:
    step: int
    steps: int
    epoch: int
    loss: float
    seconds: float

    @property
    def eta_s(self) -> float:
        return self.seconds / max(self.step, 1) * (self.steps - self.step)


@dataclass
class FinetuneResult:
    """What a fine-tune did. `state` holds the decoder weights (see `decoder_state`)."""

    before: Scores
    after: Scores | None
    state: dict[str, torch.Tensor] | None
    steps: int
    seconds: float
    stopped: bool = False  # interrupted: a checkpoint holds where to resume
    config: dict = field(default_factory=dict)

    def improved(self, min_gain: float) -> bool:
        if self.after is None:
            return False
        b, a = self.before, self.after
        return a.mean - b.mean >= min_gain and a.click >= b.click - min_gain and a.box >= b.box - min_gain


def _targets(examples: list[Example], side: int) -> torch.Tensor:
    """(N, side, side) float in [0, 1]: each mask at the model's square resolution."""
    out = []
    for ex in examples:
        m = torch.from_numpy(ex.mask).float()[None, None]
        out.append(F.interpolate(m, size=(side, side), mode="bilinear", antialias=True)[0, 0])
    return torch.stack(out)


def _first_prompts(rng: np.random.Generator, examples: list[Example], cfg: FinetuneConfig, size: int):
    """Per example: (points (2, 2), labels (2,)) in model coords, padded; and whether it is a box."""
    pts = np.zeros((len(examples), 2, 2), np.float32)
    labels = np.full((len(examples), 2), PAD_LABEL, np.int64)
    is_box = rng.random(len(examples)) < cfg.box_fraction
    for i, ex in enumerate(examples):
        h, w = ex.hw
        if is_box[i]:
            box = mask_box(ex.mask).reshape(2, 2)
            side = box[1] - box[0]
            box = box + rng.normal(0, cfg.box_jitter, (2, 2)) * side
            box = np.clip(box, 0, [w, h])
            pts[i] = to_model_coords(box, ex.hw, size)
            labels[i] = BOX_CORNER_LABELS
        else:
            ys, xs = np.nonzero(ex.mask)
            k = rng.integers(len(xs))
            click = np.array([xs[k], ys[k]]) + rng.uniform(0, 1, 2)
            pts[i, 0] = to_model_coords(click, ex.hw, size)
            labels[i, 0] = 1
    return torch.from_numpy(pts), torch.from_numpy(labels), torch.from_numpy(is_box)


def _corrective_clicks(rng: np.random.Generator, logits: torch.Tensor, target: torch.Tensor, size: int):
    """A click inside each prediction's error: positive where the object was missed, negative
    where background was taken; inside the error, not on its edge, when the error allows.

    logits (N, h, w) low-res, target (N, T, T). Returns points (N, 2) model coords, labels (N,).
    """
    side = target.shape[-1]
    pred = F.interpolate(logits[:, None], size=(side, side), mode="bilinear", align_corners=False)[:, 0] > 0
    gt = target > 0.5
    err = pred ^ gt
    core = -F.max_pool2d(-err.float()[:, None], 3, 1, 1)[:, 0] > 0
    pts, labels = np.zeros((len(gt), 2), np.float32), np.zeros(len(gt), np.int64)
    for i in range(len(gt)):
        cand = core[i] if core[i].any() else err[i]
        if not cand.any():  # already right: one more positive click inside
            cand = gt[i] if gt[i].any() else torch.ones_like(gt[i])
        ys, xs = torch.nonzero(cand, as_tuple=True)
        k = rng.integers(len(xs))
        y, x = int(ys[k]), int(xs[k])
        pts[i] = ((x + rng.uniform(0, 1)) * size / side - 0.5, (y + rng.uniform(0, 1)) * size / side - 0.5)
        labels[i] = int(gt[i, y, x])
    return torch.from_numpy(pts), torch.from_numpy(labels)


def _losses(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, k, h, w), target (N, T, T). Returns loss (N, k) and actual IoU (N, k)."""
    up = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    t = target[:, None].expand_as(up)
    p = torch.sigmoid(up)
    ce = F.binary_cross_entropy_with_logits(up, t, reduction="none")
    pt = p * t + (1 - p) * (1 - t)
    focal = ((0.25 * t + 0.75 * (1 - t)) * ce * (1 - pt) ** 2).flatten(2).mean(-1)
    dice = 1 - (2 * (p * t).flatten(2).sum(-1) + 1) / (p.flatten(2).sum(-1) + t.flatten(2).sum(-1) + 1)
    with torch.no_grad():
        hard, gt = up > 0, t > 0.5
        union = (hard | gt).flatten(2).sum(-1).float()
        actual = torch.where(
            union > 0, (hard & gt).flatten(2).sum(-1) / union.clamp(min=1), torch.ones_like(union)
        )
    return 20 * focal + dice, actual


def _decode(model, feats, points, labels, masks, multimask: bool):
    kwargs = {"input_points": points[:, None], "input_labels": labels[:, None]}
    if masks is not None:
        kwargs["input_masks"] = masks[:, None]
    out = model(image_embeddings=feats, multimask_output=multimask, **kwargs)
    return out.pred_masks[:, 0], out.iou_scores[:, 0], out.object_score_logits[:, 0, 0]


def _prompt_loss(out, target, best_of: bool):
    logits, pred_iou, obj = out
    loss, actual = _losses(logits, target)
    mask = loss.min(1).values if best_of else loss[:, 0]
    presence = F.binary_cross_entropy_with_logits(obj, torch.ones_like(obj))
    return mask.mean() + F.mse_loss(pred_iou, actual) + presence


def train_step(model, batch: list[Example], rng: np.random.Generator, cfg: FinetuneConfig, size: int):
    """The loss of one batch: the first prompt, then `cfg.corrective_clicks` corrections."""
    feats = [torch.cat([ex.features[i] for ex in batch]) for i in range(len(batch[0].features))]
    target = _targets(batch, min(cfg.loss_side, size))
    points, labels, is_box = _first_prompts(rng, batch, cfg, size)
    n = len(batch)
    low = None
    total = torch.zeros(())
    for group, box in ((torch.nonzero(is_box)[:, 0], True), (torch.nonzero(~is_box)[:, 0], False)):
        if len(group) == 0:
            continue
        k = 2 if box else 1
        out = _decode(
            model, [f[group] for f in feats], points[group, :k], labels[group, :k], None, multimask=not box
        )
        total = total + _prompt_loss(out, target[group], best_of=not box) * len(group) / n
        chosen = out[0][torch.arange(len(group)), out[1].argmax(1)].detach()  # what the server shows
        if low is None:
            low = torch.zeros(n, *chosen.shape[-2:])
        low[group] = chosen
    used = torch.where(is_box, 2, 1)
    rows = torch.arange(n)
    pad = torch.full((n, cfg.corrective_clicks), PAD_LABEL, dtype=torch.long)
    points = torch.cat([points, torch.zeros(n, cfg.corrective_clicks, 2)], 1)
    labels = torch.cat([labels, pad], 1)
    for _ in range(cfg.corrective_clicks):
        p, lab = _corrective_clicks(rng, low, target, size)
        points[rows, used], labels[rows, used] = p, lab
        used = used + 1
        k = int(used.max())
        mask_in = low if rng.random() < 0.5 else None
        out = _decode(model, feats, points[:, :k], labels[:, :k], mask_in, multimask=False)
        total = total + _prompt_loss(out, target, best_of=False)
        low = out[0][:, 0].detach()
    return total / (1 + cfg.corrective_clicks)


def _fingerprint(train: list[Example], cfg: FinetuneConfig, base_id: str) -> str:
    h = hashlib.sha256(base_id.encode())
    h.update(repr(sorted(asdict(cfg).items())).encode())
    for ex in train:
        h.update(ex.group.encode())
        h.update(np.packbits(ex.mask).tobytes())
    return h.hexdigest()[:16]


def finetune(
    base: LoadedModel,
    train: list[Example],
    val: list[Example],
    cfg: FinetuneConfig | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    stop: threading.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
) -> FinetuneResult:
    """Fine-tune the prompt encoder and mask decoder of `base` (never changed) on `train`.

    Arguments:
        base: the served model; its decoder is the starting point (or `init_state`).
        train, val: examples (see `split`); `val` scores the model before and after.
        checkpoint: a file where an interrupted run (`stop` set) leaves its state, and from
            which the same run (same data, settings and base) resumes; removed when done.
        on_progress: called after every step.
    Returns:
        FinetuneResult; `stopped` when `stop` was set before the last step.
    """
    cfg = cfg or FinetuneConfig()
    stop = stop or threading.Event()
    if not train or not val:
        raise ValueError(f"need training and held-out examples (got {len(train)} and {len(val)})")
    model = with_decoder(base.model, init_state)
    loaded = view_of(base, model)
    params = [p for name in TRAINED for p in model._modules[name].parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(train) / cfg.batch)
    steps = cfg.epochs * per_epoch
    ckpt = Path(checkpoint) if checkpoint else None
    fingerprint = _fingerprint(train, cfg, base.model_id)
    step, before, elapsed = 0, None, 0.0
    saved = _load_checkpoint(ckpt, fingerprint) if ckpt is not None and ckpt.is_file() else None
    if saved is not None:
        try:
            with torch.no_grad():
                for k, t in decoder_state(model).items():
                    t.copy_(saved["state"][k])
            opt.load_state_dict(saved["optimizer"])
            step, before, elapsed = int(saved["step"]), Scores(**saved["before"]), float(saved["seconds"])
            log.info("resuming fine-tune at step %d of %d", step, steps)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # written by something else
            log.warning("checkpoint %s does not fit this run (%s): starting over", ckpt, str(e)[:200])
            model = with_decoder(base.model, init_state)
            loaded = view_of(base, model)
            params = [p for name in TRAINED for p in model._modules[name].parameters()]
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            step, before, elapsed = 0, None, 0.0
    if before is None:
        before = evaluate(loaded, val)
    start = time.monotonic() - elapsed
    for name in TRAINED:
        model._modules[name].train()
    try:
        while step < steps:
            if stop.is_set():
                if ckpt is not None:
                    _save_checkpoint(ckpt, model, opt, step, before, time.monotonic() - start, fingerprint)
                return FinetuneResult(before, None, None, step, time.monotonic() - start, True, asdict(cfg))
            epoch, i = divmod(step, per_epoch)
            # the epoch's order depends on the seed and the epoch only: a resumed run sees the same
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
            rng = np.random.default_rng([cfg.seed, epoch, i, 1])
            batch = [train[j] for j in order[i * cfg.batch : (i + 1) * cfg.batch]]
            loss = train_step(model, batch, rng, cfg, base.image_size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for g in opt.param_groups:  # cosine decay to 10 %
                g["lr"] = cfg.lr * (0.55 + 0.45 * math.cos(math.pi * step / steps))
            opt.step()
            step += 1
            if ckpt is not None and step % per_epoch == 0 and step < steps:  # a crash loses one epoch at most
                _save_checkpoint(ckpt, model, opt, step, before, time.monotonic() - start, fingerprint)
            if on_progress is not None:
                on_progress(Progress(step, steps, epoch, float(loss.detach()), time.monotonic() - start))
    finally:
        for name in TRAINED:
            model._modules[name].eval()
    after = evaluate(loaded, val)
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    state = {k: v.detach().clone() for k, v in decoder_state(model).items()}
    return FinetuneResult(before, after, state, step, time.monotonic() - start, False, asdict(cfg))


def _load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    """An interrupted run's checkpoint if it is of this run (same data, settings and base), else
    None. Loaded with `weights_only=True`: tensors, numbers, strings and containers only, so a
    planted file (a pickle whose objects run code when loaded) is refused, never run."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for anything that is not plain data
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.warning(
            "checkpoint %s refused, not loaded (not a plain checkpoint of this backend: %s): starting over",
            path,
            first[:200],
        )
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        log.info("checkpoint %s is of another run (data or settings changed): starting over", path)
        return None
    return saved


def _save_checkpoint(path: Path, model, opt, step, before: Scores, seconds: float, fingerprint: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # this run's own temporary file: a run of the same project elsewhere never shares it
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{time.time_ns()}.tmp")
    try:
        torch.save(
            {
                "fingerprint": fingerprint,
                "state": {k: v.detach() for k, v in decoder_state(model).items()},
                "optimizer": opt.state_dict(),
                "step": step,
                "before": asdict(before),
                "seconds": seconds,
            },
            tmp,
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
