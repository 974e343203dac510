"""Bulk pre-annotation: boxes to masks and automatic masks, over many tasks.

One engine, `Preannotator`, serves three callers:

- "Retrieve predictions" in Label Studio (/predict without context): `retrieve_worker()` runs the
  engine task by task while the request's deadline allows, then hands the rest of the selection
  to the process's `BackgroundJob`, which writes their predictions through the LS API.
- The CLI, `python -m backend preannotate --project ID`: `run_project()` over a whole project,
  pipelined (the next tasks' media download while the current one is encoded), resumable
  (tasks that have a prediction of this model_version are skipped), Ctrl-C safe.
- `auto_masks_entry()`, the hook `backend.app` calls for RETRIEVE_MODE=auto.

Nothing a labeler made is touched: only predictions are written, never annotations.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from backend import polygons
from backend.errors import BackendError, BadRequest, MediaError, TaskError
from backend.media import ImageFile
from backend.protocol import (
    LabelConfig,
    ObjectRequest,
    parse_label_config,
    rectangles_of_annotation,
    task_data_url,
)
from backend.results import mask_result, task_entry

log = logging.getLogger("backend.preannotate")

MODES = ("boxes", "auto")
OUTPUTS = ("auto", "brush", "polygon")
SOURCES = ("annotation", "prediction")


# --- options -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreannotateOptions:
    """What to pre-annotate and how (environment: see Settings; CLI: see add_parser).

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
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def auto_config(self):
        from sam2.auto import AutoMaskConfig

        return AutoMaskConfig(
            points_per_side=self.points_per_side,
            pred_iou_thresh=self.iou_thresh,
            stability_thresh=self.stability_thresh,
            min_area_px=self.min_area_px,
            max_masks=self.max_masks,
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

    `segmenter` is the backend's ImageSegmenter: boxes mode is its `boxes_to_masks` (one encoder
    pass, every box of the image in one batched decoder call); auto mode uses its predictor and
    media client. Raises TaskError for what is wrong with one task, BadRequest for what is wrong
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

    def predict(self, task: dict, config: LabelConfig) -> Outcome:
        view = output_view(config, self.options.output)
        plan = self.plan(task, view)
        if plan.to_name is None:
            return Outcome(None, plan.skip)
        with polygons.tolerance(self.options.polygon_tolerance_px):
            if self.options.mode == "boxes":
                return Outcome(self.segmenter.boxes_to_masks(task, view, self.options.boxes_from))
            return Outcome(self._auto(task, view, plan))

    def _rectangles(self, task: dict, config: LabelConfig) -> list[ObjectRequest]:
        try:
            return rectangles_of_annotation(task, config, self.options.boxes_from)
        except BadRequest as e:  # one task's broken region must not sink the others
            raise TaskError(f"task {task.get('id')}: {e.message}") from None

    def _auto(self, task: dict, config: LabelConfig, plan: Plan) -> dict:
        from sam2.auto import AutoMaskGenerator

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
            result += mask_result(m.full(), label, control, m.score)
        return task_entry(result, self.model_version)


def _output_image(config: LabelConfig) -> str:
    """The image automatic masks are made for: the one the first output control points at."""
    outputs = [c for tag in ("brushlabels", "polygonlabels") for c in config.controls_of(tag)]
    if not outputs:
        raise BadRequest("the label config has no BrushLabels or PolygonLabels control for the masks")
    return outputs[0].to_name


def auto_masks_entry(runtime, task: dict, config: LabelConfig) -> dict:
    """RETRIEVE_MODE=auto for one task of /predict (the hook backend.app calls)."""
    options = PreannotateOptions.from_settings(runtime.settings, mode="auto")
    engine = Preannotator(runtime.segmenter, options)
    return engine.predict(task, config).entry or task_entry([], engine.model_version)


# --- "Retrieve predictions": the deadline and the background hand-off -------------------------


