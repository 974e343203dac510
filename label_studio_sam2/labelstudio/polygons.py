"""Masks -> polygon rings for Label Studio `polygonlabels` regions (label_studio_sam2.labelstudio.regions builds them).

Label Studio polygons are one closed ring of points in percent of the image, with no holes. A mask
is turned into polygons like this:

- Every connected part (8-connected, OpenCV's outer contours) becomes its own region: an object in
  several pieces gives several polygons with the same label and score.
- Holes are kept by a "keyhole" cut: each hole's ring is spliced into its outer ring at the
  closest pair of vertices, so the one ring walks around the outside, in along a zero-width cut,
  around the hole the other way, and back out. Filled with the even-odd or the non-zero rule (the
  hole runs the opposite way), the hole stays empty; the cut adds a line of zero width. Label
  Studio draws and exports the ring as given.
- Rings are simplified with Douglas-Peucker (`cv2.approxPolyDP`) to `tolerance_px` pixels; parts
  and holes left with fewer than 3 vertices (specks, hairlines) are dropped.
- Vertices are pixel centres: pixel (col, row) is the point (col + 0.5, row + 0.5) in continuous
  coordinates, so the outline runs half a pixel inside the mask's edge.
"""

from __future__ import annotations

import cv2
import numpy as np

DEFAULT_TOLERANCE_PX = 1.0


def mask_polygons(mask: np.ndarray, tolerance_px: float = DEFAULT_TOLERANCE_PX) -> list[np.ndarray]:
    """The rings of a mask, one per connected part, holes spliced in.

    Arguments:
        mask: (H, W) bool.
        tolerance_px: Douglas-Peucker tolerance in pixels (0 keeps every boundary pixel's corner).
    Returns:
        list of (K, 2) float arrays, continuous pixels XY (pixel centres), largest part first.
    """
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if not m.any():
        return []
    # RETR_CCOMP: a two-level hierarchy, outer rings and the holes directly inside them (an
    # island inside a hole is an outer ring of its own again).
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    parts: list[tuple[float, np.ndarray]] = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1:
            continue  # a hole; handled with its parent
        outer = _simplify(contour, tolerance_px)
        if outer is None:
            continue
        area = abs(cv2.contourArea(outer.astype(np.float32)))
        child = hierarchy[i][2]
        while child != -1:
            hole = _simplify(contours[child], tolerance_px)
            if hole is not None:
                outer = _splice(outer, hole)
            child = hierarchy[child][0]
        parts.append((area, outer + 0.5))
    parts.sort(key=lambda p: -p[0])
    return [ring for _, ring in parts]


def _simplify(contour: np.ndarray, tolerance_px: float) -> np.ndarray | None:
    ring = contour.reshape(-1, 2)
    if tolerance_px > 0 and len(ring) > 3:
        ring = cv2.approxPolyDP(contour, float(tolerance_px), True).reshape(-1, 2)
    if len(ring) < 3:
        return None
    return ring.astype(np.float64)


def _splice(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """One ring: outer[..i], hole[j..], hole[..j], hole[j], outer[i], outer[i+1..] (i, j the
    closest pair of vertices), i.e. a zero-width cut from outer[i] to hole[j] and back."""
    d = ((outer[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    hole_loop = np.concatenate([hole[j:], hole[: j + 1]])
    return np.concatenate([outer[: i + 1], hole_loop, outer[i:]])
