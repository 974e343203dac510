"""`label-studio-sam2 worker`: an RQ worker that loads SAM2 once and runs queued jobs with it.

One process per GPU (`--device cuda:N`), on any machine that reaches Redis and Label Studio. The
model loads once, before the first job, and stays loaded: jobs run in this process (RQ's
`SimpleWorker`, no fork per job). A job is a chunk of task ids (`label_studio_sam2.service.jobqueue.Chunk`) of a
project. What runs a chunk is the annotation tool's adapter's (`Runner`; Label Studio's:
`label_studio_sam2.labelstudio.jobs.JobRunner`): it reads the project's label config and each task
from Label Studio with the worker's own token, and a task that is not the project's is not predicted (`lsapi.project_task`; whoever
queued the job may have had only a request's word for the ids). Each task is predicted and
written through the Label Studio API only if absent (`label_studio_sam2.labelstudio.api.write_if_absent`;
a video task is tracked to the end; a warm job encodes the image into the shared embedding store
instead), and its outcome is counted in Redis. A job carries the server's non-secret effective
settings (`label_studio_sam2.service.handoff.job_settings`): the worker tracks videos with the
server's limits and refuses a job queued for another model (its tasks fail, saying why).

Losing a worker loses nothing:
- SIGKILL (or a lost machine): the worker renews the lease on its job every JOB_LEASE_S / 3 (a
  heartbeat thread; RQ's execution heartbeat in its StartedJobRegistry). When renewals stop, the
  lease runs out after JOB_LEASE_S, and the next registry maintenance of any other worker (every
  JOB_LEASE_S / 3, busy or idle) requeues the job (RQ's abandoned-job handling, up to
  jobqueue.RETRIES times): within 2 x JOB_LEASE_S of the kill. The retry skips the tasks the dead
  worker had written.
- SIGTERM (or Ctrl-C): the current task is finished and written, the rest of the chunk goes
  back to the front of the queue, and the worker exits. A second signal stops at once (the lease
  then brings the chunk back). The log says how much of the chunk was done and how much handed
  back (not RQ's "Job OK").

Redis going away does not stop a worker: it waits with back-off (RQ's, 1 s doubling to 60 s),
logs the outage once when it starts, again at growing intervals while it lasts and once when it
ends (`RedisOutage`), and SIGTERM during an outage exits cleanly (the worker's entry in Redis
expires by itself).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Protocol

import redis
from rq import SimpleWorker
from rq.exceptions import AbandonedJobError
from rq.serializers import JSONSerializer

from label_studio_sam2.service import redisconn
from label_studio_sam2.service.jobqueue import (
    QUEUE_NAME,
    Chunk,
    JobQueue,
    ProjectJob,
    QueueUnavailable,
    chunk_from_job,
    refusal,
)
from label_studio_sam2.service.runtime import Runtime
from label_studio_sam2.service.settings import Settings

log = logging.getLogger("label_studio_sam2.service.worker")

REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class RedisOutage:
    """One Redis outage, as a worker reports it: a WARNING when it starts, again after 1, 2, 4, ...
    minutes (at most every `max_every_s`) while it lasts, and a line when Redis answers again;
    `backoff()` gives the next wait of a retry loop (2 s doubling to 60 s)."""

    def __init__(self, where: str, first_s: float = 2.0, max_s: float = 60.0, max_every_s: float = 600.0):
        self.where, self.first_s, self.max_s, self.max_every_s = where, first_s, max_s, max_every_s
        self._lock = threading.Lock()
        self.since: float | None = None
        self._wait = first_s
        self._every = 60.0
        self._next_log = 0.0

    def failed(self, error: BaseException | str) -> None:
        why = error if isinstance(error, str) else f"{type(error).__name__}: {str(error)[:200]}"
        with self._lock:
            now = time.monotonic()
            if self.since is None:
                self.since, self._next_log, self._every = now, now + 60.0, 60.0
                log.warning(
                    "Redis at %s cannot be reached (%s): waiting for it, retrying with back-off up to "
                    "every %.0f s; queued work stays queued",
                    self.where,
                    why,
                    self.max_s,
                )
            elif now >= self._next_log:
                self._every = min(self._every * 2, self.max_every_s)
                self._next_log = now + self._every
                log.warning(
                    "Redis at %s still cannot be reached after %.0f s (%s)", self.where, now - self.since, why
                )

    def backoff(self) -> float:
        with self._lock:
            wait, self._wait = self._wait, min(self._wait * 2, self.max_s)
            return wait

    def recovered(self) -> None:
        with self._lock:
            if self.since is None:
                return
            down, self.since, self._wait = time.monotonic() - self.since, None, self.first_s
        log.warning("Redis at %s answers again (unreachable for %.0f s)", self.where, down)


class _RQLog(logging.Filter):
    """RQ's own lines that would mislead: an ERROR per failed Redis try (the outage reports those),
    and "Job OK" for a chunk the worker cut short (the worker says what it did instead)."""

    def __init__(self, outage: RedisOutage, runner: Runner):
        super().__init__()
        self.outage, self.runner = outage, runner

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if "could not connect to Redis" in text:
            args = record.args if isinstance(record.args, tuple) else ()
            self.outage.failed(
                args[1] if len(args) > 1 and isinstance(args[1], BaseException) else "no answer"
            )
            return False
        # RQ logs these inside the job's execution: while a chunk that stopped part way runs
        if self.runner.current_job and self.runner.handed_back is not None:
            return not ("Successfully completed" in text or "Job OK" in record.getMessage())
        return True


class Runner(Protocol):
    """What runs a chunk, built once per worker process by the annotation tool's adapter (Label
    Studio's: `label_studio_sam2.labelstudio.jobs.JobRunner`, which reads the tasks and writes the
    predictions through the LS API). `run(chunk)` -> outcome counts; `queue`: the job queue (the
    runner records each task's outcome there); `stopping` is set by SIGTERM (the chunk stops after
    its task); `current_job`: the RQ job id of the chunk running; `handed_back`: (done, handed
    back) when the chunk stopped part way, else None."""

    queue: JobQueue
    stopping: threading.Event
    current_job: str | None
    handed_back: tuple[int, int] | None

    def run(self, chunk: Chunk) -> dict: ...


_runner: Runner | None = None  # RQ imports job functions by name: they reach the model here


def run_chunk(data: dict) -> dict:
    """The RQ job: one chunk of tasks (`label_studio_sam2.service.jobqueue.JOB_FUNC`)."""
    if _runner is None:
        raise RuntimeError(
            "label_studio_sam2.service.worker.run_chunk runs inside `label-studio-sam2 worker`"
        )
    return _runner.run(chunk_from_job(data))


class ModelWorker(SimpleWorker):
    """RQ's SimpleWorker (jobs run in this process, so the model stays loaded) with a lease on
    the running job renewed by a heartbeat thread, abandoned jobs of dead workers requeued from
    that thread too, per-worker job metrics in Redis, and SIGTERM stopping after the task.

    Only this backend's own jobs run (`label_studio_sam2.service.jobqueue.refusal`): any other job (a function,
    callback or dependency it never enqueues, written to Redis by someone else) is logged, marked
    failed without retries and never imported or run."""

    def __init__(self, *args, runner: Runner, lease_s: float, outage: RedisOutage, **kwargs):
        self.runner = runner
        self.lease_s = lease_s
        self.outage = outage
        tick = max(1, int(lease_s / 3))
        super().__init__(
            *args, worker_ttl=15 + tick, maintenance_interval=tick, job_class=ProjectJob, **kwargs
        )
        self.push_exc_handler(_log_abandoned)
        self._filter = _RQLog(outage, runner)
        self.log.addFilter(self._filter)

    # --- Redis away: wait for it, say so once, never a traceback ------------------------------------
    def heartbeat(self, *args, **kwargs):
        try:
            super().heartbeat(*args, **kwargs)
        except REDIS_DOWN as e:
            self.outage.failed(e)  # the next Redis call (the dequeue) waits with RQ's back-off
        else:
            self.outage.recovered()

    def set_state(self, state, pipeline=None):
        try:
            super().set_state(state, pipeline)
        except REDIS_DOWN as e:
            self._state = state
            self.outage.failed(e)

    def check_for_suspension(self, burst: bool) -> None:
        try:
            super().check_for_suspension(burst)
        except REDIS_DOWN as e:
            self.outage.failed(e)

    def run_maintenance_tasks(self):
        try:
            super().run_maintenance_tasks()
        except REDIS_DOWN as e:
            self.outage.failed(e)

    def _pubsub_exception_handler(self, exc, pubsub, pubsub_thread) -> None:
        # RQ's logs an ERROR and retries every 2 s, for as long as Redis is away
        if isinstance(exc, redis.exceptions.ConnectionError):
            self.outage.failed(exc)
            time.sleep(self.outage.backoff())
            return
        super()._pubsub_exception_handler(exc, pubsub, pubsub_thread)

    def teardown(self):
        try:
            super().teardown()
        except REDIS_DOWN:
            log.warning(
                "worker %s stopped while Redis at %s cannot be reached: its entry there expires by itself",
                self.name,
                self.outage.where,
            )
            if self.pubsub_thread is not None:
                self.pubsub_thread.stop()

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return int(self.lease_s)

    def execute_job(self, job, queue):
        execution = self.prepare_execution(job)
        why = refusal(job)
        if why is not None:
            self._refuse(job, queue, execution, why)
            return
        done = threading.Event()
        beat = threading.Thread(target=self._renew, args=(job, execution, done), name="lease", daemon=True)
        beat.start()
        start = time.monotonic()
        ok = False
        self.runner.current_job, self.runner.handed_back = job.id, None
        try:
            ok = self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join()
            if self.runner.handed_back is not None:
                did, rest = self.runner.handed_back
                log.warning(
                    "job %s stopped part way: %d task(s) done, the other %d handed back to the queue",
                    job.id,
                    did,
                    rest,
                )
            self.runner.current_job = None
            try:
                self.runner.queue.worker_finished_job(self.name, time.monotonic() - start, failed=not ok)
            except QueueUnavailable as e:
                log.warning("%s", e.message)
        self.set_state("idle")

    def _refuse(self, job, queue, execution, why: str) -> None:
        """Fail a job that is not this backend's, without running or importing anything of it."""
        log.warning(
            "refused job %r: %s; marked failed, not run (REDIS_URL is writable by someone else?)", job.id, why
        )
        job.retries_left = 0  # a refused job is never retried
        self.handle_job_failure(
            job, queue, exc_string=f"refused by the sam2 worker: {why}", execution=execution
        )
        with contextlib.suppress(QueueUnavailable):
            self.runner.queue.worker_finished_job(self.name, 0.0, failed=True)
        self.set_state("idle")

    def _renew(self, job, execution, done: threading.Event) -> None:
        tick = max(1.0, self.lease_s / 3)
        while not done.wait(tick):
            try:
                self.maintain_heartbeats(job, execution)
                if self.should_run_maintenance_tasks:
                    self.clean_registries()  # requeue the jobs of workers that stopped renewing
            except Exception as e:  # Redis away for a moment: the lease has slack for that
                log.warning("could not renew the job's lease: %s", f"{type(e).__name__}: {str(e)[:200]}")

    def request_stop(self, signum, frame):
        if not self.runner.stopping.is_set():
            log.warning("stopping after the current task (signal again to stop at once)")
        self.runner.stopping.set()
        super().request_stop(signum, frame)