def retrieve_worker(runtime, config: LabelConfig, deadline: float) -> Callable[[dict], Any]:
    """`work(task)` for a /predict without context (Label Studio's "Retrieve predictions").

    Runs the engine while the deadline allows (a task is started only if the slowest of the last
    few would still finish in time). The rest of the request, and every task while a background
    job is busy, is answered with an empty list, which Label Studio reads as "no prediction for
    this task" (it stores nothing, so nothing blocks a later retrieval); the background job, if
    there is one, predicts them and writes the predictions through the LS API.
    """
    engine = Preannotator(runtime.segmenter, PreannotateOptions.from_settings(runtime.settings))
    job = background_job(runtime)
    spent: list[float] = []
    handing_off = False

    def work(task: dict):
        nonlocal handing_off
        if not spent and not handing_off:
            engine.check(config)  # a config these options cannot use: the request gets a 400
        task_id = task.get("id")
        if job is not None and job.holds(task_id):
            return []  # handed off by an earlier request, still on its way
        estimate = 1.25 * max(spent[-5:], default=0.0)
        if handing_off or (job is not None and job.busy) or time.monotonic() + estimate > deadline:
            if not handing_off:
                handing_off = True
                if job is not None:
                    log.info("retrieve: handing the rest of this request to the background job")
                else:
                    log.warning(
                        "retrieve: the deadline is near and no background job is available "
                        "(BACKGROUND_JOB=false or no LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY): the rest "
                        "of this request stays unpredicted; retrieve again (Label Studio sends only "
                        "tasks without a prediction) or run `python -m backend preannotate`"
                    )
            if job is not None and isinstance(task_id, int):
                job.submit(task, config, engine.options)
            return []
        start = time.monotonic()
        try:
            return engine.predict(task, config).entry or task_entry([], engine.model_version)
        finally:
            spent.append(time.monotonic() - start)

    return work


_jobs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_jobs_lock = threading.Lock()


def background_job(runtime) -> BackgroundJob | None:
    """The process's background job for this runtime, created on first use; None when it is
    switched off or Label Studio's API is not configured."""
    settings = runtime.settings
    if not (settings.background_job and settings.label_studio_url and settings.label_studio_api_key):
        return None
    with _jobs_lock:
        job = _jobs.get(runtime)
        if job is None:
            try:
                api = LabelStudioAPI(settings.label_studio_url, settings.label_studio_api_key)
            except Exception as e:  # an expired token, say: say so, answer what can be answered
                log.warning("no background job: cannot use the Label Studio API (%s)", _describe(e))
                return None
            job = _jobs[runtime] = BackgroundJob(runtime, api)
        return job


@dataclass
class _Handed:
    task: dict
    config: LabelConfig
    options: PreannotateOptions


