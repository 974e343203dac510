"""Bulk pre-annotation, tool-neutral: its options and the automatic masks of an image.

What a tool's bulk job asks for (`PreannotateOptions`: boxes to masks or automatic masks, and
how) and the automatic masks themselves (`auto_masks`, optionally inside boxes in pixels). Boxes
to masks is `label_studio_sam2.service.segment.ImageSegmenter.segment` with box prompts. Which
boxes of which task, and the results written back, are the adapter's (Label Studio's:
`label_studio_sam2.labelstudio.bulk.Preannotator`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from label_studio_sam2.engine.automask import AutoMaskConfig, AutoMaskGenerator
from label_studio_sam2.service.bulk_options import MODES, OUTPUTS, SOURCES
from label_studio_sam2.service.media import ImageFile


@dataclass(frozen=True)
class PreannotateOptions:
    """What to pre-annotate and how (environment: see Settings; CLI: see label_studio_sam2.cli.parsers).

    mode: "boxes" (a mask per rectangle) or "auto" (automatic masks).
    boxes_from: rectangles of the task's latest "annotation" or latest "prediction".
    output: "auto" (the label config's BrushLabels, else PolygonLabels), "brush" or "polygon".
    auto_label: label of automatic masks (None: the output control's first label).
    roi_label: automatic masks only inside rectangles with this label (None: whole image).
    """

    mode: str = "boxes"
    boxes_from: str = "annotation"
    output: str = "auto"
    polygon_tolerance_px: float = 1.0
    auto_label: str | None = None
    roi_label: str | None = None
    points_per_side: int = 16
    iou_thresh: float = 0.8
    stability_thresh: float = 0.92
    min_area_px: int = 100
    max_masks: int = 100
    auto_fast: bool = (
        False  # skip grid points inside masks already found (label_studio_sam2.engine.automask skip_covered)
    )

    def __post_init__(self):
        for name, value, allowed in (
            ("mode", self.mode, MODES),
            ("boxes_from", self.boxes_from, SOURCES),
            ("output", self.output, OUTPUTS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.points_per_side < 1 or self.max_masks < 1 or self.polygon_tolerance_px < 0:
            raise ValueError("points_per_side and max_masks must be >= 1, polygon tolerance >= 0")

    @classmethod
    def from_settings(cls, settings, **overrides) -> PreannotateOptions:
        values = dict(
            mode=settings.retrieve_mode if settings.retrieve_mode in MODES else "boxes",
            boxes_from=settings.boxes_from,
            output=settings.output,
            polygon_tolerance_px=settings.polygon_tolerance,
            auto_label=settings.auto_label,
            roi_label=settings.roi_label,
            points_per_side=settings.points_per_side,
            iou_thresh=settings.auto_iou_thresh,
            stability_thresh=settings.auto_stability_thresh,
            min_area_px=settings.min_area,
            max_masks=settings.max_masks,
            auto_fast=settings.auto_fast,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def auto_config(self):
        return AutoMaskConfig(
            points_per_side=self.points_per_side,
            pred_iou_thresh=self.iou_thresh,
            stability_thresh=self.stability_thresh,
            min_area_px=self.min_area_px,
            max_masks=self.max_masks,
            skip_covered=self.auto_fast,
        )


def auto_masks(
    predictor, image: ImageFile, options: PreannotateOptions, rois_px: np.ndarray | None = None
) -> list:
    """Automatic masks of `image` with `options` (grid, thresholds, at most `max_masks`), only
    inside the (K, 4) pixel boxes `rois_px` when given: label_studio_sam2.engine.automask masks
    (`.full()`: (H, W) bool, `.score`)."""
    generator = AutoMaskGenerator(predictor, options.auto_config())
    return generator.generate(image.key, image.load, rois_px, image_hw=(image.height, image.width))
