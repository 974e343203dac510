"""Label Studio's "Retrieve predictions": answer within the deadline, hand the rest off.

Label Studio sends the whole selection in one /predict and drops everything if the answer takes
longer than 100 s. `retrieve_worker` runs the engine task by task while the deadline allows and
answers the rest with an empty list (Label Studio stores no prediction for it); the process's
`BackgroundJob` predicts those tasks and writes them through the LS API.

What is handed off is a task id and the request's project, nothing else: the background job (or
the queue's worker) reads the task and the project's label config from Label Studio with the
backend's own token, checks that the task belongs to the project (`lsapi.project_task`), and only
then predicts and writes. The task dicts and label config of a request are never written back:
anyone who can reach /predict can send them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from label_studio_sam2.labelstudio.api import (
    LabelStudioAPI,
    LabelStudioAPIError,
    describe,
    project_task,
    write_if_absent,
)
from label_studio_sam2.labelstudio.bulk import Preannotator
from label_studio_sam2.labelstudio.project_job import duration
from label_studio_sam2.labelstudio.protocol import LabelConfig, parse_label_config, task_data_url
from label_studio_sam2.labelstudio.regions import task_entry
from label_studio_sam2.labelstudio.video import predict_video_task
from label_studio_sam2.service.bulk import PreannotateOptions
from label_studio_sam2.service.errors import BackendError, Unavailable
from label_studio_sam2.service.handoff import video_limits
from label_studio_sam2.service.jobqueue import CHUNK_TIMEOUT_S
from label_studio_sam2.service.segment import TaskDeadline

log = logging.getLogger("label_studio_sam2.bulk")


def retrieve_worker(
    runtime,
    config: LabelConfig,
    deadline: float,
    segmenter=None,
    *,
    project: int | None = None,
) -> Callable[[dict], Any]:
    """`work(task)` for a /predict without context (Label Studio's "Retrieve predictions").

    Runs the engine while the deadline allows: a task is started only if the slowest of the last
    five tasks of this mode in this process (x1.25) would still finish in time; with no such
    history, automatic masks (a minute or more per image on a CPU) go straight to the background
    job when there is one. The rest of the request, and every task while the background job is
    busy, is answered with an empty list, which Label Studio reads as "no prediction for this
    task" (it stores nothing, so nothing blocks a later retrieval); the background job, if there
    is one, predicts them and writes the predictions through the LS API. `segmenter`: the
    project's (a fine-tuned decoder), default the runtime's.

    With REDIS_URL the hand-off goes to the job queue instead (`QueuedHandoff`: the task ids and
    `project` travel with it): call `work.finish()` after the last task to queue it; it raises
    QueueUnavailable (503) when Redis is down, as does the first hand-off. Either way only task
    ids are handed off, and only with a `project` to check them against: the job reads each task
    and the label config from Label Studio, never the request's.
    """
    segmenter = segmenter or runtime.segmenter
    try:
        options = PreannotateOptions.from_settings(runtime.settings)
    except ValueError as e:  # OUTPUT=svg, say: the server's configuration, said plainly
        raise BackendError(f"bulk pre-annotation settings: {e}") from None
    engine = Preannotator(segmenter, options)
    queue = runtime.handoff.queue  # RQ with REDIS_URL, else this process's background job
    if project is None:
        job = None  # nothing to check the tasks against: the rest stays unpredicted (logged below)
    elif queue is not None and runtime.settings.background_job:
        job = QueuedHandoff(queue, project, segmenter.model_version)
    else:
        job = background_job(runtime)
    mode = engine.options.mode
    checked = handing_off = False
    skipped: Counter = Counter()  # why tasks got no prediction (the app logs them once per request)

    def work(task: dict):
        nonlocal checked, handing_off
        if not checked:
            engine.check(config)  # a config these options cannot use: the request gets a 400
            checked = True
        task_id = task.get("id")
        if job is not None and isinstance(task_id, int) and job.holds(task_id):
            return []  # handed off by an earlier request, still on its way
        estimate = task_times(runtime).slowest(mode)
        if estimate is None:
            too_long = mode == "auto" and job is not None
        else:
            too_long = time.monotonic() + 1.25 * estimate > deadline
        if handing_off or (job is not None and job.busy) or too_long:
            return hand_off(task)
        start = time.monotonic()
        try:
            outcome = engine.predict(task, config, deadline)
        except TaskDeadline:  # cut between two decoder batches: as if not started in time
            return hand_off(task)
        finally:
            task_times(runtime).record(mode, time.monotonic() - start)
        if outcome.entry is None or not outcome.entry["result"]:
            why = outcome.skip or "no mask found"
            log.info("retrieve: no prediction for task %s: %s", task_id, why)
            skipped[why] += 1
            return task_entry([], engine.model_version)
        return outcome.entry

    def hand_off(task: dict) -> list:
        nonlocal handing_off
        task_id = task.get("id")
        if not handing_off:
            handing_off = True
            if job is not None:
                log.info("retrieve: handing the rest of this request to the background job")
            else:
                log.warning(
                    "retrieve: the deadline is near and no background job is available "
                    "(BACKGROUND_JOB=false, no LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY, or a request "
                    "without a project id): the rest of this request stays unpredicted; retrieve "
                    "again (Label Studio sends only tasks without a prediction) or run "
                    "`label-studio-sam2 preannotate`"
                )
        if job is not None and isinstance(task_id, int):
            job.submit(task_id, project, engine.options, segmenter)  # the id only: re-read there
        return []

    work.skipped = skipped
    work.finish = job.finish if isinstance(job, QueuedHandoff) else lambda: None
    return work


class QueuedHandoff:
    """Retrieve's hand-off with REDIS_URL: the tasks one request could not answer go to the job
    queue as one run (`finish()`), which `label-studio-sam2 worker` processes; queued tasks are
    held, so a later Retrieve does not queue them twice. It survives restarts of the server."""

    busy = False  # the workers have their own model: this server keeps answering what fits

    def __init__(self, queue, project: int, model_version: str):
        self.queue = queue
        self.project = project
        self.model_version = model_version
        self._ids: list[int] = []
        self._options: PreannotateOptions | None = None
        self._down = False

    def holds(self, task_id: int) -> bool:
        if self._down:
            return False
        try:
            return self.queue.holds(task_id)
        except Unavailable:  # Redis down: answer what fits; a hand-off, if one is needed, says so
            self._down = True
            return False

    def submit(self, task_id: int, project: int, options: PreannotateOptions | None, segmenter=None) -> None:
        """Hand over a task: an image task predicted with `options`, or (`options` None) a video
        task the request's deadline cut, tracked whole."""
        if not self._ids:
            self.queue.workers()  # Redis down: the request fails now, clearly, not after the last task
        self._ids.append(task_id)
        self._options = options

    def finish(self) -> None:
        if not self._ids:
            return
        run = self.queue.start_run(
            self._ids,
            project=self.project,
            label_config="",  # the worker reads the project's from Label Studio
            options=asdict(self._options),
            model_version=self.model_version,
            source="retrieve",
        )
        self.queue.hold(self._ids)  # after: a failed start_run holds nothing back
        workers = self.queue.workers()
        log.info(
            "retrieve: %d task(s) queued as run %s for `label-studio-sam2 worker` (%d worker(s) listening)",
            len(self._ids),
            run.id,
            workers,
        )
        if not workers:
            log.warning(
                "retrieve: no worker is listening on the queue: start `label-studio-sam2 worker` with "
                "the same REDIS_URL, or the queued tasks wait"
            )
        self._ids = []


class TaskTimes:
    """Seconds the last five tasks of each mode took in this process (one per Runtime)."""

    def __init__(self, keep: int = 5):
        self._recent: dict[str, deque] = {}
        self._keep = keep
        self._lock = threading.Lock()

    def slowest(self, mode: str) -> float | None:
        """The slowest of the last five tasks of `mode`, or None before the first."""
        with self._lock:
            recent = self._recent.get(mode)
            return max(recent) if recent else None

    def record(self, mode: str, seconds: float) -> None:
        with self._lock:
            self._recent.setdefault(mode, deque(maxlen=self._keep)).append(seconds)


def task_times(runtime) -> TaskTimes:
    """The runtime's "Retrieve predictions" task times (kept in `runtime.extensions`)."""
    return runtime.extension("labelstudio.task_times", TaskTimes)


BACKGROUND_JOB = "labelstudio.background_job"  # its key in runtime.extensions


def background_job(runtime, api: LabelStudioAPI | None = None) -> BackgroundJob | None:
    """The process's background job for "Retrieve predictions", created on first use (with
    `api`, else a client for the configured Label Studio) and kept in `runtime.extensions`; None
    when it is switched off or Label Studio's API is not configured."""
    settings = runtime.settings
    if not (settings.background_job and settings.label_studio_url and settings.label_studio_api_key):
        return None

    def create() -> BackgroundJob | None:
        try:
            client = api or LabelStudioAPI(settings.label_studio_url, settings.label_studio_api_key)
        except Exception as e:  # an expired token, say: say so, answer what can be answered
            log.warning("no background job: cannot use the Label Studio API (%s)", describe(e))
            return None
        return BackgroundJob(runtime, client)

    return runtime.extension(BACKGROUND_JOB, create)


def background_job_holds(runtime, task_id) -> bool:
    """The process's background job (if one was made) has `task_id` queued or running."""
    job = runtime.extensions.get(BACKGROUND_JOB)
    return job is not None and job.holds(task_id)


@dataclass
class _Handed:
    task_id: int
    project: int
    options: PreannotateOptions | None  # None: a video task, tracked whole
    segmenter: Any = None  # the project's; None: the runtime's


def track_and_write(
    runtime,
    api: LabelStudioAPI,
    task: dict,
    config: LabelConfig,
    label_config_xml: str,
    version: str,
    limits: dict,
) -> str:
    """A video task's whole track (no deadline but a job's, CHUNK_TIMEOUT_S), written unless the
    task has a prediction of `version` already: "done", "skipped" or "failed" (logged). The
    in-process background job and the queue's workers share it."""
    task_id = task["id"]

    def track():
        url = task_data_url(task, config, config.videos()[0].name)
        with runtime.media.lazy_file(url, task_id) as download:
            entry = predict_video_task(
                task,
                None,
                label_config_xml,
                download,
                runtime.video_tracker(),
                deadline_s=CHUNK_TIMEOUT_S,
                model_version=version,
                **limits,
            )
        return entry, "nothing tracked"

    try:
        return write_if_absent(api, task_id, version, track)[0]
    except (BackendError, LabelStudioAPIError) as e:
        log.warning("video task %r failed: %s", task_id, e.message if isinstance(e, BackendError) else e)
    except Exception:  # a bug must not cost the other tasks
        log.exception("video task %r failed", task_id)
    return "failed"


class BackgroundJob:
    """Tasks handed over by /predict, predicted one at a time in a daemon thread and written to
    Label Studio as predictions. One per process (under gunicorn, one per worker).

    Only a task id and its project are handed over: each task and the project's label config are
    read from Label Studio (`lsapi.project_task`), so a task of another project, or one that does
    not exist, is never written. Progress goes to the log every 10 s and to /metrics (`sam2_background_tasks_total{outcome}`,
    `sam2_background_tasks_pending`). The queue lives in memory: if the process stops, the
    tasks not yet written are simply not predicted (retrieve again, or use the CLI).
    """

    def __init__(self, runtime, api: LabelStudioAPI, log_every_s: float = 10.0):
        self.runtime = runtime
        self.api = api
        self.log_every_s = log_every_s
        self._cv = threading.Condition()
        self._queue: deque[_Handed] = deque()
        self._ids: set[int] = set()  # queued or being predicted
        self._configs: dict[int, tuple[str, LabelConfig]] = {}  # project -> label config, read once a batch
        self._thread: threading.Thread | None = None
        self.counts: Counter = Counter()
        self._outcomes = runtime.metrics.background_tasks
        runtime.metrics.watch_background(lambda: len(self._ids))

    def holds(self, task_id) -> bool:
        with self._cv:
            return task_id in self._ids

    @property
    def busy(self) -> bool:
        with self._cv:
            return bool(self._ids)

    def submit(self, task_id: int, project: int, options: PreannotateOptions | None, segmenter=None) -> None:
        """Hand over a task: an image task predicted with `options`, or (`options` None) a video
        task the request's deadline cut, tracked whole."""
        with self._cv:
            if task_id in self._ids:
                return
            self._ids.add(task_id)
            self._queue.append(_Handed(task_id, project, options, segmenter))
            if self._thread is None or not self._thread.is_alive():  # in-process: the server's model
                self._thread = self.runtime.handoff.thread(self._run, "preannotate-job")
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
        self._configs = {}  # a new batch reads the label config afresh
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
                self._ids.discard(item.task_id)
                self._cv.notify_all()
            if time.monotonic() - last_log >= self.log_every_s:
                last_log = time.monotonic()
                self._log(started, seen)

    def _process(self, item: _Handed) -> str:
        """Read the task and the project's label config from Label Studio, check the task is the
        project's, then predict and write (`predict_and_write`), or track and write a video."""
        engine = (
            None
            if item.options is None
            else Preannotator(item.segmenter or self.runtime.segmenter, item.options)
        )
        try:
            task = project_task(self.api, item.task_id, item.project)
            if item.project not in self._configs:
                xml = self.api.label_config(item.project)
                self._configs[item.project] = (xml, parse_label_config(xml))
            xml, config = self._configs[item.project]
            if engine is not None:
                engine.check(config)  # the project's config, not the request's
        except (BackendError, LabelStudioAPIError) as e:
            log.warning(
                "background job: %s %r failed: %s",
                "task" if engine is not None else "video task",
                item.task_id,
                e.message if isinstance(e, BackendError) else e,
            )
            return "failed"
        runtime = self.runtime
        if engine is None:
            limits = video_limits(runtime.settings)
            return track_and_write(runtime, self.api, task, config, xml, runtime.model_version, limits)
        return predict_and_write(self.api, engine, task, config, engine.model_version, task_times(runtime))

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
            "" if final or pending <= 0 else f", about {duration(pending / rate)} left",
        )