class BackgroundJob:
    """Tasks handed over by /predict, predicted one at a time in a daemon thread and written to
    Label Studio as predictions. One per process (under gunicorn, one per worker).

    Progress goes to the log every 10 s and to /metrics (`sam2_background_tasks_total{outcome}`,
    `sam2_background_tasks_pending`). The queue lives in memory: if the process stops, the
    tasks not yet written are simply not predicted (retrieve again, or use the CLI).
    """

    def __init__(self, runtime, api: LabelStudioAPI, log_every_s: float = 10.0):
        from prometheus_client import Counter as PromCounter
        from prometheus_client import Gauge

        self.runtime = runtime
        self.api = api
        self.log_every_s = log_every_s
        self._cv = threading.Condition()
        self._queue: deque[_Handed] = deque()
        self._ids: set[int] = set()  # queued or being predicted
        self._thread: threading.Thread | None = None
        self.counts: Counter = Counter()
        registry = runtime.metrics.registry
        self._outcomes = PromCounter(
            "sam2_background_tasks", "Tasks of the background job, by outcome", ["outcome"], registry=registry
        )
        pending = Gauge(
            "sam2_background_tasks_pending", "Tasks queued for the background job", registry=registry
        )
        pending.set_function(lambda: len(self._ids))

    def holds(self, task_id) -> bool:
        with self._cv:
            return task_id in self._ids

    @property
    def busy(self) -> bool:
        with self._cv:
            return bool(self._ids)

    def submit(self, task: dict, config: LabelConfig, options: PreannotateOptions) -> None:
        with self._cv:
            if task["id"] in self._ids:
                return
            self._ids.add(task["id"])
            self._queue.append(_Handed(task, config, options))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="preannotate-job", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every handed task is done (tests, shutdown). True if idle."""
        end = time.monotonic() + timeout_s
        with self._cv:
            while self._ids:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def _run(self) -> None:
        started, last_log, seen = time.monotonic(), 0.0, 0
        while True:
            with self._cv:
                if not self._queue:
                    self._cv.notify_all()
                    self._log(started, seen, final=True)
                    self._thread = None
                    return
                item = self._queue.popleft()
            outcome = self._process(item)
            seen += 1
            self.counts[outcome] += 1
            self._outcomes.labels(outcome).inc()
            with self._cv:
                self._ids.discard(item.task["id"])
                self._cv.notify_all()
            if time.monotonic() - last_log >= self.log_every_s:
                last_log = time.monotonic()
                self._log(started, seen)

    def _process(self, item: _Handed) -> str:
        task_id = item.task["id"]
        engine = Preannotator(self.runtime.segmenter, item.options)
        try:
            if engine.model_version in self.api.prediction_versions(task_id):
                return "skipped"
            outcome = engine.predict(item.task, item.config)
            if outcome.entry is None:
                return "skipped"
            written = self.api.create_prediction(task_id, outcome.entry, engine.model_version)
            return "done" if written else "skipped"
        except BackendError as e:
            log.warning("background job: task %s failed: %s", task_id, e.message)
        except LabelStudioAPIError as e:
            log.warning("background job: task %s failed: %s", task_id, e)
        except Exception:
            log.exception("background job: task %s failed", task_id)
        return "failed"

    def _log(self, started: float, seen: int, final: bool = False) -> None:
        if not seen:
            return
        rate = seen / max(time.monotonic() - started, 1e-9)
        pending = len(self._ids) - (0 if final else 1)
        c = self.counts
        log.info(
            "background job: %d done, %d skipped, %d failed, %d pending; %.2f tasks/s%s",
            c["done"],
            c["skipped"],
            c["failed"],
            max(pending, 0),
            rate,
            "" if final or pending <= 0 else f", about {_duration(pending / rate)} left",
        )


# --- Label Studio's API, with retries ----------------------------------------------------------


class LabelStudioAPIError(RuntimeError):
    """A Label Studio API call failed (after retries, if it was worth retrying)."""


def _describe(e: BaseException) -> str:
    """An error in one line, without headers or secrets (SDK errors print their headers)."""
    status = getattr(e, "status_code", None)
    if status is not None or type(e).__name__ == "ApiError":
        body = getattr(e, "body", None)
        detail = body.get("detail") if isinstance(body, dict) else body
        return f"HTTP {status}: {str(detail)[:200]}" if detail else f"HTTP {status}"
    if isinstance(e, BackendError):
        return e.message
    return f"{type(e).__name__}: {str(e)[:200]}"


def _retryable(e: BaseException) -> bool:
    import httpx

    if isinstance(e, httpx.TransportError):  # connection refused / reset, timeouts
        return True
    if isinstance(e, MediaError):
        return e.status in (502, 503, 504)
    status = getattr(e, "status_code", None)
    if type(e).__name__ == "ApiError":
        return status is None or status == 429 or status >= 500
    return False


@dataclass
class Retry:
    """Retry with exponential backoff on what may pass: connection errors, timeouts, HTTP 429 and
    5xx from Label Studio, 502/503/504 fetching media. Anything else fails at once."""

    attempts: int = 5
    base_s: float = 1.0
    max_s: float = 30.0
    sleep: Callable[[float], None] = time.sleep

    def call(self, fn: Callable[[], Any], what: str) -> Any:
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:
                if attempt >= self.attempts or not _retryable(e):
                    raise
                delay = min(self.max_s, self.base_s * 2 ** (attempt - 1))
                log.warning(
                    "%s failed (%s); retry %d of %d in %.0f s",
                    what,
                    _describe(e),
                    attempt,
                    self.attempts - 1,
                    delay,
                )
                self.sleep(delay)
        raise AssertionError("unreachable")


class LabelStudioAPI:
    """The few Label Studio calls bulk pre-annotation makes, through label-studio-sdk (which
    exchanges a personal access token for access tokens itself), each retried with `retry`.
    Errors come out as LabelStudioAPIError with the HTTP status and Label Studio's detail."""

    PAGE_SIZE = 100

    def __init__(self, url: str, api_key: str, retry: Retry | None = None, timeout_s: float = 60.0):
        from label_studio_sdk import LabelStudio

        self.url = url.rstrip("/")
        self.retry = retry or Retry()
        self.client = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout_s, max_retries=0)

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return self.retry.call(fn, what)
        except LabelStudioAPIError:
            raise
        except Exception as e:
            if type(e).__name__ == "ApiError" or _retryable(e):
                raise LabelStudioAPIError(f"{what}: {_describe(e)}") from None
            raise

    def label_config(self, project_id: int) -> str:
        project = self._call(lambda: self.client.projects.get(id=project_id), f"reading project {project_id}")
        return project.label_config

    def iter_tasks(
        self, project_id: int, query: str | None = None, view: int | None = None
    ) -> Iterator[dict]:
        """Brief tasks: {id, data, predictions_model_versions, total_annotations}, page by page."""
        page, seen = 1, 0
        while True:

            def fetch(page=page):
                return self.client.tasks.with_raw_response.list(
                    project=project_id,
                    include="id,data,predictions_model_versions,total_annotations",
                    query=query,
                    view=view,
                    page=page,
                    page_size=self.PAGE_SIZE,
                ).response.json()

            body = self._call(fetch, f"listing the tasks of project {project_id} (page {page})")
            tasks = body.get("tasks") or []
            yield from tasks
            seen += len(tasks)
            if not tasks or seen >= int(body.get("total", 0)):
                return
            page += 1

    def task(self, task_id: int) -> dict:
        """The whole task as Label Studio's JSON (annotations and predictions included)."""
        return self._call(
            lambda: self.client.tasks.with_raw_response.get(id=str(task_id)).response.json(),
            f"reading task {task_id}",
        )

    def prediction_versions(self, task_id: int) -> set[str]:
        return self._call(
            lambda: {p.model_version for p in self.client.predictions.list(task=task_id)},
            f"reading the predictions of task {task_id}",
        )

    def create_prediction(self, task_id: int, entry: dict, model_version: str) -> bool:
        """Write one prediction unless the task already has one of `model_version` (checked on
        every attempt, so a retry after a lost response does not write it twice). True if
        written."""

        def attempt() -> bool:
            if model_version in {p.model_version for p in self.client.predictions.list(task=task_id)}:
                return False
            self.client.predictions.create(
                task=task_id, result=entry["result"], score=entry.get("score"), model_version=model_version
            )
            return True

        return self._call(attempt, f"writing the prediction of task {task_id}")


