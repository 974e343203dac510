"""Label Studio regions, built and read in one place.

What this backend writes (`brushlabels` RLE regions, `polygonlabels` regions, the per-task
results entry), the output control tags, percent rectangle <-> pixel box, and "the latest
annotation (or prediction) of a task". Label Studio's coordinates are percent of the displayed
(EXIF-rotated) image; pixel boxes here are continuous (x1, y1, x2, y2), x2 = last column + 1.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Protocol

import numpy as np

from label_studio_sam2.labelstudio.polygons import DEFAULT_TOLERANCE_PX, mask_polygons
from label_studio_sam2.labelstudio.rle import encode_mask

OUTPUT_TAGS = ("brushlabels", "polygonlabels")  # control tags masks are returned into


class OutputControl(Protocol):
    """The control a region belongs to (label_studio_sam2.labelstudio.protocol.Control)."""

    name: str
    to_name: str
    tag: str


def new_region_id() -> str:
    return uuid.uuid4().hex[:10]


def region(
    control: OutputControl, size_hw: tuple[int, int], value: dict, score: float, rid: str | None = None
) -> dict[str, Any]:
    """One image region of `control`'s type. `size_hw` is the displayed image size, which becomes
    original_width/height."""
    h, w = size_hw
    return {
        "id": rid or new_region_id(),
        "from_name": control.name,
        "to_name": control.to_name,
        "type": control.tag,
        "original_width": int(w),
        "original_height": int(h),
        "image_rotation": 0,
        "value": value,
        "score": float(score),
        "readonly": False,
    }


def brush_result(
    mask: np.ndarray, label: str | None, control: OutputControl, score: float, region_id: str | None = None
) -> dict[str, Any]:
    """One `brushlabels` region. `mask` is (H, W) bool at the displayed image size, which becomes
    original_width/height (LS needs the RLE length to equal naturalWidth*naturalHeight*4)."""
    value = {"format": "rle", "rle": encode_mask(mask), "brushlabels": [label] if label else []}
    return region(control, mask.shape, value, score, region_id)


def polygon_results(
    mask: np.ndarray,
    label: str | None,
    control: OutputControl,
    score: float,
    tolerance_px: float | None = None,
    region_id: str | None = None,
) -> list[dict[str, Any]]:
    """`polygonlabels` regions for a mask: one per connected part (see label_studio_sam2.labelstudio.polygons).

    Arguments:
        mask: (H, W) bool at the displayed image size (original_width/height).
        label: the label, or None for none.
        control: the PolygonLabels control the regions belong to.
        score: the region score (the same for every part).
        tolerance_px: simplification tolerance in pixels (None: DEFAULT_TOLERANCE_PX).
        region_id: the first part's id (the others get `<id>_<k>`); random when None.
    Returns:
        list of result dicts, largest part first; empty for an empty mask.
    """
    h, w = mask.shape
    tol = DEFAULT_TOLERANCE_PX if tolerance_px is None else float(tolerance_px)
    base = region_id or new_region_id()
    scale = np.array([100.0 / w, 100.0 / h])
    out = []
    for k, ring in enumerate(mask_polygons(mask, tol)):
        points = np.clip(ring * scale, 0.0, 100.0).round(4)
        value = {"points": points.tolist(), "closed": True, "polygonlabels": [label] if label else []}
        out.append(region(control, (h, w), value, score, base if k == 0 else f"{base}_{k}"))
    return out


def mask_result(
    mask: np.ndarray, label: str | None, control: OutputControl, score: float, **kw
) -> list[dict[str, Any]]:
    """The region(s) for a mask in the format of `control` (brush, or polygons if the config's
    output control is PolygonLabels). An empty mask gives no region."""
    if not mask.any():
        return []
    if control.tag == "polygonlabels":
        return polygon_results(mask, label, control, score, **kw)
    return [brush_result(mask, label, control, score, kw.get("region_id"))]


def task_entry(
    result: list[dict], model_version: str, score: float | None = None, error: str | None = None
) -> dict:
    """One entry of /predict's `results` (exactly one per task). `score` defaults to the mean of
    the regions' scores."""
    if score is None:
        scores = [r["score"] for r in result if isinstance(r.get("score"), (int, float))]
        score = float(np.mean(scores)) if scores else 0.0
    entry: dict[str, Any] = {"result": result, "score": float(score), "model_version": model_version}
    if error:
        entry["error"] = error
    return entry


# --- reading -----------------------------------------------------------------------------------


def rect_to_box_px(
    rect_pct: tuple[float, float, float, float], rotation: float, width: int, height: int
) -> np.ndarray:
    """A Label Studio rectangle (x, y, width, height in percent, `rotation` degrees clockwise
    about (x, y)) -> (4,) x1, y1, x2, y2 in continuous pixels, clipped to the image; for a
    rotated rectangle the axis-aligned box that encloses it."""
    x, y, w, h = rect_pct
    x0, y0 = x * width / 100.0, y * height / 100.0
    wp, hp = w * width / 100.0, h * height / 100.0
    if rotation % 360:
        a = math.radians(rotation)
        c, s = math.cos(a), math.sin(a)
        corners = np.array([[0, 0], [wp, 0], [wp, hp], [0, hp]]) @ np.array([[c, s], [-s, c]])
        corners += [x0, y0]
        x1, y1 = corners.min(axis=0)
        x2, y2 = corners.max(axis=0)
    else:
        x1, y1, x2, y2 = x0, y0, x0 + wp, y0 + hp
    box = np.array([x1, y1, x2, y2], dtype=np.float64)
    return np.clip(box, 0, [width, height, width, height])


def box_to_rect_pct(box: tuple[float, float, float, float], width: int, height: int) -> dict[str, float]:
    """Continuous pixel box -> {"x", "y", "width", "height"} in percent (4 decimals), inside the
    image."""
    x1, y1, x2, y2 = box
    x, y = _pct(x1, width), _pct(y1, height)
    return {
        "x": x,
        "y": y,
        "width": min(_pct(x2 - x1, width), round(100.0 - x, 4)),
        "height": min(_pct(y2 - y1, height), round(100.0 - y, 4)),
    }


def _pct(pixels: float, side: int) -> float:
    return round(min(100.0, max(0.0, pixels * 100.0 / side)), 4)


def latest(items: Any) -> dict | None:
    """The latest of a task's annotations (or predictions) that was not cancelled: by
    updated_at (else created_at), then id. None when there is none."""
    if not isinstance(items, list):
        return None
    kept = [a for a in items if isinstance(a, dict) and not a.get("was_cancelled")]
    return max(kept, key=_recency, default=None)


def _recency(annotation: dict) -> tuple[str, int]:
    pk = annotation.get("id")
    when = annotation.get("updated_at") or annotation.get("created_at") or ""
    return (str(when), pk if isinstance(pk, int) and not isinstance(pk, bool) else 0)
