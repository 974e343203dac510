"""Bulk pre-annotation of Label Studio tasks: boxes to masks or automatic masks for one task.

The adapter's side of bulk work: which rectangles of which annotation, which image, which output
control, and the task's results entry. The options and the automatic masks themselves are the
service's (`label_studio_sam2.service.bulk`).

Boxes mode is `label_studio_sam2.labelstudio.protocol.boxes_to_masks` (one encoder pass per
image, the boxes of the image in decoder calls of DECODE_BATCH); auto mode is the service's
`auto_masks` (label_studio_sam2.engine.automask) on the same predictor and media client. The output format (brush RLE or polygons) follows the label
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

from label_studio_sam2.labelstudio.protocol import (
    LabelConfig,
    ObjectRequest,
    boxes_to_masks,
    rectangles_of_annotation,
    task_data_url,
)
from label_studio_sam2.labelstudio.regions import OUTPUT_TAGS, mask_result, task_entry
from label_studio_sam2.service.bulk import PreannotateOptions, auto_masks
from label_studio_sam2.service.errors import BadRequest, TaskError
from label_studio_sam2.service.segment import MAX_REGIONS


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
        masks = auto_masks(self.segmenter.predictor, image, self.options, rois)
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
