"""The work behind /predict for images: regions in, masks out, one entry per task.

Plain functions and one small class that tests call directly; the Flask views only parse and
serialise. The model side is `label_studio_sam2.engine.image.ImagePredictor` (stateless per call, embeddings cached
by image content), so concurrent labelers never see each other's images.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from label_studio_sam2.engine.image import DeadlineExceeded, Prompt
from label_studio_sam2.labelstudio.protocol import (
    MAX_REGIONS,
    LabelConfig,
    ObjectRequest,
    PromptMemory,
    Remembered,
    points_key,
    rectangles_of_annotation,
    task_data_url,
)
from label_studio_sam2.labelstudio.regions import mask_result, rect_to_box_px, task_entry
from label_studio_sam2.service.errors import BackendError, BadRequest, TaskError
from label_studio_sam2.service.media import ImageFile, MediaClient

log = logging.getLogger(__name__)


class ImageSegmenter:
    """Turns Label Studio image tasks + regions into brush/polygon results."""

    def __init__(
        self,
        predictor,
        media: MediaClient,
        model_version: str,
        memory: PromptMemory | None = None,
        max_regions: int = MAX_REGIONS,
    ):
        self.predictor = predictor  # label_studio_sam2.engine.image.ImagePredictor
        self.media = media
        self.model_version = model_version
        self.memory = memory or PromptMemory()
        self.max_regions = max_regions  # MAX_REGIONS_PER_TASK: rectangles of an annotation

    # --- entry points ----------------------------------------------------------------------

    def interactive(
        self,
        task: dict,
        config: LabelConfig,
        objects: list[ObjectRequest],
        *,
        project: int | str | None = None,
        deadline: float | None = None,
    ) -> dict:
        """Masks for the regions a labeler just made (smart keypoints / rectangles). `project`
        is part of what the prompt memory remembers them under (a box drawn in one project never
        shapes a click in another); `deadline` (time.monotonic()) is checked between decoder
        batches: past it, the task gets the deadline's error (TaskError)."""
        if not objects:
            return task_entry([], self.model_version)
        to_name = objects[0].to_name
        image = self._image(task, config, to_name)
        prompts = [self._prompt(task, obj, image, project) for obj in objects]
        preds = self._predict(image, prompts, deadline)
        result = []
        for obj, pred in zip(objects, preds, strict=True):
            self._remember(task, obj, pred, project)
            control = config.output_control(obj.to_name, obj.label)
            result += mask_result(pred.mask, obj.label, control, pred.score)
        return task_entry(result, self.model_version)

    def boxes_to_masks(
        self,
        task: dict,
        config: LabelConfig,
        use: str = "annotation",
        *,
        deadline: float | None = None,
        **mask_kw,
    ) -> dict:
        """One mask per rectangle of the task's latest annotation (or prediction), the boxes of
        the image decoded in batches of DECODE_BATCH after one encoder pass. `mask_kw` goes to
        `mask_result` (e.g. `tolerance_px` for polygon output). `deadline`: as for `interactive`
        (TaskDeadline, a TaskError, when it passes between batches)."""
        objects = rectangles_of_annotation(task, config, use, self.max_regions)
        if not objects:
            return task_entry([], self.model_version)
        image = self._image(task, config, objects[0].to_name)
        prompts = [Prompt(box_xyxy=o.box_px(image.width, image.height)) for o in objects]
        preds = self._predict(image, prompts, deadline)
        result = []
        for obj, pred in zip(objects, preds, strict=True):
            control = config.output_control(obj.to_name, obj.label)
            result += mask_result(pred.mask, obj.label, control, pred.score, **mask_kw)
        return task_entry(result, self.model_version)

    # --- helpers ---------------------------------------------------------------------------

    def _image(self, task: dict, config: LabelConfig, to_name: str) -> ImageFile:
        url = task_data_url(task, config, to_name)
        return self.media.load_image(url, task.get("id"))

    def _predict(self, image: ImageFile, prompts: list[Prompt], deadline: float | None):
        try:
            return self.predictor.predict(image.key, image.load, prompts, deadline=deadline)
        except DeadlineExceeded as e:
            raise TaskDeadline(
                f"the request ran out of time (PREDICT_DEADLINE_S) after {e.done} of {e.total} "
                "regions of this task"
            ) from None

    def _memory_key(self, task: dict, obj: ObjectRequest, project) -> tuple:
        return (project, task.get("id"), obj.to_name, obj.label)

    def _prompt(self, task: dict, obj: ObjectRequest, image: ImageFile, project=None):
        w, h = image.width, image.height
        if obj.rect_pct is not None:
            return Prompt(box_xyxy=obj.box_px(w, h))
        remembered = self.memory.get(self._memory_key(task, obj, project))
        box = None
        logits = None
        if remembered is not None:
            if remembered.box_pct is not None:
                box = rect_to_box_px(remembered.box_pct, remembered.rotation, w, h)
            # Refine the previous mask only when this call adds clicks to the previous ones
            # (a removed click means the user is undoing: start from the prompts alone).
            if remembered.logits is not None and remembered.points < points_key(obj):
                logits = remembered.logits
        return Prompt(
            points_xy=obj.points_px(w, h).astype(np.float32),
            point_labels=obj.point_labels.astype(np.int64),
            box_xyxy=box,
            mask_logits=logits,
        )

    def _remember(self, task: dict, obj: ObjectRequest, pred, project=None) -> None:
        key = self._memory_key(task, obj, project)
        if obj.rect_pct is not None:
            self.memory.put(
                key,
                Remembered(obj.rect_pct, obj.rotation, frozenset(), pred.low_res_logits, time.monotonic()),
            )
            return
        previous = self.memory.get(key)
        self.memory.put(
            key,
            Remembered(
                previous.box_pct if previous else None,
                previous.rotation if previous else 0.0,
                points_key(obj),
                pred.low_res_logits,
                time.monotonic(),
            ),
        )


class TaskDeadline(TaskError):
    """PREDICT_DEADLINE_S passed between two decoder batches of one task: the task is answered
    like one not started before the deadline (an error entry for a click; Retrieve hands it off)."""


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
