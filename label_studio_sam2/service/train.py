"""Fine-tune a project's decoder on its own corrected masks: `label-studio-sam2 train --project ID`.

Reads the project's submitted annotations through the Label Studio API (the latest not-cancelled
annotation of each task: brush masks, polygons, and masks accepted from predictions, which are
annotations once accepted), embeds their images with the served model (through the embedding
cache and store, so `warm` makes this fast), holds out a validation split by task, fine-tunes the
prompt encoder and mask decoder (`label_studio_sam2.engine.finetune`) and reports held-out 1-click and box mIoU
before and after. Every run is kept as a version (`label_studio_sam2.engine.finetuned_decoders`); it is activated, and becomes
a new model_version for that project, only when held-out mIoU improves by `--min-gain`.

Ctrl-C stops after the current step and leaves a checkpoint; running the same command again
resumes it. `--rollback` serves the previously activated version again (or the base model).
Label Studio's "Start Training" button reaches the server as a START_TRAINING webhook, which
starts this same command in the background (`label_studio_sam2.service.finetuned.TrainingLauncher`).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from label_studio_sam2.engine.finetune import Example, FinetuneConfig, finetune, split
from label_studio_sam2.engine.finetuned_decoders import DecoderVersions, model_version
from label_studio_sam2.labelstudio.project_job import duration
from label_studio_sam2.labelstudio.protocol import (
    LabelConfig,
    latest_annotation,
    parse_label_config,
    task_data_url,
)
from label_studio_sam2.labelstudio.rle import decode_mask
from label_studio_sam2.service.errors import BackendError
from label_studio_sam2.service.settings import Settings

log = logging.getLogger("label_studio_sam2.service.train")

MIN_PIXELS = 16  # smaller masks are slips of the brush, not objects
FEW_MASKS = 20  # below this, say that the result is unlikely to generalise


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


class Reporter:
    """A tqdm bar on a terminal; a log line with rate and ETA every `every_s` seconds otherwise."""

    def __init__(self, total: int, unit: str, desc: str, tty: bool | None = None, every_s: float = 10.0):
        self.total, self.unit, self.desc, self.every_s = total, unit, desc, every_s
        self.n, self.started = 0, time.monotonic()
        self.last = self.started
        self.bar = None
        if sys.stderr.isatty() if tty is None else tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True)

    def update(self, n: int = 1, **status) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.set_postfix(status, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s or self.n == self.total:
            self.last = now
            rate = self.n / max(now - self.started, 1e-9)
            eta = duration((self.total - self.n) / rate) if rate > 0 else "?"
            extra = "".join(f", {k} {v}" for k, v in status.items())
            log.info("%s: %d/%d %s, ETA %s%s", self.desc, self.n, self.total, self.unit, eta, extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class TrainReport:
    project: int
    tasks: int = 0
    examples: int = 0
    train: int = 0
    val: int = 0
    skipped: Counter = field(default_factory=Counter)
    result: object = None  # label_studio_sam2.engine.finetune.FinetuneResult
    version: str | None = None
    activated: bool = False
    model_version: str | None = None
    path: str | None = None  # where the version was written
    min_gain: float | None = None
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 0

    def lines(self) -> list[str]:
        out = [f"project {self.project}: {self.examples} mask(s) from {self.tasks} task(s)"]
        out += [f"  skipped {n}: {why}" for why, n in self.skipped.most_common()]
        r = self.result
        if self.interrupted:
            return out + ["interrupted: run the same command again to resume"]
        if r is None:
            return out
        out.append(
            f"  trained on {self.train}, held out {self.val}; {r.steps} steps in {duration(r.seconds)}"
        )
        out.append(f"  held-out 1-click mIoU {r.before.click:.3f} -> {r.after.click:.3f}")
        out.append(f"  held-out box mIoU     {r.before.box:.3f} -> {r.after.box:.3f}")
        if self.activated:
            out.append(f"activated {self.version}: this project's model_version is now {self.model_version}")
        else:
            out.append(f"kept {self.version} but not activated: it does not improve held-out mIoU enough")
        out.append(f"  written to {self.path}")
        return out

    def outcome(self) -> dict:
        """What `label_studio_sam2.service.trainruns` records of a run that ended."""
        r = self.result
        metrics = None
        if r is not None:
            metrics = {
                "before": {"click_miou": r.before.click, "box_miou": r.before.box},
                "after": {"click_miou": r.after.click, "box_miou": r.after.box},
            }
        return {
            "tasks": self.tasks,
            "examples": self.examples,
            "skipped": dict(self.skipped),
            "metrics": metrics,
            "version": self.version,
            "activated": self.activated,
            "model_version": self.model_version,
            "path": self.path,
            "min_gain": self.min_gain,
        }


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
    """Fine-tune `project`'s decoder from the served model (`segmenter.predictor.loaded`); save
    the result as a new version and activate it if it improves held-out mIoU enough."""
    stop = stop or threading.Event()
    report = TrainReport(project)
    examples, report.tasks, report.skipped = collect_examples(api, project, segmenter, stop, tty)
    report.examples = len(examples)
    if stop.is_set():
        report.interrupted = True
        return report
    train, val = split(examples, val_fraction)
    report.train, report.val = len(train), len(val)
    if not train or not val:
        raise BackendError(
            f"project {project} has {len(examples)} usable mask(s) in {report.tasks} task(s): "
            "fine-tuning needs masks in at least 2 submitted tasks (brush or polygon)"
        )
    if report.tasks < FEW_MASKS:
        log.warning("only %d labeled tasks: the fine-tune may not generalise", report.tasks)
    cfg = FinetuneConfig(
        epochs=settings.finetune_epochs,
        lr=settings.finetune_lr,
        batch=batch,
        min_gain=settings.finetune_min_gain,
    )
    base = segmenter.predictor.loaded
    versions = DecoderVersions(settings.finetune_dir, project)
    steps_bar: Reporter | None = None

    def progress(p) -> None:
        nonlocal steps_bar
        if steps_bar is None:
            steps_bar = Reporter(p.steps, "step", "fine-tuning", tty)
            steps_bar.n = p.step - 1  # a resumed run starts part way
        steps_bar.update(epoch=p.epoch + 1, loss=f"{p.loss:.3f}")

    log.info("fine-tuning on %d mask(s), %d held out (%d epochs)", len(train), len(val), cfg.epochs)
    try:
        result = finetune(
            base, train, val, cfg, checkpoint=versions.checkpoint, stop=stop, on_progress=progress
        )
    finally:
        if steps_bar is not None:
            steps_bar.close()
    report.result = result
    if result.stopped:
        report.interrupted = True
        return report
    report.activated = result.improved(cfg.min_gain)
    report.min_gain = cfg.min_gain
    metrics = {
        "before": {"click_miou": result.before.click, "box_miou": result.before.box},
        "after": {"click_miou": result.after.click, "box_miou": result.after.box},
        "held_out": result.before.n,
    }
    report.version = versions.save(
        result.state,
        {
            "base_model": base.model_id,
            "base_source": base.source,
            "examples": {"train": len(train), "val": len(val), "tasks": report.tasks},
            "metrics": metrics,
            "activated": report.activated,
            "steps": result.steps,
            "seconds": round(result.seconds, 1),
            "config": result.config,
        },
    )
    report.path = str(versions.dir / report.version)
    if report.activated:
        versions.activate(report.version)
        report.model_version = model_version(segmenter.model_version, project, report.version)
    return report
