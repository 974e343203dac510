"""Label Studio's side of a request: label config, regions, prompts, and the answer.

Label Studio sends coordinates in percent of the displayed (EXIF-rotated) image. This module
parses the label config (which controls point at which image, which data key holds the URL),
turns context regions into per-object requests, converts percent to continuous pixels once the
image size is known, and turns them into the service's neutral prompts
(`label_studio_sam2.service.segment.ObjectPrompt`, remembered under (project, task, image,
label)); the masks come back as brush-RLE or polygon regions in one results entry per task
(`answer_each`: `[]` for a task Label Studio must store nothing for). It knows nothing about torch.
"""

from __future__ import annotations

import logging
import math
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from label_studio_sam2.labelstudio.regions import OUTPUT_TAGS, latest, mask_result, rect_to_box_px, task_entry
from label_studio_sam2.service.errors import BackendError, BadRequest, TaskError
from label_studio_sam2.service.promptmemory import PromptMemory, Remembered  # noqa: F401 (moved there)
from label_studio_sam2.service.segment import MAX_REGIONS, ImageSegmenter, ObjectPrompt

log = logging.getLogger(__name__)

INPUT_TAGS = ("keypointlabels", "rectanglelabels")
OBJECT_TAGS = ("image", "video")


@dataclass(frozen=True)
class Control:
    """A control tag (BrushLabels, KeyPointLabels, ...) of the label config."""

    name: str
    tag: str  # lower case: "brushlabels", "keypointlabels", ...
    to_name: str
    labels: tuple[str, ...]
    smart: bool = False
    attrs: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class ObjectTag:
    """An object tag (Image, Video): `value_key` is the task data key ("$image" -> "image")."""

    name: str
    tag: str
    value_key: str
    attrs: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class LabelConfig:
    objects: dict[str, ObjectTag]
    controls: list[Control]

    def controls_of(self, tag: str, to_name: str | None = None) -> list[Control]:
        return [c for c in self.controls if c.tag == tag and (to_name is None or c.to_name == to_name)]

    def data_key(self, to_name: str) -> str:
        obj = self.objects.get(to_name)
        if obj is None:
            raise BadRequest(f"label config has no object tag named {to_name!r}")
        return obj.value_key

    def output_control(self, to_name: str, label: str | None) -> Control:
        """Where a mask for `label` on `to_name` goes: the BrushLabels (else PolygonLabels) control
        that has this label, else the first such control on that image."""
        candidates = [c for tag in OUTPUT_TAGS for c in self.controls_of(tag, to_name)]
        if not candidates:
            raise BadRequest(
                f"label config has no BrushLabels or PolygonLabels control with toName={to_name!r}: "
                "SAM2 needs one to return masks into"
            )
        for c in candidates:
            if label in c.labels:
                return c
        return candidates[0]

    def images(self) -> list[ObjectTag]:
        return [o for o in self.objects.values() if o.tag == "image"]

    def videos(self) -> list[ObjectTag]:
        return [o for o in self.objects.values() if o.tag == "video"]


def parse_label_config(xml: str | None) -> LabelConfig:
    """Parse a Label Studio label config. Raises BadRequest on malformed XML."""
    if not xml or not isinstance(xml, str):
        raise BadRequest(
            "label_config is missing: send it in the request (Label Studio does) or call /setup first"
        )
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise BadRequest(f"label_config is not valid XML: {e}") from None
    objects: dict[str, ObjectTag] = {}
    controls: list[Control] = []
    for el in root.iter():
        tag = el.tag.lower()
        attrs = {k.lower(): v for k, v in el.attrib.items()}
        if tag in OBJECT_TAGS and "name" in attrs:
            value = attrs.get("value", "")
            objects[attrs["name"]] = ObjectTag(attrs["name"], tag, value.lstrip("$"), attrs)
        elif "toname" in attrs and "name" in attrs:
            labels = tuple(
                child.attrib.get("value", "")
                for child in el
                if child.tag.lower() == "label" and child.attrib.get("value")
            )
            smart = attrs.get("smart", "").lower() == "true" or attrs.get("smartonly", "").lower() == "true"
            controls.append(Control(attrs["name"], tag, attrs["toname"].split(",")[0], labels, smart, attrs))
    return LabelConfig(objects, controls)


# --- regions -> object requests ---------------------------------------------------------------