def _log_abandoned(job, exc_type, exc_value, traceback) -> bool:
    """RQ's registry maintenance found a job whose worker stopped renewing its lease."""
    if exc_type is AbandonedJobError:
        left = job.retries_left or 0
        log.warning(
            "job %s was abandoned by its worker (lease expired): %s",
            job.id,
            f"requeued ({left - 1} retr{'y' if left == 2 else 'ies'} left after this one)"
            if left
            else "failed for good",
        )
    return True  # the other handlers (RQ's own) still run


def work(
    settings: Settings, runtime: Runtime, runner: Runner, queue: JobQueue, name: str, burst: bool
) -> None:
    """Take and run this backend's jobs from the queue until stopped (or, with `burst`, until the
    queue is empty): the worker process's main loop, with the model already loaded in `runtime`
    and the adapter's `runner` (Label Studio's: `label_studio_sam2.labelstudio.jobs.JobRunner`)."""
    global _runner
    _runner = runner
    worker = ModelWorker(
        [QUEUE_NAME],
        name=name,
        connection=redisconn.connect(settings.redis_url, socket_timeout_s=None),
        serializer=JSONSerializer,
        runner=_runner,
        lease_s=settings.job_lease_s,
        outage=RedisOutage(queue.where),
    )
    log.info(
        "worker %s: model %s on %s, queue %r at %s, job lease %.0f s",
        name,
        runtime.image_model.source,
        runtime.image_model.device,
        QUEUE_NAME,
        queue.where,
        settings.job_lease_s,
    )
    worker.work(burst=burst, logging_level=settings.log_level)
