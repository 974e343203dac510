"""Masks -> Label Studio result dicts (brush RLE, polygons) and per-task results entries."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from backend.protocol import Control
from backend.rle import encode_mask


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


def brush_result(
    mask: np.ndarray, label: str | None, control: Control, score: float, region_id: str | None = None
) -> dict[str, Any]:
    """One `brushlabels` region. `mask` is (H, W) bool at the displayed image size, which becomes
    original_width/height (LS needs the RLE length to equal naturalWidth*naturalHeight*4)."""
    h, w = mask.shape
    return {
        "id": region_id or _region_id(),
        "from_name": control.name,
        "to_name": control.to_name,
        "type": "brushlabels",
        "original_width": int(w),
        "original_height": int(h),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": encode_mask(mask), "brushlabels": [label] if label else []},
        "score": float(score),
        "readonly": False,
    }


def mask_result(
    mask: np.ndarray, label: str | None, control: Control, score: float, **kw
) -> list[dict[str, Any]]:
    """The region(s) for a mask in the format of `control` (brush, or polygons if the config's
    output control is PolygonLabels). An empty mask gives no region."""
    if not mask.any():
        return []
    if control.tag == "polygonlabels":
        from backend.polygons import polygon_results  # bulk/polygon output lives there

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