@dataclass
class ObjectRequest:
    """One object the user wants segmented, in percent of the displayed image.

    points_pct: (N, 2) percent XY; point_labels: (N,) 1 positive / 0 negative;
    box_pct: (x1, y1, x2, y2) percent of the box (the enclosing box of a rotated rectangle is
    computed in pixels, see `box_px`), with `rotation` in degrees clockwise about (x1, y1).
    """

    to_name: str
    label: str | None
    from_name: str
    points_pct: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    rect_pct: tuple[float, float, float, float] | None = None  # x, y, width, height
    rotation: float = 0.0
    region_id: str | None = None

    def points_px(self, width: int, height: int) -> np.ndarray:
        return self.points_pct * np.array([width, height], dtype=np.float64) / 100.0

    def box_px(self, width: int, height: int) -> np.ndarray | None:
        """(4,) x1, y1, x2, y2 in continuous pixels, clipped to the image; for a rotated rectangle
        the axis-aligned box that encloses it."""
        if self.rect_pct is None:
            return None
        return rect_to_box_px(self.rect_pct, self.rotation, width, height)


def _num(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _region_label(region: dict, control: Control | None) -> str | None:
    value = region.get("value") or {}
    for key in (region.get("type"), "labels", "keypointlabels", "rectanglelabels"):
        labels = value.get(key) if key else None
        if isinstance(labels, list) and labels:
            return str(labels[0])
    return control.labels[0] if control and control.labels else None


# Default of MAX_POINTS_PER_TASK (label_studio_sam2.service.settings) for callers that pass none
# (MAX_REGIONS, of MAX_REGIONS_PER_TASK, is the service's): nothing parses an unbounded number of
# regions.
MAX_POINTS = 200


def parse_context(
    context: Any, config: LabelConfig, *, max_regions: int = MAX_REGIONS, max_points: int = MAX_POINTS
) -> list[ObjectRequest]:
    """Context regions -> one ObjectRequest per object.

    Keypoints of one (image, label) form one object (LS sends all of them on each click);
    each rectangle is one object. `is_positive` absent means positive (LS omits it for plain
    clicks; Alt-click sends false). Unknown region types are a BadRequest, and so are more than
    `max_regions` rectangles (MAX_REGIONS_PER_TASK) or `max_points` keypoints
    (MAX_POINTS_PER_TASK): refused as soon as the count passes, before any decoding work.
    """
    if context is None:
        return []
    if not isinstance(context, dict):
        raise BadRequest("context must be an object with a 'result' list")
    regions = context.get("result", [])
    if regions is None:
        return []
    if not isinstance(regions, list):
        raise BadRequest("context.result must be a list of regions")
    if len(regions) > max_regions + max_points:
        raise BadRequest(
            f"the task has {len(regions)} regions, over the limits of {max_regions} regions "
            f"(MAX_REGIONS_PER_TASK) and {max_points} keypoints (MAX_POINTS_PER_TASK) together"
        )
    controls = {c.name: c for c in config.controls}
    points: OrderedDict[tuple[str, str | None], ObjectRequest] = OrderedDict()
    objects: list[ObjectRequest] = []
    n_points = 0
    for i, region in enumerate(regions):
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            raise BadRequest(f"context.result[{i}] must be a region object with a 'value' object")
        for key in ("type", "from_name", "to_name"):
            if region.get(key) is not None and not isinstance(region[key], str):
                raise BadRequest(f"context.result[{i}].{key} must be a string")
        rtype = str(region.get("type", "")).lower()
        value = region["value"]
        from_name = region.get("from_name", "")
        control = controls.get(from_name)
        to_name = region.get("to_name") or (control.to_name if control else None)
        if not to_name:
            raise BadRequest(f"context.result[{i}] has no to_name")
        label = _region_label(region, control)
        if rtype == "keypointlabels":
            n_points += 1
            if n_points > max_points:
                raise BadRequest(_too_many(n_points, "keypoints", max_points, "MAX_POINTS_PER_TASK"))
            xy = (
                _num(value.get("x"), f"context.result[{i}].value.x"),
                _num(value.get("y"), f"context.result[{i}].value.y"),
            )
            positive = region.get("is_positive", True) is not False
            obj = points.get((to_name, label))
            if obj is None:
                obj = points[(to_name, label)] = ObjectRequest(
                    to_name, label, from_name, region_id=region.get("id")
                )
            obj.points_pct = np.vstack([obj.points_pct, [xy]])
            obj.point_labels = np.append(obj.point_labels, 1 if positive else 0)
            if len(objects) + len(points) > max_regions:
                raise BadRequest(_too_many(len(objects) + len(points), "regions", max_regions))
        elif rtype == "rectanglelabels":
            if len(objects) + len(points) >= max_regions:
                raise BadRequest(_too_many(len(objects) + len(points) + 1, "regions", max_regions))
            rect = tuple(
                _num(value.get(k), f"context.result[{i}].value.{k}") for k in ("x", "y", "width", "height")
            )
            if rect[2] <= 0 or rect[3] <= 0:
                raise BadRequest(f"context.result[{i}]: rectangle with non-positive width or height")
            rotation = _num(value.get("rotation", 0) or 0, f"context.result[{i}].value.rotation")
            objects.append(
                ObjectRequest(
                    to_name, label, from_name, rect_pct=rect, rotation=rotation, region_id=region.get("id")
                )
            )
        else:
            raise BadRequest(
                f"context.result[{i}] has region type {region.get('type')!r}: SAM2 prompts are "
                "keypointlabels (clicks) and rectanglelabels (boxes)"
            )
    return objects + list(points.values())


def _too_many(count: int, what: str, limit: int, setting: str = "MAX_REGIONS_PER_TASK") -> str:
    return f"the task has {count} {what} or more, over the limit of {limit} ({setting})"


def latest_annotation(task: dict, use: str = "annotation") -> dict | None:
    """The task's most recently updated annotation (or prediction, `use="prediction"`) that was
    not cancelled, or None."""
    field_name = "annotations" if use == "annotation" else "predictions"
    items = task.get(field_name) or []
    if not isinstance(items, list):
        raise TaskError(f"task {task.get('id')}: {field_name} must be a list")
    return latest(items)


def rectangles_of_annotation(
    task: dict, config: LabelConfig, use: str = "annotation", max_regions: int = MAX_REGIONS
) -> list[ObjectRequest]:
    """Rectangles of the task's latest annotation (or latest prediction, `use="prediction"`),
    for "boxes to masks" pre-annotation. Cancelled annotations are skipped. More than
    `max_regions` rectangles (MAX_REGIONS_PER_TASK) is a TaskError: that task only."""
    newest = latest_annotation(task, use)
    if newest is None:
        return []
    rects = [
        r for r in newest.get("result") or [] if isinstance(r, dict) and r.get("type") == "rectanglelabels"
    ]
    if not rects:
        return []
    if len(rects) > max_regions:
        raise TaskError(
            f"task {str(task.get('id'))[:40]!r}: its latest {use} has {len(rects)} rectangles, over the "
            f"limit of {max_regions} (MAX_REGIONS_PER_TASK)"
        )
    return [
        r for r in parse_context({"result": rects}, config, max_regions=max_regions) if r.rect_pct is not None
    ]


def task_data_url(task: dict, config: LabelConfig, to_name: str) -> str:
    """The media URL of `to_name` in this task's data (the key comes from the label config)."""
    data = task.get("data")
    if not isinstance(data, dict):
        raise TaskError(f"task {task.get('id')} has no data object")
    key = config.data_key(to_name)
    url = data.get(key)
    if not isinstance(url, str) or not url:
        raise TaskError(f"task {task.get('id')} has no {key!r} in its data (the label config reads ${key})")
    return url


MAX_TASK_ID = 10**18 - 1  # Label Studio's ids are 64-bit; 18 digits always fit


def check_task_ids(tasks: Any) -> None:
    """Refuse (400) a request whose tasks carry an id that is not a Label Studio task id: a
    non-negative integer of at most 18 digits (a task may have none). Run before any id is kept (held,
    handed off, remembered) or logged: a string id could forge log lines, a huge one flood them."""
    if not isinstance(tasks, list):
        return  # answer_each says what 'tasks' must be
    for task in tasks:
        task_id = task.get("id") if isinstance(task, dict) else None
        if task_id is not None and (type(task_id) is not int or not 0 <= task_id <= MAX_TASK_ID):
            raise BadRequest(
                f"task id {str(task_id)[:40]!r} is not a Label Studio task id "
                "(an integer from 0 to 10**18 - 1)"
            )


# --- segmenting: Label Studio tasks and regions <-> the service's prompts and masks -----------


def memory_key(task: dict, obj: ObjectRequest, project: int | str | None) -> tuple:
    """What the prompt memory keeps an object under: a box drawn in one project, task, image or
    label never shapes a click in another."""
    return (project, task.get("id"), obj.to_name, obj.label)


def object_prompt(obj: ObjectRequest, width: int, height: int, key: tuple | None = None) -> ObjectPrompt:
    """The service's prompt for one object on an image of `width` x `height` pixels: a rectangle
    becomes a box (the enclosing one of a rotated rectangle), keypoints become clicks."""
    if obj.rect_pct is not None:
        return ObjectPrompt(box_xyxy=obj.box_px(width, height), memory_key=key)
    return ObjectPrompt(points_xy=obj.points_px(width, height), point_labels=obj.point_labels, memory_key=key)


def interactive(
    segmenter: ImageSegmenter,
    task: dict,
    config: LabelConfig,
    objects: list[ObjectRequest],
    *,
    project: int | str | None = None,
    deadline: float | None = None,
) -> dict:
    """Masks for the regions a labeler just made (smart keypoints / rectangles), as the task's
    results entry. `project` is part of what the prompt memory remembers them under;
    `deadline` (time.monotonic()) is checked between decoder batches: past it, the task gets the
    deadline's error (TaskError)."""
    if not objects:
        return task_entry([], segmenter.model_version)
    image = segmenter.load_image(task_data_url(task, config, objects[0].to_name), task.get("id"))
    prompts = [object_prompt(o, image.width, image.height, memory_key(task, o, project)) for o in objects]
    preds = segmenter.segment(image, prompts, deadline=deadline)
    result = []
    for obj, pred in zip(objects, preds, strict=True):
        control = config.output_control(obj.to_name, obj.label)
        result += mask_result(pred.mask, obj.label, control, pred.score)
    return task_entry(result, segmenter.model_version)


def boxes_to_masks(
    segmenter: ImageSegmenter,
    task: dict,
    config: LabelConfig,
    use: str = "annotation",
    *,
    deadline: float | None = None,
    **mask_kw,
) -> dict:
    """One mask per rectangle of the task's latest annotation (or prediction), the boxes of the
    image decoded in batches of DECODE_BATCH after one encoder pass; nothing is remembered.
    `mask_kw` goes to `mask_result` (e.g. `tolerance_px` for polygon output). `deadline`: as for
    `interactive` (TaskDeadline, a TaskError, when it passes between batches)."""
    objects = rectangles_of_annotation(task, config, use, segmenter.max_regions)
    if not objects:
        return task_entry([], segmenter.model_version)
    image = segmenter.load_image(task_data_url(task, config, objects[0].to_name), task.get("id"))
    preds = segmenter.segment(
        image, [object_prompt(o, image.width, image.height) for o in objects], deadline=deadline
    )
    result = []
    for obj, pred in zip(objects, preds, strict=True):
        control = config.output_control(obj.to_name, obj.label)
        result += mask_result(pred.mask, obj.label, control, pred.score, **mask_kw)
    return task_entry(result, segmenter.model_version)


def answer_each(
    tasks: list, work, model_version: str, errors_as_entries: bool = True, deadline: float | None = None
) -> list[dict | list]:
    """Run `work(task)` for every task; a TaskError becomes that task's error entry (or `[]`,
    which Label Studio stores no prediction for, with `errors_as_entries=False`), the other
    tasks are still answered. Exactly one entry per task, in order. A task not started by
    `deadline` (time.monotonic()) gets an error entry instead of running: the request answers in
    time. Any other exception a hostile task provokes costs that task only (logged in full)."""
    if not isinstance(tasks, list) or not tasks:
        raise BadRequest("'tasks' must be a non-empty list of task objects")
    if not all(isinstance(t, dict) for t in tasks):
        raise BadRequest("every item of 'tasks' must be a task object")
    entries = []
    for task in tasks:
        try:
            if isinstance(task.get("id"), (list, dict, float)):
                raise TaskError(f"task id must be an integer, got {type(task['id']).__name__}")
            if deadline is not None and time.monotonic() > deadline:
                raise TaskError("the request ran out of time (PREDICT_DEADLINE_S) before this task")
            entries.append(work(task))
        except TaskError as e:
            log.log(e.log_level, "task %s: %s", _task_id(task), e.message)
            entries.append(task_entry([], model_version, 0.0, error=e.message) if errors_as_entries else [])
        except BackendError:
            raise  # the request as a whole is wrong (BadRequest) or the model is unavailable
        except Exception as e:
            log.exception("task %s: unexpected error", _task_id(task))
            message = f"this task could not be processed ({type(e).__name__}); see the backend's log"
            entries.append(task_entry([], model_version, 0.0, error=message) if errors_as_entries else [])
    return entries


def _task_id(task: dict) -> str:
    return repr(task.get("id"))[:40]  # a hostile id must not flood the log
