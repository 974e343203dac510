"""Fine-tune a project's decoder on its own corrected masks: `label-studio-sam2 train --project ID`.

Takes the project's examples as its annotation tool's adapter reads them (Label Studio's:
label_studio_sam2.labelstudio.train reads the submitted annotations through the LS API and embeds
their images with the served model, through the embedding cache and store), holds out a validation split by task, fine-tunes the
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

from label_studio_sam2.engine.finetune import FinetuneConfig, finetune, split
from label_studio_sam2.engine.finetuned_decoders import DecoderVersions, model_version
from label_studio_sam2.service.errors import BackendError
from label_studio_sam2.service.humanize import duration
from label_studio_sam2.service.settings import Settings

log = logging.getLogger("label_studio_sam2.service.train")

FEW_MASKS = 20  # below this, say that the result is unlikely to generalise


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


def train_project(
    collect,
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
    the result as a new version and activate it if it improves held-out mIoU enough.

    `collect(stop, tty)`: the project's examples, as the annotation tool's adapter reads them:
    (`label_studio_sam2.engine.finetune.Example`s, tasks with masks, skipped reasons) (Label
    Studio's: `label_studio_sam2.labelstudio.train.collect_examples`)."""
    stop = stop or threading.Event()
    report = TrainReport(project)
    examples, report.tasks, report.skipped = collect(stop, tty)
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
