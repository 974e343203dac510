"""A Label Studio project's corrected masks as fine-tuning examples (`label-studio-sam2 train`).

Reads the project's submitted annotations through the Label Studio API (the latest not-cancelled
annotation of each task: brush masks, polygons, and masks accepted from predictions, which are
annotations once accepted) and embeds their images with the served model (through the embedding
cache and store, so `warm` makes this fast). The training itself, over these examples, is the
service's (label_studio_sam2.service.train).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import numpy as np

from label_studio_sam2.engine.finetune import Example
from label_studio_sam2.labelstudio.protocol import (
    LabelConfig,
    latest_annotation,
    parse_label_config,
    task_data_url,
)
from label_studio_sam2.labelstudio.rle import decode_mask
from label_studio_sam2.service import train as service_train
from label_studio_sam2.service.errors import BackendError
from label_studio_sam2.service.settings import Settings
from label_studio_sam2.service.train import Reporter, TrainReport

log = logging.getLogger("label_studio_sam2.service.train")  # one log for a training run

MIN_PIXELS = 16  # smaller masks are slips of the brush, not objects


def annotation_masks(
    annotation: dict,
    config: LabelConfig,
    image_hw: tuple[int, int] | None = None,
    skipped: Counter | None = None,
    to_name: str | None = None,
) -> list[tuple[str, np.ndarray]]:
    """(to_name, (H, W) bool mask) for every brush and polygon region of an annotation.

    Annotations are untrusted input. With `image_hw` (the real image's size) a region is decoded
    only when its declared original_width/height equal it: a 3-point polygon declaring 40000 x
    40000 pixels is skipped, never drawn. With `to_name`, regions of other images are skipped. A
    region that cannot be read (a malformed RLE, bad points) is skipped; each skip is counted in
    `skipped` by reason (the run's report). Never raises for a bad region."""
    skipped = Counter() if skipped is None else skipped
    out = []
    default_to = config.images()[0].name if config.images() else None
    for r in annotation.get("result") or []:
        if not isinstance(r, dict) or not isinstance(r.get("value"), dict):
            continue
        kind, value = r.get("type"), r["value"]
        if not (kind == "brushlabels" and value.get("format") == "rle") and not (
            kind == "polygonlabels" and value.get("points")
        ):
            continue
        target = r.get("to_name") or default_to
        if not target:
            continue
        if to_name is not None and target != to_name:
            skipped["a region of another image of the task"] += 1
            continue
        w, h = r.get("original_width"), r.get("original_height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            skipped["a region without its image size (original_width/height)"] += 1
            continue
        if image_hw is not None and (h, w) != tuple(image_hw):
            skipped["a region's size differs from its image's"] += 1
            continue
        try:
            if kind == "brushlabels":
                mask = decode_mask(value.get("rle") or [], h, w)
            else:
                mask = polygon_mask(np.asarray(value["points"], np.float64), h, w)
        except Exception as e:  # a region this backend cannot read is not training data
            skipped[f"a {kind} region could not be read ({_reason(e)})"] += 1
            continue
        if mask.sum() >= MIN_PIXELS:
            out.append((target, mask))
    return out


def _reason(e: Exception) -> str:
    """A short, one-line reason (no region data: it can be huge)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:120]}" if text else type(e).__name__


def _first_image_region(annotation: dict, config: LabelConfig) -> str | None:
    """The to_name of the annotation's first brush or polygon region (the image trained on)."""
    default_to = config.images()[0].name if config.images() else None
    for r in annotation.get("result") or []:
        if isinstance(r, dict) and r.get("type") in ("brushlabels", "polygonlabels"):
            target = r.get("to_name") or default_to
            if isinstance(target, str) and target:
                return target
    return None


def polygon_mask(points_pct: np.ndarray, height: int, width: int) -> np.ndarray:
    """Label Studio polygon points (K, 2) in percent -> (H, W) bool: pixels whose centres are inside."""
    from PIL import Image, ImageDraw

    if points_pct.ndim != 2 or points_pct.shape[1] != 2 or len(points_pct) < 3:
        raise ValueError("a polygon needs at least 3 points")
    xy = points_pct * np.array([width, height]) / 100.0 - 0.5  # PIL tests integer pixel coordinates
    img = Image.new("L", (width, height), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in xy], fill=1)
    return np.asarray(img, dtype=bool)


def collect_examples(api, project: int, segmenter, stop: threading.Event, tty: bool | None = None):
    """The project's corrected masks as `label_studio_sam2.engine.finetune.Example`s (embeddings through the
    segmenter's cache and store). Returns (examples, tasks with masks, skipped reasons)."""
    config = parse_label_config(api.label_config(project))
    briefs = [b for b in api.iter_tasks(project) if (b.get("total_annotations") or 0) > 0]
    examples, skipped, tasks = [], Counter(), 0
    bar = Reporter(len(briefs), "task", "reading annotations", tty)
    try:
        for brief in sorted(briefs, key=lambda b: b["id"]):
            if stop.is_set():
                break
            bar.update(masks=len(examples))
            try:
                found = _task_examples(api, brief["id"], config, segmenter, skipped)
            except Exception as e:  # one task's failure is a line in the report, never the run's end
                log.warning("task %r not used: %s", brief.get("id"), _reason(e))
                skipped[f"task not read ({_reason(e)})"] += 1
                continue
            if found:
                examples += found
                tasks += 1
    finally:
        bar.close()
    return examples, tasks, skipped


def _task_examples(api, task_id: int, config: LabelConfig, segmenter, skipped: Counter) -> list[Example]:
    """The examples of one task: its image loaded first, then only the regions whose declared
    size is the image's decoded (see `annotation_masks`)."""
    task = api.task(task_id)
    annotation = latest_annotation(task)
    to_name = _first_image_region(annotation, config) if annotation else None
    if to_name is None:
        skipped["no brush or polygon region"] += 1
        return []
    try:
        image = segmenter.media.load_image(task_data_url(task, config, to_name), task["id"])
    except BackendError as e:
        skipped[f"image not loaded: {e.message}"] += 1
        return []
    masks = annotation_masks(annotation, config, (image.height, image.width), skipped, to_name)
    if not masks:
        return []
    emb = segmenter.predictor.embedding(image.key, image.load)
    features = [f.detach().float().cpu() for f in emb.features]
    return [Example(features, m, f"task-{task['id']}") for _, m in masks]


def train_project(
    api,
    project: int,
    segmenter,
    settings: Settings,
    *,
    val_fraction: float = 0.2,
    batch: int = 8,
    stop: threading.Event | None = None,
    tty: bool | None = None,
) -> TrainReport:
    """Fine-tune `project`'s decoder on its Label Studio annotations (read through `api`);
    see `label_studio_sam2.service.train.train_project`."""
    return service_train.train_project(
        lambda stop, tty: collect_examples(api, project, segmenter, stop, tty),
        project,
        segmenter,
        settings,
        val_fraction=val_fraction,
        batch=batch,
        stop=stop,
        tty=tty,
    )
