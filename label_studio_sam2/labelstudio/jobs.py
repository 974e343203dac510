"""Label Studio's queued jobs: what a `label-studio-sam2 worker` does with each chunk.

The RQ worker itself (the loaded model, the lease and heartbeat, Redis outages, SIGTERM) is the
service's (label_studio_sam2.service.worker); a chunk's tasks are Label Studio's. `JobRunner`
reads the project's label config and each task from Label Studio with the worker's own token (a
task that is not the project's is not predicted: `project_task`), and writes each prediction
through the LS API only if absent (`write_if_absent`): bulk pre-annotation, a video task's whole
track, or a warm job's image encoded into the shared embedding store.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import replace

from label_studio_sam2.labelstudio.api import (
    LabelStudioAPI,
    LabelStudioAPIError,
    project_task,
)
from label_studio_sam2.labelstudio.bulk import Preannotator
from label_studio_sam2.labelstudio.protocol import parse_label_config
from label_studio_sam2.labelstudio.retrieve import predict_and_write_why, track_and_write
from label_studio_sam2.service.bulk import PreannotateOptions
from label_studio_sam2.service.errors import BackendError, BadRequest
from label_studio_sam2.service.handoff import job_differences, job_refusal, video_limits
from label_studio_sam2.service.jobqueue import Chunk, JobQueue
from label_studio_sam2.service.runtime import Runtime
from label_studio_sam2.service.warm import UrlIndex, encode_into_store

log = logging.getLogger("label_studio_sam2.service.worker")  # one log for the worker process


class JobRunner:
    """What a job needs, built once per worker process: the loaded model (Runtime), the Label
    Studio API and the queue. `stopping` is set by SIGTERM: the chunk stops after its task."""

    def __init__(self, runtime: Runtime, api: LabelStudioAPI, queue: JobQueue):
        self.runtime = runtime
        self.api = api
        self.queue = queue
        self.stopping = threading.Event()
        self.current_job: str | None = None  # the RQ job id of the chunk running
        self.handed_back: tuple[int, int] | None = None  # (done, handed back) when it stopped part way
        self._index: UrlIndex | None = None  # the store's URL index, for warm jobs
        self._told: str | None = (
            None  # the last run whose settings that differ from this worker's were logged
        )

    def run(self, chunk: Chunk) -> dict:
        """Predict and write the chunk's tasks; returns the outcome counts. The label config is
        the project's, read from Label Studio now (not the one the chunk carries)."""
        try:
            if chunk.project is None:
                raise LabelStudioAPIError("the run names no project to read its tasks from")
            chunk = replace(chunk, label_config=self.api.label_config(chunk.project))
            config = parse_label_config(chunk.label_config)
        except (LabelStudioAPIError, BadRequest) as e:  # every task would fail the same way: say it once
            log.warning("run %s: %s", chunk.run, e.message if isinstance(e, BadRequest) else e)
            for task_id in chunk.task_ids:
                self.queue.record(chunk.run, task_id, "failed")
                self.queue.release(task_id)
            return {"failed": len(chunk.task_ids)}
        why = job_refusal(chunk.settings, self.runtime.image_model.model_id)
        if why is not None:  # predictions of another model under this version: refused, said once
            log.warning("run %s refused: %s", chunk.run, why)
            for task_id in chunk.task_ids:
                self.queue.record(chunk.run, task_id, "failed", why)
                self.queue.release(task_id)
            return {"failed": len(chunk.task_ids)}
        differ = job_differences(chunk.settings, self.runtime.settings)
        if differ and chunk.run != self._told:  # the worker's hardware is its own: said once a run
            self._told = chunk.run
            log.info(
                "run %s: queued by a server with %s; this worker runs with its own",
                chunk.run,
                ", ".join(differ),
            )
        if chunk.kind == "video":
            return self._each(chunk, lambda task: self._track(task, config, chunk))
        if chunk.kind == "warm":
            return self._each(chunk, lambda task: self._warm(task, config))
        engine = Preannotator(self.runtime.segmenter_for(chunk.project), PreannotateOptions(**chunk.options))
        try:
            engine.check(config)
        except BadRequest as e:  # every task would fail the same way: say it once
            log.warning("run %s: %s", chunk.run, e.message)
            for task_id in chunk.task_ids:
                self.queue.record(chunk.run, task_id, "failed", e.message)
            return {"failed": len(chunk.task_ids)}
        version = chunk.model_version or engine.model_version
        return self._each(chunk, lambda task: predict_and_write_why(self.api, engine, task, config, version))

    def _each(self, chunk: Chunk, predict) -> dict:
        """`predict(task)` -> outcome for each task of the chunk, fetched from Label Studio, until
        the run is cancelled or the worker is stopping (then the rest goes back to the queue)."""
        counts: Counter = Counter()
        for i, task_id in enumerate(chunk.task_ids):
            if self.queue.cancelled(chunk.run):
                log.info(
                    "run %s cancelled: %d task(s) of this chunk left", chunk.run, len(chunk.task_ids) - i
                )
                break
            if self.stopping.is_set():
                rest = chunk.task_ids[i:]
                self.queue.enqueue([replace(chunk, task_ids=rest)], at_front=True)
                self.handed_back = (i, len(rest))
                counts["handed back"] = len(rest)  # the job's result says so too
                break
            why = None
            try:
                task = project_task(self.api, task_id, chunk.project)
            except LabelStudioAPIError as e:
                log.warning("task %r: %s", task_id, e)
                outcome, why = "failed", str(e)
            else:
                outcome = predict(task)
                if isinstance(outcome, tuple):  # (outcome, why it was skipped or failed)
                    outcome, why = outcome
            self.queue.record(chunk.run, task_id, outcome, why)
            self.queue.release(task_id)
            counts[outcome] += 1
        return dict(counts)

    def _track(self, task: dict, config, chunk: Chunk) -> str:
        """A video task's whole track, written unless the task has a prediction of this version
        already; the limits are the server's, as the job carries them."""
        runtime = self.runtime
        version = chunk.model_version or runtime.model_version
        limits = video_limits(runtime.settings, chunk.settings)
        return track_and_write(runtime, self.api, task, config, chunk.label_config, version, limits)

    def _warm(self, task: dict, config) -> str:
        """Encode the task's image into the embedding store (shared with the server and the other
        workers); "skipped" if it is there already."""
        runtime, task_id = self.runtime, task["id"]
        if runtime.store is None:
            log.warning(
                "task %r not encoded: this worker has no embedding store (EMBEDDING_STORE_DIR)", task_id
            )
            return "failed"
        url = (task.get("data") or {}).get(config.images()[0].value_key) if config.images() else None
        if not isinstance(url, str) or not url:
            return "skipped"
        try:
            image = runtime.media.load_image(url, task_id)
            predictor = runtime.require().predictor
            if self._index is None:  # read once per worker, as one `warm` run does
                self._index = UrlIndex(runtime.store.dir)
            return (
                "done" if encode_into_store(predictor, runtime.store, self._index, url, image) else "skipped"
            )
        except BackendError as e:
            log.warning("task %r not encoded: %s", task_id, e.message)
        except Exception:
            log.exception("task %r not encoded", task_id)
        return "failed"