# --- the CLI job over a project ------------------------------------------------------------------


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
            f"{'interrupted' if self.interrupted else 'finished'} after {_duration(self.seconds)}: "
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
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="task", dynamic_ncols=True, smoothing=0.1)

    def update(self, summary: Summary) -> None:
        self.n += 1
        status = dict(done=summary.done, skipped=sum(summary.skipped.values()), failed=len(summary.failed))
        if self.bar is not None:
            self.bar.set_postfix(status, refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s or self.n == self.total:
            self.last = now
            rate = self.n / max(now - self.started, 1e-9)
            eta = _duration((self.total - self.n) / rate) if rate > 0 else "?"
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


def _already_predicted(brief: dict, model_version: str) -> bool:
    """From the task list's comma-joined `predictions_model_versions` (a version with a comma in
    it is checked again on the whole task)."""
    versions = brief.get("predictions_model_versions") or ""
    return "," not in model_version and model_version in {v.strip() for v in versions.split(",")}


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
    from backend.segment import ImageSegmenter

    started = time.monotonic()
    stop = stop or threading.Event()
    selection = selection or Selection()
    media_retry = media_retry or Retry(attempts=3)
    model_version = model_version or segmenter.model_version
    config = parse_label_config(api.label_config(project_id))
    media = _PrefetchedMedia(segmenter.media)
    engine = Preannotator(ImageSegmenter(segmenter.predictor, media, model_version), options)
    config = engine.check(config)

    summary = Summary()
    todo = []
    for brief in api.iter_tasks(project_id, selection.query(), selection.view):
        if not selection.keeps(brief):
            continue
        summary.selected += 1
        if _already_predicted(brief, model_version):
            summary.skipped[f"already has a prediction of {model_version}"] += 1
        elif (
            options.mode == "boxes"
            and options.boxes_from == "annotation"
            and not brief.get("total_annotations")
        ):
            summary.skipped["no annotation"] += 1
        else:
            todo.append(brief)
    todo.sort(key=lambda b: b["id"])
    log.info(
        "project %s: %d task(s) selected, %d to pre-annotate (%s mode, model_version %s)",
        project_id,
        summary.selected,
        len(todo),
        options.mode,
        model_version,
    )

    def fetch(brief: dict) -> _Fetched:
        task = api.task(brief["id"])
        if any(p.get("model_version") == model_version for p in task.get("predictions") or []):
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
                    (task_id, _describe(e) if not isinstance(e, LabelStudioAPIError) else str(e))
                )

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
                    fetched = future.result()
                    if fetched.skip is not None:
                        with lock:
                            summary.skipped[fetched.skip] += 1
                    else:
                        outcome = engine.predict(fetched.task, config)
                        media.discard(fetched.url, task_id)
                        if outcome.entry is None:
                            with lock:
                                summary.skipped[outcome.skip or "nothing to predict"] += 1
                        else:
                            entry = outcome.entry
                            w = writer.submit(api.create_prediction, task_id, entry, model_version)
                            w.add_done_callback(lambda f, t=task_id: wrote(t, f))
                            pending_writes.append(w)
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


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _task_ids(text: str) -> frozenset[int]:
    """ "1,2,10-12" -> {1, 2, 10, 11, 12}."""
    ids: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            ids.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"task ids look like 1,2,10-12, got {text!r}") from None
    return frozenset(ids)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "preannotate",
        help="pre-annotate a whole Label Studio project (writes predictions only; resumable)",
        description="Boxes to masks (a mask per rectangle of the latest annotation) or automatic masks "
        "for every task of a project, written to Label Studio as predictions. Tasks that already have "
        "a prediction of this model version are skipped, so an interrupted run continues where it "
        "stopped. Label Studio: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or --url / --api-key).",
    )
    p.add_argument("--project", type=int, required=True, help="project id")
    p.add_argument("--mode", choices=MODES, default=None, help="boxes (default) | auto (RETRIEVE_MODE)")
    p.add_argument(
        "--from",
        dest="boxes_from",
        choices=SOURCES,
        default=None,
        help="rectangles of the latest annotation (default) or prediction (BOXES_FROM)",
    )
    p.add_argument(
        "--output",
        choices=OUTPUTS,
        default=None,
        help="auto: the config's control | brush | polygon (OUTPUT)",
    )
    p.add_argument(
        "--tolerance", type=float, default=None, help="polygon simplification in pixels (POLYGON_TOLERANCE)"
    )
    p.add_argument("--label", default=None, help="label of automatic masks (AUTO_LABEL)")
    p.add_argument(
        "--roi-label", default=None, help="automatic masks only inside rectangles with this label (ROI_LABEL)"
    )
    p.add_argument(
        "--points-per-side", type=int, default=None, help="automatic-mask grid (POINTS_PER_SIDE, 16)"
    )
    p.add_argument(
        "--min-area", type=int, default=None, help="smallest automatic mask in pixels (MIN_AREA, 100)"
    )
    p.add_argument(
        "--iou-thresh", type=float, default=None, help="minimum predicted IoU (AUTO_IOU_THRESH, 0.8)"
    )
    p.add_argument(
        "--stability-thresh", type=float, default=None, help="minimum stability (AUTO_STABILITY_THRESH, 0.92)"
    )
    p.add_argument(
        "--max-masks", type=int, default=None, help="automatic masks per image at most (AUTO_MAX_MASKS, 100)"
    )
    p.add_argument(
        "--filter",
        default="all",
        help="all | annotated | unannotated | Data Manager filters as JSON, "
        'e.g. \'{"conjunction":"and","items":[{"filter":"filter:tasks:total_annotations",'
        '"operator":"greater","type":"Number","value":0}]}\'',
    )
    p.add_argument("--view", type=int, default=None, help="only the tasks of this Data Manager tab (view id)")
    p.add_argument("--tasks", type=_task_ids, default=None, help="only these task ids: 1,2,10-12")
    p.add_argument(
        "--model", default=None, help="SAM2 model (SAM2_MODEL): short name, hub id, directory or .pt"
    )
    p.add_argument("--device", default=None, help="auto | cpu | cuda | mps (DEVICE)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--model-version",
        default=None,
        help="model_version of the predictions (default: the backend's, so "
        "Label Studio's Retrieve predictions skips what this run did, and the other way round)",
    )
    p.add_argument("--prefetch", type=int, default=2, help="tasks downloaded ahead (default 2)")
    p.add_argument("--retries", type=int, default=5, help="attempts per Label Studio call (default 5)")
    p.add_argument("--url", default=None, help="Label Studio URL (LABEL_STUDIO_URL)")
    p.add_argument(
        "--api-key",
        default=None,
        help="prefer LABEL_STUDIO_API_KEY: a key on the command line is visible to other users",
    )
    p.set_defaults(fn=cmd_preannotate)