def predict_and_write(
    api: LabelStudioAPI,
    engine: Preannotator,
    task: dict,
    config: LabelConfig,
    model_version: str,
    task_times: TaskTimes | None = None,
) -> str:
    """Predict one task and write its prediction as `model_version` unless it already has one
    (checked before predicting and again before writing); the outcome: "done", "skipped" or
    "failed" (logged with the reason). The background job and the queue's workers share it."""
    return predict_and_write_why(api, engine, task, config, model_version, task_times)[0]


def predict_and_write_why(
    api: LabelStudioAPI,
    engine: Preannotator,
    task: dict,
    config: LabelConfig,
    model_version: str,
    task_times: TaskTimes | None = None,
) -> tuple[str, str | None]:
    """`predict_and_write`, with why a task was skipped or failed, in the in-process run's words
    (`no mask found`, `already has a prediction of V`, ...): a queued run reports them."""
    task_id = task["id"]

    def predict():
        start = time.monotonic()
        outcome = engine.predict(task, config)
        if task_times is not None:
            task_times.record(engine.options.mode, time.monotonic() - start)
        return outcome.entry, outcome.skip

    try:
        return write_if_absent(api, task_id, model_version, predict)
    except BackendError as e:
        log.warning("background job: task %r failed: %s", task_id, e.message)
        return "failed", e.message
    except LabelStudioAPIError as e:
        log.warning("background job: task %r failed: %s", task_id, e)
        return "failed", str(e)
    except Exception as e:
        log.exception("background job: task %r failed", task_id)
        return "failed", f"internal error ({type(e).__name__}): see the worker's log"
