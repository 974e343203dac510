"""Automatic mask generation: a grid of point prompts over the image (or over regions of it).

The SAM recipe (segment-anything's `automatic_mask_generator.py`), on our stateless predictor:

1. One embedding per image (`ImagePredictor.embedding`, cached), or per region of interest when
   ROIs are cropped and encoded on their own (small objects get the encoder's full resolution).
2. A regular grid of single positive points, decoded in batches of `points_per_batch` with three
   candidate masks each (or, in the fast mode, coarse to fine: see `AutoMaskConfig.skip_covered`).
3. Candidates filtered on the decoder's predicted IoU and on the stability score (IoU of the mask
   thresholded at +offset and -offset in logit space), at the decoder's low resolution. The IoU
   comes before the mask: a point none of whose candidates passes is not upscaled at all.
4. Non-maximum suppression on boxes (ours, numpy; no torchvision), then optionally on masks.
5. The survivors upscaled to the original size, clipped to their region, filtered by area.

Coordinates: continuous pixels of the full image, XY (see transforms.py). Masks come back as
`AutoMask`: a bool patch inside an integer bounding box, so a hundred masks of a 12 MP photo do
not hold a hundred full-size arrays at once; `AutoMask.full()` gives the (H, W) mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from label_studio_sam2.engine.image import ImageEmbedding, ImagePredictor, Prompt
from label_studio_sam2.engine.transforms import mask_boxes, upscale_logits


@dataclass(frozen=True)
class AutoMaskConfig:
    """Knobs of the generator (SAM2's defaults are 32 points per side, IoU 0.8, stability 0.95).

    points_per_side: the grid is points_per_side x points_per_side over each region.
    points_per_batch: prompts per decoder call (memory: 3 low-res masks of 256x256 per point).
    pred_iou_thresh: keep candidates whose predicted IoU is at least this.
    stability_thresh: keep candidates whose stability score is at least this.
    stability_offset: the logit offset of the stability score.
    box_nms_thresh: suppress a candidate whose box overlaps a better one's by more than this IoU.
    mask_nms_thresh: if set, then also suppress by mask IoU (catches nested boxes box NMS keeps).
    min_area_px: drop masks smaller than this many pixels of the original image.
    max_masks: keep at most this many (best predicted IoU first); None for all.
    crop_rois: encode each ROI as its own image (better for small ROIs, one encoder pass each);
        False reuses the whole image's embedding and puts the grid inside the ROI.
    skip_covered: the opt-in fast mode (AUTO_FAST). The grid is decoded coarse to fine: first every
        `coarse_step`-th point of every `coarse_step`-th row; then a finer point is decoded only if
        (a) it is not inside a confident mask kept so far (in a full run it mostly finds that mask
        again, which NMS then drops), and (b) some coarse point around it predicted a candidate
        of IoU >= pred_iou_thresh - `fine_iou_margin` (where every coarse neighbour found nothing
        near the bar, the point between them rarely does). Fewer decoder calls, a few masks fewer
        (bench.auto measures the recall and the share of points decoded).
    cover_iou_thresh, cover_stability_thresh: what a kept mask needs to cover grid points.
    cover_max_area: a kept mask larger than this share of its region (background, the whole
        image) covers no point: small objects inside it still get their points.
    coarse_step: spacing of the coarse grid, in grid points.
    fine_iou_margin: rule (b)'s margin below pred_iou_thresh; None decodes every uncovered point.
    """

    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.8
    stability_thresh: float = 0.92
    stability_offset: float = 1.0
    box_nms_thresh: float = 0.7
    mask_nms_thresh: float | None = 0.8
    min_area_px: int = 0
    max_masks: int | None = None
    crop_rois: bool = True
    skip_covered: bool = False
    cover_iou_thresh: float = 0.8
    cover_stability_thresh: float = 0.92
    cover_max_area: float = 0.25
    coarse_step: int = 2
    fine_iou_margin: float | None = 0.0

    def __post_init__(self):
        if self.points_per_side < 1 or self.points_per_batch < 1 or self.coarse_step < 1:
            raise ValueError("points_per_side, points_per_batch and coarse_step must be at least 1")


@dataclass
class AutoMask:
    """One generated mask.

    patch: (y2 - y1, x2 - x1) bool, the mask inside its bounding box.
    box: (x1, y1, x2, y2) int pixels of the full image, x2/y2 exclusive (a pixel-tight box).
    image_hw: (H, W) of the full image.
    score: the decoder's predicted IoU, in [0, 1].
    stability: the stability score, in [0, 1].
    point_xy: (2,) float, the grid point (continuous pixels of the full image) that produced it.
    """

    patch: np.ndarray
    box: tuple[int, int, int, int]
    image_hw: tuple[int, int]
    score: float
    stability: float
    point_xy: np.ndarray

    @property
    def area(self) -> int:
        return int(self.patch.sum())

    def full(self) -> np.ndarray:
        """(H, W) bool mask at the full image size."""
        out = np.zeros(self.image_hw, bool)
        x1, y1, x2, y2 = self.box
        out[y1:y2, x1:x2] = self.patch
        return out


# --- plain helpers (numpy / torch, no torchvision) -----------------------------------------------


def point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) float XY in [0, 1]: cell centres of an n x n grid, row by row."""
    offset = 1.0 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def stability_scores(logits: torch.Tensor, offset: float) -> torch.Tensor:
    """(N, h, w) logits -> (N,) IoU of the masks thresholded at +offset and at -offset.

    A mask whose boundary barely moves when the threshold does is a confident one. An empty
    union (nothing above -offset) scores 0.
    """
    flat = logits.flatten(1)
    inter = (flat > offset).sum(-1).float()
    union = (flat > -offset).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4), (M, 4) x1, y1, x2, y2 -> (N, M) IoU; boxes of zero area have IoU 0."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Greedy non-maximum suppression, as torchvision.ops.nms.

    Arguments:
        boxes: (N, 4) x1, y1, x2, y2.
        scores: (N,) higher is better.
        iou_thresh: a box overlapping an already kept one by more than this is dropped.
    Returns:
        (K,) int64 indices of the kept boxes, best score first.
    """
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    if len(order) == 0:
        return order.astype(np.int64)
    iou = box_iou(boxes, boxes)
    suppressed = np.zeros(len(order), bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_thresh
    return np.asarray(keep, np.int64)


def mask_iou(a: AutoMask, b: AutoMask) -> float:
    """IoU of two masks, computed on the overlap of their boxes only."""
    x1, y1 = max(a.box[0], b.box[0]), max(a.box[1], b.box[1])
    x2, y2 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
    if x2 <= x1 or y2 <= y1:
        return 0.0
    pa = a.patch[y1 - a.box[1] : y2 - a.box[1], x1 - a.box[0] : x2 - a.box[0]]
    pb = b.patch[y1 - b.box[1] : y2 - b.box[1], x1 - b.box[0] : x2 - b.box[0]]
    inter = int(np.count_nonzero(pa & pb))
    union = a.area + b.area - inter
    return inter / union if union else 0.0


def mask_nms(masks: list[AutoMask], iou_thresh: float) -> list[AutoMask]:
    """Greedy NMS on mask IoU, best score first."""
    kept: list[AutoMask] = []
    for m in sorted(masks, key=lambda m: -m.score):
        if all(mask_iou(m, k) <= iou_thresh for k in kept):
            kept.append(m)
    return kept


# --- the generator -------------------------------------------------------------------------------


@dataclass
class _Candidates:
    """Filtered candidates of one region, before NMS (low-res logits kept in fp16)."""

    logits: torch.Tensor  # (N, h, w)
    boxes: np.ndarray  # (N, 4) float, full-image pixels
    scores: np.ndarray  # (N,) predicted IoU
    stability: np.ndarray  # (N,)
    points: np.ndarray  # (N, 2) full-image pixels

    @classmethod
    def empty(cls, hw: tuple[int, int]) -> _Candidates:
        z = np.zeros((0,))
        return cls(torch.zeros((0, *hw), dtype=torch.float16), np.zeros((0, 4)), z, z, np.zeros((0, 2)))

    def take(self, idx: np.ndarray) -> _Candidates:
        t = torch.from_numpy(np.asarray(idx, np.int64))
        return _Candidates(
            self.logits[t], self.boxes[idx], self.scores[idx], self.stability[idx], self.points[idx]
        )


@dataclass(frozen=True)
class _Region:
    """Where a grid goes: `emb` covers the image window at `offset` (x, y) of size `emb.original_hw`;
    the grid and the masks are limited to `clip` (x1, y1, x2, y2 int, full-image pixels)."""

    emb: ImageEmbedding
    offset: tuple[int, int]
    clip: tuple[int, int, int, int]


class AutoMaskGenerator:
    """Masks of everything in an image, or in regions of it, from a grid of point prompts.

    Stateless per call like the predictor it wraps; safe to share between threads (the model
    lock is taken per decoder call, so interactive clicks interleave with a long generation).
    """

    def __init__(self, predictor: ImagePredictor, config: AutoMaskConfig | None = None):
        self.predictor = predictor
        self.config = config or AutoMaskConfig()
        self.points_decoded = 0  # grid points sent to the decoder, over all calls

    def generate(
        self,
        image_key: str,
        image: np.ndarray | Callable[[], np.ndarray],
        rois_xyxy: np.ndarray | None = None,
        image_hw: tuple[int, int] | None = None,
    ) -> list[AutoMask]:
        """All masks of the image, or of the regions of interest.

        Arguments:
            image_key: identifies the image's content (the embedding cache key).
            image: (H, W, 3) uint8 RGB, or a function returning it (called only when needed).
            rois_xyxy: (R, 4) float pixels x1, y1, x2, y2; None for the whole image. Masks are
                clipped to their ROI.
            image_hw: (H, W), when known, spares loading the pixels for an image whose whole
                embedding is cached.
        Returns:
            AutoMask list, best predicted IoU first.
        """
        cfg = self.config
        rgb_memo: list[np.ndarray] = []

        def rgb() -> np.ndarray:
            if not rgb_memo:
                rgb_memo.append(image() if callable(image) else image)
            return rgb_memo[0]

        regions, hw = self._regions(image_key, rgb, rois_xyxy, image_hw)
        if not regions:
            return []
        per_region = [self._candidates(r) for r in regions]
        cands = [c.take(box_nms(c.boxes, c.scores, cfg.box_nms_thresh)) for c in per_region]
        masks: list[AutoMask] = []
        for region, c in zip(regions, cands, strict=True):
            masks += self._materialise(region, c, hw)
        if len(regions) > 1:  # overlapping ROIs can find one object twice
            keep = box_nms(
                np.array([m.box for m in masks]).reshape(-1, 4),
                np.array([m.score for m in masks]),
                cfg.box_nms_thresh,
            )
            masks = [masks[i] for i in keep]
        masks = [m for m in masks if m.area >= max(cfg.min_area_px, 1)]
        if cfg.mask_nms_thresh is not None:
            masks = mask_nms(masks, cfg.mask_nms_thresh)
        masks.sort(key=lambda m: -m.score)
        return masks[: cfg.max_masks] if cfg.max_masks is not None else masks

    # --- steps -------------------------------------------------------------------------------

    def _regions(self, image_key, rgb, rois_xyxy, image_hw) -> tuple[list[_Region], tuple[int, int]]:
        """The embedded windows to put grids on, and the full image's (H, W)."""
        if rois_xyxy is None:
            emb = self.predictor.embedding(image_key, rgb)
            h, w = emb.original_hw
            return [_Region(emb, (0, 0), (0, 0, w, h))], (h, w)
        rois = np.asarray(rois_xyxy, np.float64).reshape(-1, 4)
        h, w = tuple(image_hw) if image_hw is not None else rgb().shape[:2]
        regions = []
        full = None
        for x1, y1, x2, y2 in rois:
            box = (
                max(0, math.floor(x1)),
                max(0, math.floor(y1)),
                min(w, math.ceil(x2)),
                min(h, math.ceil(y2)),
            )
            if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                continue  # a ROI of less than 2 px a side holds nothing to segment
            if self.config.crop_rois:
                bx1, by1, bx2, by2 = box
                key = f"{image_key}#crop={bx1},{by1},{bx2},{by2}"
                emb = self.predictor.embedding(key, lambda b=box: _crop(rgb(), b))
                regions.append(_Region(emb, (bx1, by1), box))
            else:
                if full is None:
                    full = self.predictor.embedding(image_key, rgb)
                regions.append(_Region(full, (0, 0), box))
        return regions, (h, w)

    def _candidates(self, region: _Region) -> _Candidates:
        """Decode the grid over `region` in batches; keep what passes the IoU and stability filters."""
        cfg = self.config
        ox, oy = region.offset
        cx1, cy1, cx2, cy2 = region.clip
        grid = point_grid(cfg.points_per_side) * [cx2 - cx1, cy2 - cy1] + [cx1 - ox, cy1 - oy]
        local_h, local_w = region.emb.original_hw
        parts: list[_Candidates] = []
        low_hw = None
        plan = _FastPlan(cfg, (local_h, local_w)) if cfg.skip_covered else None
        for ids in _plan_batches(cfg, grid, plan):
            pts = grid[ids]
            logits, iou = self._decode_points(region.emb, pts)  # (b, k, h, w), (b, k)
            b, k, h, w = logits.shape
            low_hw = (h, w)
            if plan is not None:
                plan.decoded(ids, iou.max(dim=1).values.numpy())
            logits = logits.reshape(b * k, h, w)
            iou = iou.reshape(b * k)
            point_of = torch.arange(b).repeat_interleave(k)
            # cheapest filter first: the predicted IoU; stability and boxes only for survivors
            idx = (iou >= cfg.pred_iou_thresh).nonzero().flatten()
            stab = stability_scores(logits[idx], cfg.stability_offset)
            idx, stab = idx[stab >= cfg.stability_thresh], stab[stab >= cfg.stability_thresh]
            boxes = mask_boxes(logits[idx] > 0)
            nonempty = boxes[:, 2] > boxes[:, 0]
            idx, stab, boxes = idx[nonempty], stab[nonempty], boxes[nonempty]
            if len(idx) == 0:
                continue
            if plan is not None:
                plan.kept(logits[idx], iou[idx], stab)
            scale = np.array([local_w / w, local_h / h] * 2)
            boxes_px = boxes.numpy() * scale + [ox, oy, ox, oy]
            boxes_px = np.clip(boxes_px, [cx1, cy1, cx1, cy1], [cx2, cy2, cx2, cy2])
            parts.append(
                _Candidates(
                    logits[idx].to(torch.float16),
                    boxes_px,
                    iou[idx].clamp(0, 1).numpy().astype(np.float64),
                    stab.numpy().astype(np.float64),
                    pts[point_of[idx].numpy()] + [ox, oy],
                )
            )
        if not parts:
            return _Candidates.empty(low_hw or (1, 1))
        return _Candidates(
            torch.cat([p.logits for p in parts]),
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.stability for p in parts]),
            np.concatenate([p.points for p in parts]),
        )

    @torch.inference_mode()
    def _decode_points(self, emb: ImageEmbedding, points_xy: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One positive point per prompt, three candidates each, in one decoder call.

        Arguments:
            points_xy: (B, 2) float, continuous pixels of the embedded image.
        Returns:
            low-res logits (B, 3, h, w) float32 on the CPU, predicted IoU (B, 3).
        """
        self.points_decoded += len(points_xy)
        ones = np.ones(1, np.int64)
        prompts = [Prompt(np.asarray(p, np.float32)[None], ones) for p in points_xy]
        # candidates under the IoU bar are dropped: the decoder need not upscale their masks
        logits, iou, _ = self.predictor.decode_logits(emb, prompts, min_iou=self.config.pred_iou_thresh)
        return logits.cpu(), iou.cpu()

    def _materialise(self, region: _Region, c: _Candidates, hw: tuple[int, int]) -> list[AutoMask]:
        """Upscale the kept candidates to the region's size and cut them to their pixel boxes."""
        ox, oy = region.offset
        cx1, cy1, cx2, cy2 = region.clip
        out = []
        for i in range(len(c.scores)):
            full = upscale_logits(c.logits[i : i + 1].float(), region.emb.original_hw)[0] > 0
            local = full[cy1 - oy : cy2 - oy, cx1 - ox : cx2 - ox]
            rows = local.any(dim=1).nonzero().flatten()
            cols = local.any(dim=0).nonzero().flatten()
            if len(rows) == 0:
                continue
            y1, y2 = int(rows[0]), int(rows[-1]) + 1
            x1, x2 = int(cols[0]), int(cols[-1]) + 1
            patch = local[y1:y2, x1:x2].numpy().copy()
            out.append(
                AutoMask(
                    patch,
                    (x1 + cx1, y1 + cy1, x2 + cx1, y2 + cy1),
                    hw,
                    float(c.scores[i]),
                    float(c.stability[i]),
                    c.points[i].astype(np.float64),
                )
            )
        return out


def _plan_batches(cfg: AutoMaskConfig, grid: np.ndarray, plan: _FastPlan | None):
    """Index arrays of grid points to decode, batch by batch: all in order; or the fast mode's
    choice, asked of `plan` just before each batch (the caller updates it in between)."""
    size = cfg.points_per_batch
    if plan is None:
        for start in range(0, len(grid), size):
            yield np.arange(start, min(start + size, len(grid)))
        return
    n = cfg.points_per_side
    row, col = np.divmod(np.arange(len(grid)), n)
    st = cfg.coarse_step
    coarse = (row % st == st // 2) & (col % st == st // 2)
    plan.start(row, col, coarse)
    coarse_ids = np.flatnonzero(coarse)
    for start in range(0, len(coarse_ids), size):
        yield coarse_ids[start : start + size]
    pending = list(np.flatnonzero(~coarse))
    while pending:
        batch = []
        while pending and len(batch) < size:
            i = pending.pop(0)
            if plan.wanted(i, grid[i]):
                batch.append(i)
        if batch:
            yield np.asarray(batch)


class _FastPlan:
    """What the fast mode knows while it decodes a grid: each decoded point's best predicted IoU
    and the union of the confident, not too large masks kept so far (low-res)."""

    def __init__(self, cfg: AutoMaskConfig, local_hw: tuple[int, int]):
        self.cfg = cfg
        self.local_hw = local_hw
        self.covered: torch.Tensor | None = None

    def start(self, row: np.ndarray, col: np.ndarray, coarse: np.ndarray) -> None:
        self.row, self.col, self.coarse = row, col, coarse
        self.best_iou = np.full(len(row), -np.inf)

    def decoded(self, ids: np.ndarray, best_iou: np.ndarray) -> None:
        self.best_iou[ids] = best_iou

    def kept(self, logits: torch.Tensor, iou: torch.Tensor, stability: torch.Tensor) -> None:
        """Candidates that passed the filters: (N, h, w) logits, (N,) predicted IoU, stability."""
        cfg = self.cfg
        masks = logits[(iou >= cfg.cover_iou_thresh) & (stability >= cfg.cover_stability_thresh)] > 0
        masks = masks[masks.flatten(1).float().mean(-1) <= cfg.cover_max_area]
        if len(masks):
            union = masks.any(dim=0)
            self.covered = union if self.covered is None else self.covered | union

    def wanted(self, i: int, xy: np.ndarray) -> bool:
        """Should grid point i (at xy, pixels of the embedded window) be decoded?"""
        if self.covered is not None and _inside(self.covered, xy, self.local_hw):
            return False
        cfg = self.cfg
        if cfg.fine_iou_margin is None:
            return True
        st = cfg.coarse_step
        near = self.coarse & (np.abs(self.row - self.row[i]) < st) & (np.abs(self.col - self.col[i]) < st)
        if not near.any():  # a grid too small for a coarse point nearby: decode it
            return True
        return bool((self.best_iou[near] >= cfg.pred_iou_thresh - cfg.fine_iou_margin).any())


def _inside(mask: torch.Tensor, xy: np.ndarray, local_hw: tuple[int, int]) -> bool:
    """Is the point (continuous pixels of the embedded window) inside the low-res mask?"""
    h, w = mask.shape
    x = min(int(xy[0] / local_hw[1] * w), w - 1)
    y = min(int(xy[1] / local_hw[0] * h), h - 1)
    return bool(mask[max(y, 0), max(x, 0)])


def _crop(rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    return np.ascontiguousarray(rgb[y1:y2, x1:x2])
