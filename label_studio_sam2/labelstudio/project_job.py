"""The job over a whole project (`label-studio-sam2 preannotate`): select, prefetch, predict,
write, report.

Pipelined: prefetch threads read the next tasks and download and decode their images while the
model works on the current one; a writer thread posts the predictions. Resumable: a task that
already has a prediction of this model_version is skipped. Ctrl-C (the `stop` event) finishes
the current task and its write, then returns.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from label_studio_sam2.labelstudio.api import (
    LabelStudioAPI,
    LabelStudioAPIError,
    Retry,
    describe,
    predicted_versions,
)
from label_studio_sam2.labelstudio.bulk import Preannotator
from label_studio_sam2.labelstudio.protocol import parse_label_config, task_data_url
from label_studio_sam2.service.bulk import PreannotateOptions
from label_studio_sam2.service.errors import BackendError
from label_studio_sam2.service.humanize import duration
from label_studio_sam2.service.media import ImageFile
from label_studio_sam2.service.segment import ImageSegmenter

log = logging.getLogger("label_studio_sam2.bulk")


@dataclass
class Selection:
    """Which tasks of the project: `filter` is all | annotated | unannotated | a Data Manager
    filter as JSON ({"conjunction": "and", "items": [...]}); `view` a Data Manager tab id;
    `task_ids` explicit ids."""

    filter: str = "all"
    view: int | None = None
    task_ids: frozenset[int] | None = None

    def query(self) -> str | None:
        if self.filter in ("all", "annotated", "unannotated"):
            return None
        try:
            filters = json.loads(self.filter)
        except ValueError:
            raise ValueError(
                f"--filter must be all, annotated, unannotated or Data Manager filters as JSON, got {self.filter!r}"
            ) from None
        return json.dumps({"filters": filters})

    def keeps(self, brief: dict) -> bool:
        if self.task_ids is not None and brief.get("id") not in self.task_ids:
            return False
        annotated = (brief.get("total_annotations") or 0) > 0
        return {"annotated": annotated, "unannotated": not annotated}.get(self.filter, True)


@dataclass
class Summary:
    """What a run did. `skipped` counts reasons; `failed` holds (task id, reason)."""

    selected: int = 0
    done: int = 0
    skipped: Counter = field(default_factory=Counter)
    failed: list[tuple[Any, str]] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 1 if self.failed else 0

    def report(self) -> str:
        lines = [
            f"{'interrupted' if self.interrupted else 'finished'} after {duration(self.seconds)}: "
            f"{self.selected} task(s) selected, {self.done} predicted, "
            f"{sum(self.skipped.values())} skipped, {len(self.failed)} failed"
        ]
        for reason, n in self.skipped.most_common():
            lines.append(f"  skipped {n}: {reason}")
        by_reason: dict[str, list] = {}
        for task_id, reason in self.failed:
            by_reason.setdefault(reason, []).append(task_id)
        for reason, ids in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(str(i) for i in ids[:10]) + (", ..." if len(ids) > 10 else "")
            lines.append(f"  failed {len(ids)}: {reason} (task {shown})")
        if self.interrupted:
            lines.append("  run the same command again to continue: predicted tasks are skipped")
        return "\n".join(lines)


@dataclass
class _DecodedImage(ImageFile):
    """An ImageFile whose pixels were decoded ahead, in a prefetch thread."""

    rgb: np.ndarray | None = None

    def load(self) -> np.ndarray:
        return self.rgb if self.rgb is not None else super().load()


class _PrefetchedMedia:
    """A MediaClient with images downloaded (and decoded) ahead put in front of it; the
    segmenter's `load_image` takes them from here."""

    def __init__(self, media):
        self.media = media
        self._ready: dict[tuple, ImageFile] = {}
        self._lock = threading.Lock()

    def put(self, url: str, task_id, image: ImageFile) -> None:
        with self._lock:
            self._ready[(url, task_id)] = image

    def discard(self, url: str, task_id) -> None:
        with self._lock:
            self._ready.pop((url, task_id), None)

    def load_image(self, url: str, task_id=None) -> ImageFile:
        with self._lock:
            image = self._ready.pop((url, task_id), None)
        return image if image is not None else self.media.load_image(url, task_id)

    def __getattr__(self, name):
        return getattr(self.media, name)


@dataclass
class _Fetched:
    task: dict | None = None
    url: str | None = None
    skip: str | None = None


