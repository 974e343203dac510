"""Segmentation of images from neutral prompts: boxes and clicks in pixels in, masks out.

Tool-neutral: a prompt is an image (`ImageFile`: a content key and a loader), a box in pixels,
clicks in pixels with their labels, and an opaque memory key; the answer is the predictor's masks
with their scores. The prompt memory (keyed by those opaque keys) makes "draw a box, then click to
fix it" work when a tool sends the box and the clicks in separate requests, and lets each click
refine the previous mask. Turning a tool's tasks and regions into prompts, and masks into its
results, is the adapter's work (Label Studio's: `label_studio_sam2.labelstudio.protocol`).

The model side is `label_studio_sam2.engine.image.ImagePredictor` (stateless per call, embeddings
cached by image content), so concurrent labelers never see each other's images.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from label_studio_sam2.engine.image import DeadlineExceeded, Prompt
from label_studio_sam2.service.errors import TaskError
from label_studio_sam2.service.media import ImageFile, MediaClient
from label_studio_sam2.service.promptmemory import PromptMemory, Remembered

# Default of MAX_REGIONS_PER_TASK (label_studio_sam2.service.settings) for callers that pass none:
# nothing parses an unbounded number of regions.
MAX_REGIONS = 500


@dataclass
class ObjectPrompt:
    """One object to segment, in continuous pixels of the image.

    points_xy: (N, 2) float XY; point_labels: (N,) 1 positive / 0 negative (N may be 0).
    box_xyxy: (4,) x1, y1, x2, y2, or None.
    memory_key: an opaque hashable id of the object (a tuple: its parts are counted in the
        memory's bytes), or None: nothing is remembered or recalled. With a key, a box alone
        starts the object afresh; clicks without a box reuse the box remembered under the key,
        and refine the remembered mask when they add to the clicks it was made from.
    """

    points_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    box_xyxy: np.ndarray | None = None
    memory_key: Hashable | None = None

    @property
    def box_only(self) -> bool:
        return self.box_xyxy is not None and len(self.points_xy) == 0


class ImageSegmenter:
    """Masks for neutral prompts on one image, with the prompt memory."""

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
        self.max_regions = max_regions  # MAX_REGIONS_PER_TASK: boxes of one task

    def load_image(self, url: str, task_id=None) -> ImageFile:
        """The image at `url` through the media client (its limits and credentials); `task_id`
        only names the task in errors and logs."""
        return self.media.load_image(url, task_id)

    def segment(
        self, image: ImageFile, objects: list[ObjectPrompt], *, deadline: float | None = None
    ) -> list:
        """One prediction per object, in order (`label_studio_sam2.engine.image` MaskPrediction:
        `.mask` (H, W) bool, `.score`). `deadline` (time.monotonic()) is checked between decoder
        batches: past it, TaskDeadline (a TaskError). What each object with a memory key was
        prompted with is remembered for its next prompt."""
        if not objects:
            return []
        prompts = [self._prompt(obj) for obj in objects]
        preds = self._predict(image, prompts, deadline)
        for obj, pred in zip(objects, preds, strict=True):
            self._remember(obj, pred)
        return preds

    # --- helpers ---------------------------------------------------------------------------

    def _predict(self, image: ImageFile, prompts: list[Prompt], deadline: float | None):
        try:
            return self.predictor.predict(image.key, image.load, prompts, deadline=deadline)
        except DeadlineExceeded as e:
            raise TaskDeadline(
                f"the request ran out of time (PREDICT_DEADLINE_S) after {e.done} of {e.total} "
                "regions of this task"
            ) from None

    def _prompt(self, obj: ObjectPrompt) -> Prompt:
        if obj.box_only:
            return Prompt(box_xyxy=np.asarray(obj.box_xyxy, dtype=np.float64))
        remembered = self.memory.get(obj.memory_key) if obj.memory_key is not None else None
        box = obj.box_xyxy
        logits = None
        if remembered is not None:
            if box is None and remembered.box is not None:
                box = remembered.box
            # Refine the previous mask only when this call adds clicks to the previous ones
            # (a removed click means the user is undoing: start from the prompts alone).
            if remembered.logits is not None and remembered.points < points_key(obj):
                logits = remembered.logits
        return Prompt(
            points_xy=np.asarray(obj.points_xy).astype(np.float32),
            point_labels=np.asarray(obj.point_labels).astype(np.int64),
            box_xyxy=None if box is None else np.asarray(box, dtype=np.float64),
            mask_logits=logits,
        )

    def _remember(self, obj: ObjectPrompt, pred) -> None:
        key = obj.memory_key
        if key is None:
            return
        if obj.box_only:
            self.memory.put(
                key, Remembered(_box(obj.box_xyxy), frozenset(), pred.low_res_logits, time.monotonic())
            )
            return
        box = _box(obj.box_xyxy)
        if box is None:
            previous = self.memory.get(key)
            box = previous.box if previous else None
        self.memory.put(key, Remembered(box, points_key(obj), pred.low_res_logits, time.monotonic()))


def _box(box) -> tuple[float, float, float, float] | None:
    return None if box is None else tuple(float(v) for v in np.asarray(box).reshape(4))


def points_key(obj: ObjectPrompt) -> frozenset:
    """The clicks of a prompt as a set (what the remembered logits were made from)."""
    return frozenset(
        (round(float(x), 4), round(float(y), 4), int(lbl))
        for (x, y), lbl in zip(np.asarray(obj.points_xy).reshape(-1, 2), obj.point_labels, strict=True)
    )


class TaskDeadline(TaskError):
    """PREDICT_DEADLINE_S passed between two decoder batches of one task: the task is answered
    like one not started before the deadline (an error entry for a click; Retrieve hands it off)."""
