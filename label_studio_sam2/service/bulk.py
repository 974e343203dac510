"""Bulk pre-annotation: boxes to masks or automatic masks for one task, with its options.

Boxes mode is `label_studio_sam2.labelstudio.protocol.boxes_to_masks` (one encoder pass per image, the boxes of the image
in decoder calls of DECODE_BATCH); auto mode is `label_studio_sam2.engine.automask.AutoMaskGenerator`
on the same predictor and media client. The output format (brush RLE or polygons) follows the label
config, or the `output` option.

One engine (`Preannotator`) serves two callers:

- "Retrieve predictions" in Label Studio (/predict without context):
  `label_studio_sam2.labelstudio.retrieve` runs the engine while the request's deadline allows and
  hands the rest of the selection to the process's background job (`Runtime.background_job`),
  which writes their predictions through the LS API.
- `label-studio-sam2 preannotate --project ID` (`label_studio_sam2.cli.preannotate`):
  `label_studio_sam2.labelstudio.project_job.run_project` over a whole project, pipelined,
  resumable, Ctrl-C safe, with retries on Label Studio errors.

Nothing a labeler made is touched: only predictions are written, never annotations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from label_studio_sam2.engine.automask import AutoMaskConfig, AutoMaskGenerator
from label_studio_sam2.labelstudio.protocol import (
    LabelConfig,
    ObjectRequest,
    boxes_to_masks,
    rectangles_of_annotation,
    task_data_url,
)
from label_studio_sam2.labelstudio.regions import OUTPUT_TAGS, mask_result, task_entry
from label_studio_sam2.service.bulk_options import MODES, OUTPUTS, SOURCES
from label_studio_sam2.service.errors import BadRequest, TaskError
from label_studio_sam2.service.segment import MAX_REGIONS


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


def output_view(config: LabelConfig, output: str) -> LabelConfig:
    """The label config as the engine sees it: with OUTPUT=brush (polygon) only the BrushLabels
    (PolygonLabels) controls are outputs. Raises BadRequest if the config has none of them."""
    if output == "auto":
        return config
    keep, drop = ("brushlabels", "polygonlabels") if output == "brush" else ("polygonlabels", "brushlabels")
    if not config.controls_of(keep):
        raise BadRequest(
            f"output {output!r} needs a {'BrushLabels' if output == 'brush' else 'PolygonLabels'} "
            "control in the label config"
        )
    return replace(config, controls=[c for c in config.controls if c.tag != drop])


def auto_target(config: LabelConfig, to_name: str, auto_label: str | None):
    """(control, label) automatic masks go to. Raises BadRequest for a label the control lacks."""
    control = config.output_control(to_name, auto_label)
    if auto_label and control.labels and auto_label not in control.labels:
        raise BadRequest(
            f"automatic-mask label {auto_label!r} is not a label of {control.name!r} "
            f"(its labels: {', '.join(control.labels)})"
        )
    return control, auto_label or (control.labels[0] if control.labels else None)


# --- the engine --------------------------------------------------------------------------------


@dataclass
class Plan:
    """What the engine will do with a task, decided from its JSON alone (no media)."""

    to_name: str | None  # the image to load; None: nothing to do (see `skip`)
    skip: str | None = None
    rois: list[ObjectRequest] = field(default_factory=list)


@dataclass
class Outcome:
    entry: dict | None  # the task's results entry; None when there was nothing to predict
    skip: str | None = None


class Preannotator:
    """Boxes to masks or automatic masks for one task at a time.

    `segmenter` is the backend's ImageSegmenter: boxes mode is `boxes_to_masks` on it (one encoder
    pass, the boxes of the image in decoder calls of DECODE_BATCH); auto mode uses its predictor
    and media client. Raises TaskError for what is wrong with one task, BadRequest for what is wrong
    with the label config or the options (every task would fail).
    """

    def __init__(self, segmenter, options: PreannotateOptions):
        self.segmenter = segmenter
        self.options = options

    @property
    def model_version(self) -> str:
        return self.segmenter.model_version

    def check(self, config: LabelConfig) -> LabelConfig:
        """Validate the label config for these options once; returns the engine's view of it."""
        view = output_view(config, self.options.output)
        if (self.options.mode == "boxes" or self.options.roi_label) and not view.controls_of(
            "rectanglelabels"
        ):
            raise BadRequest(
                "boxes mode and ROI_LABEL read RectangleLabels regions, and the label config has none"
            )
        if self.options.mode == "auto":
            auto_target(view, _output_image(view), self.options.auto_label)
        return view

    def plan(self, task: dict, config: LabelConfig) -> Plan:
        o = self.options
        if o.mode == "boxes":
            rects = self._rectangles(task, config)
            if not rects:
                return Plan(None, f"no rectangle in the latest {o.boxes_from}")
            return Plan(rects[0].to_name)
        to_name = _output_image(config)
        if not o.roi_label:
            return Plan(to_name)
        rois = [r for r in self._rectangles(task, config) if r.label == o.roi_label and r.to_name == to_name]
        if not rois:
            return Plan(None, f"no {o.roi_label!r} rectangle in the latest {o.boxes_from}")
        return Plan(to_name, rois=rois)

    def predict(self, task: dict, config: LabelConfig, deadline: float | None = None) -> Outcome:
        """`deadline` (time.monotonic()): boxes mode checks it between decoder batches and raises
        label_studio_sam2.service.segment.TaskDeadline past it."""
        view = output_view(config, self.options.output)
        plan = self.plan(task, view)
        if plan.to_name is None:
            return Outcome(None, plan.skip)
        if self.options.mode == "boxes":
            tolerance = self.options.polygon_tolerance_px
            return Outcome(
                boxes_to_masks(
                    self.segmenter,
                    task,
                    view,
                    self.options.boxes_from,
                    deadline=deadline,
                    tolerance_px=tolerance,
                )
            )
        return Outcome(self._auto(task, view, plan))

    def _rectangles(self, task: dict, config: LabelConfig) -> list[ObjectRequest]:
        try:
            return rectangles_of_annotation(
                task, config, self.options.boxes_from, getattr(self.segmenter, "max_regions", MAX_REGIONS)
            )
        except BadRequest as e:  # one task's broken region must not sink the others
            raise TaskError(f"task {task.get('id')}: {e.message}") from None

    def _auto(self, task: dict, config: LabelConfig, plan: Plan) -> dict:
        control, label = auto_target(config, plan.to_name, self.options.auto_label)
        url = task_data_url(task, config, plan.to_name)
        image = self.segmenter.media.load_image(url, task.get("id"))
        rois = None
        if plan.rois:
            rois = np.array([r.box_px(image.width, image.height) for r in plan.rois])
        generator = AutoMaskGenerator(self.segmenter.predictor, self.options.auto_config())
        masks = generator.generate(image.key, image.load, rois, image_hw=(image.height, image.width))
        result = []
        for m in masks:
            result += mask_result(
                m.full(), label, control, m.score, tolerance_px=self.options.polygon_tolerance_px
            )
        return task_entry(result, self.model_version)


def _output_image(config: LabelConfig) -> str:
    """The image automatic masks are made for: the one the first output control points at."""
    outputs = [c for tag in OUTPUT_TAGS for c in config.controls_of(tag)]
    if not outputs:
        raise BadRequest("the label config has no BrushLabels or PolygonLabels control for the masks")
    return outputs[0].to_name