class Progress:
    """A progress bar with tasks/s and ETA on a terminal (tqdm); a log line every `every_s`
    seconds otherwise (CI, docker logs)."""

    def __init__(self, total: int, tty: bool | None = None, every_s: float = 10.0):
        self.total = total
        self.n = 0
        self.every_s = every_s
        self.started = self.last = time.monotonic()
        tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None
        if tty:
            self.bar = tqdm(total=total, unit="task", dynamic_ncols=True, smoothing=0.1)

    def update(self, summary: Summary) -> None:
        self.show(
            self.n + 1,
            dict(done=summary.done, skipped=sum(summary.skipped.values()), failed=len(summary.failed)),
        )

    def show(self, n: int, status: dict) -> None:
        """`n` tasks of `total` finished; `status`: counts by outcome."""
        step, self.n = n - self.n, n
        if self.bar is not None:
            self.bar.set_postfix(status, refresh=False)
            self.bar.update(step)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:  # the closing summary reports the end
            self.last = now
            rate = self.n / max(now - self.started, 1e-9)
            eta = duration((self.total - self.n) / rate) if rate > 0 else "?"
            log.info(
                "progress: %d/%d tasks, %.2f tasks/s, ETA %s (%s)",
                self.n,
                self.total,
                rate,
                eta,
                ", ".join(f"{k} {v}" for k, v in status.items()),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def select_tasks(
    api: LabelStudioAPI, project_id: int, selection: Selection, options: PreannotateOptions
) -> tuple[Summary, list[dict]]:
    """The selection's tasks to look at (brief dicts, by id) and a Summary counting what was
    selected and skipped without a look (boxes from annotations: tasks without one)."""
    summary = Summary()
    todo = []
    for brief in api.iter_tasks(project_id, selection.query(), selection.view):
        if not selection.keeps(brief):
            continue
        summary.selected += 1
        # A prediction of this version in the brief (`predictions_model_versions`) may be an empty
        # one, which counts as absent: the task itself decides.
        if (
            options.mode == "boxes"
            and options.boxes_from == "annotation"
            and not brief.get("total_annotations")
        ):
            summary.skipped["no annotation"] += 1
        else:
            todo.append(brief)
    todo.sort(key=lambda b: b["id"])
    return summary, todo


def run_project(
    api: LabelStudioAPI,
    project_id: int,
    segmenter,
    options: PreannotateOptions,
    *,
    model_version: str | None = None,
    selection: Selection | None = None,
    prefetch: int = 2,
    stop: threading.Event | None = None,
    progress: Callable[[int], Progress] | None = None,
    media_retry: Retry | None = None,
) -> Summary:
    """Pre-annotate a project: every selected task gets at most one prediction of `model_version`.

    Pipelined: `prefetch` threads read the next tasks and download and decode their images while
    the model works on the current one; a writer thread posts the predictions. `stop` set (Ctrl-C)
    finishes the current task, waits for its prediction to be written and returns.

    Raises BadRequest when the label config cannot take these options, LabelStudioAPIError when
    Label Studio cannot be read at all.
    """
    started = time.monotonic()
    stop = stop or threading.Event()
    selection = selection or Selection()
    media_retry = media_retry or Retry(attempts=3)
    model_version = model_version or segmenter.model_version
    config = parse_label_config(api.label_config(project_id))
    media = _PrefetchedMedia(segmenter.media)
    engine = Preannotator(
        ImageSegmenter(segmenter.predictor, media, model_version, max_regions=segmenter.max_regions), options
    )
    config = engine.check(config)

    summary, todo = select_tasks(api, project_id, selection, options)
    log.info(
        "project %s: %d task(s) selected, %d to look at (%s mode, model_version %s)",
        project_id,
        summary.selected,
        len(todo),
        options.mode,
        model_version,
    )

    def fetch(brief: dict) -> _Fetched:
        task = api.task(brief["id"])
        if model_version in predicted_versions(task.get("predictions")):
            return _Fetched(skip=f"already has a prediction of {model_version}")
        plan = engine.plan(task, config)
        if plan.to_name is None:
            return _Fetched(skip=plan.skip)
        url = task_data_url(task, config, plan.to_name)
        image = media_retry.call(
            lambda: segmenter.media.load_image(url, task["id"]), f"fetching task {task['id']}'s image"
        )
        decoded = _DecodedImage(
            image.key, image.width, image.height, image.data, image.max_pixels, image.load()
        )
        media.put(url, task["id"], decoded)
        return _Fetched(task, url)

    lock = threading.Lock()

    def wrote(task_id, future: Future) -> None:
        with lock:
            try:
                if future.result():
                    summary.done += 1
                else:
                    summary.skipped[f"already has a prediction of {model_version}"] += 1
            except Exception as e:
                summary.failed.append(
                    (task_id, describe(e) if not isinstance(e, LabelStudioAPIError) else str(e))
                )

    def predict(fetched: _Fetched, task_id, writer: ThreadPoolExecutor) -> Future | None:
        """Run the engine on a fetched task; the write it queues, if any."""
        if fetched.skip is not None:
            with lock:
                summary.skipped[fetched.skip] += 1
            return None
        try:
            outcome = engine.predict(fetched.task, config)
        finally:
            media.discard(fetched.url, task_id)
        if outcome.entry is None or not outcome.entry["result"]:  # never store an empty prediction
            with lock:
                summary.skipped[outcome.skip or "no mask found"] += 1
            return None
        future = writer.submit(api.create_prediction, task_id, outcome.entry, model_version)
        future.add_done_callback(lambda f: wrote(task_id, f))
        return future

    bar = (progress or Progress)(len(todo))
    pending_writes: list[Future] = []
    with (
        ThreadPoolExecutor(max(1, prefetch), thread_name_prefix="prefetch") as readers,
        ThreadPoolExecutor(1, thread_name_prefix="writer") as writer,
    ):
        queue = iter(todo)
        window: deque[tuple[dict, Future]] = deque()

        def refill() -> None:
            while len(window) < max(1, prefetch) + 1:
                brief = next(queue, None)
                if brief is None:
                    return
                window.append((brief, readers.submit(fetch, brief)))

        refill()
        try:
            while window:
                if stop.is_set():
                    summary.interrupted = True
                    break
                brief, future = window.popleft()
                refill()
                task_id = brief["id"]
                try:
                    write = predict(future.result(), task_id, writer)
                    if write is not None:
                        pending_writes.append(write)
                except (BackendError, LabelStudioAPIError) as e:
                    with lock:
                        summary.failed.append((task_id, e.message if isinstance(e, BackendError) else str(e)))
                except Exception as e:  # a bug must not lose the rest of the run
                    log.exception("task %s failed", task_id)
                    with lock:
                        summary.failed.append((task_id, f"unexpected {type(e).__name__} (see the log)"))
                with lock:
                    bar.update(summary)
        finally:
            for _, future in window:
                future.cancel()
            for w in pending_writes:
                w.exception()  # wait: a prediction computed is a prediction written
            bar.close()
    summary.seconds = time.monotonic() - started
    return summary