def cmd_preannotate(args) -> None:
    from backend.cli import setup_logging
    from backend.settings import Settings

    settings = Settings.from_env(
        model=args.model, device=args.device, label_studio_url=args.url, label_studio_api_key=args.api_key
    )
    setup_logging(settings.log_level)
    if not settings.label_studio_url or not settings.label_studio_api_key:
        sys.exit("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or --url / --api-key) to reach Label Studio")
    try:
        options = PreannotateOptions.from_settings(
            settings,
            mode=args.mode,
            boxes_from=args.boxes_from,
            output=args.output,
            polygon_tolerance_px=args.tolerance,
            auto_label=args.label,
            roi_label=args.roi_label,
            points_per_side=args.points_per_side,
            min_area_px=args.min_area,
            iou_thresh=args.iou_thresh,
            stability_thresh=args.stability_thresh,
            max_masks=args.max_masks,
        )
        selection = Selection(args.filter, args.view, args.tasks)
        selection.query()
    except ValueError as e:
        sys.exit(f"preannotate: {e}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("stopping after the current task (Ctrl-C again to abort at once)")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    from backend.app import Runtime
    from backend.metrics import Metrics
    from sam2.models import ModelUnavailable, load_image_model

    try:
        api = LabelStudioAPI(
            settings.label_studio_url, settings.label_studio_api_key, Retry(attempts=max(1, args.retries))
        )
        api.label_config(args.project)  # fail fast on a wrong URL, token or project id
        loaded = load_image_model(settings.model, settings.device)
    except (LabelStudioAPIError, ModelUnavailable) as e:
        sys.exit(f"preannotate: {e}")
    except Exception as e:  # the SDK refuses an expired token while constructing
        sys.exit(f"preannotate: cannot use Label Studio at {settings.label_studio_url}: {_describe(e)}")
    runtime = Runtime(replace(settings, preload=False), Metrics(), loaded)
    log.info("model %s on %s; model_version %s", loaded.source, loaded.device, runtime.model_version)
    try:
        summary = run_project(
            api,
            args.project,
            runtime.segmenter,
            options,
            model_version=args.model_version or runtime.model_version,
            selection=selection,
            prefetch=args.prefetch,
            stop=stop,
        )
    except (BadRequest, LabelStudioAPIError) as e:
        sys.exit(f"preannotate: {e.message if isinstance(e, BadRequest) else e}")
    print(summary.report(), flush=True)
    sys.exit(summary.exit_code)
