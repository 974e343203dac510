"""The job queue (`REDIS_URL`): background work as RQ jobs over chunks of task ids, and the
progress and outcomes of every run counted in Redis.

A *run* is one selection handed to the queue at once: a `preannotate --queue`, or the tasks a
"Retrieve predictions" request could not answer before its deadline. Its task ids are split into
chunks of JOB_CHUNK_TASKS, each one RQ job (`label_studio_sam2.service.worker.run_chunk`) that a `python -m
backend worker` takes. Writes are idempotent (check-before-write in `LabelStudioAPI`), so a chunk
retried after its worker died writes only what the dead worker had not. Redis holds, per run:

    sam2:run:ID          hash: project, mode, model_version, total, created, source, cancelled
    sam2:run:ID:tasks    hash: task id -> its outcome (done | skipped | failed)
    sam2:run:ID:counts   hash: outcome -> tasks
    sam2:run:ID:why      hash: task id -> why it was skipped or failed
    sam2:run:ID:jobs     list: the run's RQ job ids
    sam2:runs:PROJECT    list: the project's run ids, oldest first
    sam2:held:TASK       while a Retrieve hand-off of the task waits (a later Retrieve skips it)
    sam2:worker:NAME     hash: jobs, failed, seconds (what /metrics shows per worker)

Every Redis error becomes `QueueUnavailable` (a 503 with what to do), after at most the 1 s
connect timeout of `label_studio_sam2.service.redisconn`: nothing waits on a Redis that is down.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import redis
from rq import Queue, Retry, Worker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from label_studio_sam2.service import redisconn
from label_studio_sam2.service.errors import Unavailable

QUEUE_NAME = "sam2"
JOB_FUNC = "label_studio_sam2.service.worker.run_chunk"
PREFIX = "sam2:"
RUN_TTL_S = 7 * 24 * 3600  # a run's progress stays readable a week after its last task
CHUNK_TIMEOUT_S = 6 * 3600  # a chunk still running after this is stopped (a hung download, say)
RETRIES = 3  # a chunk whose worker died, or that failed as a whole, runs again up to this often
HOLD_S = 3600  # a Retrieve hand-off keeps later Retrieves off its task this long at most
OUTCOMES = ("done", "skipped", "failed")
# What a worker runs: these functions only, with no callbacks and no dependencies. Anyone who can
# write to Redis can enqueue a job naming any importable function (`os.system`); RQ would import
# and call it. A worker refuses every other job without importing anything it names.
JOB_FUNCS = frozenset({JOB_FUNC})
JOB_CALLBACKS: frozenset[str] = frozenset()  # this backend's jobs have none

# The task's latest outcome, and the counts kept equal to the outcomes. A task once "done" stays
# done: a chunk retried after its worker died finds that task predicted and would say "skipped".
_RECORD = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old == ARGV[2] or old == 'done' then return 0 end
if old then redis.call('HINCRBY', KEYS[2], old, -1) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


class QueueUnavailable(Unavailable):
    """Redis cannot be reached: the work was not queued (503, with what to do)."""


class RefusedJob(Exception):
    """A job that is not one of this backend's own (see `refusal`): never imported, never run."""


def refusal(job: Job) -> str | None:
    """Why a worker must not run `job` (a function, callback or dependency this backend never
    enqueues), or None for one of its own jobs. Reads names only: nothing is imported."""
    try:
        func, instance = job.func_name, job.instance
    except Exception as e:  # data that is not even a job (DeserializationError)
        return f"its data cannot be read ({type(e).__name__})"
    if instance is not None or func not in JOB_FUNCS:
        return (
            f"function {str(func)[:200]!r} is not one of this backend's jobs ({', '.join(sorted(JOB_FUNCS))})"
        )
    for kind in ("success", "failure", "stopped"):
        name = getattr(job, f"_{kind}_callback_name", None)
        if name and name not in JOB_CALLBACKS:
            return f"its on_{kind} callback {str(name)[:200]!r} is not one of this backend's"
    if job._dependency_ids:
        return "it depends on other jobs (this backend's jobs never do)"
    return None


class ProjectJob(Job):
    """RQ's Job that imports only this backend's job functions: the function and callbacks of any
    other job raise RefusedJob instead of being imported (whoever asks: the worker, or RQ's
    registry maintenance running a failure callback of an abandoned job)."""

    @property
    def func(self):
        why = refusal(self)
        if why is not None:
            raise RefusedJob(f"job {self.id} refused: {why}")
        return super().func

    def _callback(self, kind: str):
        name = getattr(self, f"_{kind}_callback_name", None)
        if name and name not in JOB_CALLBACKS:
            raise RefusedJob(
                f"job {self.id} refused: its on_{kind} callback {str(name)[:200]!r} is not this backend's"
            )
        return getattr(super(), f"{kind}_callback")

    @property
    def success_callback(self):
        return self._callback("success")

    @property
    def failure_callback(self):
        return self._callback("failure")

    @property
    def stopped_callback(self):
        return self._callback("stopped")


@dataclass
class Chunk:
    """One job's work: these tasks of `project`, predicted with `options` (PreannotateOptions as
    a dict) for `label_config`, written as `model_version` (empty: the worker's own, that of its
    model or of the project's fine-tuned decoder). `kind`: "preannotate" (boxes or automatic masks,
    as `options` say), "video" (track the latest annotation's video rectangles to the end) or
    "warm" (encode the task's image into the embedding store)."""

    run: str
    project: int | None
    label_config: str
    options: dict
    model_version: str
    task_ids: list[int]
    kind: str = "preannotate"
    # the server's non-secret effective settings (label_studio_sam2.service.handoff.job_settings):
    # the worker honours the video limits and refuses a job of another model; {}: its own
    settings: dict = field(default_factory=dict)


@dataclass
class RunStatus:
    """What a run did so far (`preannotate --status`)."""

    id: str
    project: int | None
    total: int
    counts: dict[str, int]
    jobs: dict[str, int] = field(default_factory=dict)  # RQ job status -> jobs
    created: float = 0.0
    source: str = ""
    mode: str = ""
    model_version: str = ""
    cancelled: bool = False
    why: dict[str, dict[str, int]] = field(default_factory=dict)  # skipped|failed -> reason -> tasks

    @property
    def finished(self) -> int:
        return sum(self.counts.get(o, 0) for o in OUTCOMES)

    @property
    def active(self) -> bool:
        """Jobs of the run are still waiting or running."""
        return any(self.jobs.get(s, 0) for s in ("queued", "started", "scheduled", "deferred"))

    def line(self) -> str:
        c = self.counts
        jobs = ", ".join(f"{n} {s}" for s, n in sorted(self.jobs.items())) or "none"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created)) if self.created else "?"
        return (
            f"run {self.id} ({self.source}, {self.mode}, {when}{', cancelled' if self.cancelled else ''}): "
            f"{self.finished}/{self.total} tasks: {c.get('done', 0)} predicted, "
            f"{self.outcome('skipped')}, {self.outcome('failed')}; jobs: {jobs}"
        )

    def outcome(self, outcome: str) -> str:
        """`4 skipped (no mask found)`, `3 failed (2 image not loaded: ..., 1 ...)`: as the
        in-process run says it."""
        n = self.counts.get(outcome, 0)
        reasons = sorted(self.why.get(outcome, {}).items(), key=lambda kv: (-kv[1], kv[0]))
        if not n or not reasons:
            return f"{n} {outcome}"
        if len(reasons) == 1 and reasons[0][1] == n:
            return f"{n} {outcome} ({reasons[0][0]})"
        return f"{n} {outcome} (" + ", ".join(f"{k} {why}" for why, k in reasons) + ")"


class JobQueue:
    """The RQ queue of background work in the Redis at `url`, and the runs' progress."""

    def __init__(self, url: str, chunk_tasks: int = 20, carry: Callable[[], dict] | None = None):
        """`carry`: the settings every job of this queue carries (`handoff.job_settings`), asked
        when a run starts (the server knows its model's source once it is loaded)."""
        self.url = url
        self.carry = carry
        self.where = redisconn.describe(url)
        self.redis = redisconn.connect(url)
        self.chunk_tasks = chunk_tasks
        self.queue = Queue(QUEUE_NAME, connection=self.redis, serializer=JSONSerializer)
        self._record = self.redis.register_script(_RECORD)

    @contextlib.contextmanager
    def reaching(self, what: str) -> Iterator[None]:
        """Redis errors inside become QueueUnavailable, naming `what` could not be done."""
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise QueueUnavailable(
                f"{what}: Redis at {self.where} (REDIS_URL) cannot be reached ({type(e).__name__}); "
                "start it or fix REDIS_URL"
            ) from None
        except redis.exceptions.RedisError as e:  # an auth error, a read-only replica...
            raise QueueUnavailable(f"{what}: Redis at {self.where} refused: {str(e)[:200]}") from None

    # --- enqueueing ----------------------------------------------------------------------------

    def start_run(
        self,
        task_ids: list[int],
        *,
        project: int | None,
        label_config: str,
        options: dict,
        model_version: str,
        source: str,
        kind: str = "preannotate",
        at_front: bool = False,
    ) -> RunStatus:
        """Queue `task_ids` as one run of chunked jobs; returns its status (nothing done yet).
        Raises QueueUnavailable when Redis is down (then nothing was queued)."""
        run = uuid.uuid4().hex[:12]
        ids = [int(t) for t in task_ids]
        with self.reaching("cannot queue the work"):
            self.redis.ping()  # fail in one connect timeout, before anything is half written
            meta = dict(
                project="" if project is None else str(project),
                mode=str(options.get("mode", "")),
                model_version=model_version,
                total=str(len(ids)),
                created=str(time.time()),
                source=source,
            )
            pipe = self.redis.pipeline()
            pipe.hset(_run_key(run), mapping=meta)
            pipe.expire(_run_key(run), RUN_TTL_S)
            if project is not None:
                pipe.rpush(_runs_key(project), run)
                pipe.expire(_runs_key(project), RUN_TTL_S)
            pipe.execute()
            carried = self.carry() if self.carry else {}
            chunks = [
                Chunk(
                    run,
                    project,
                    label_config,
                    options,
                    model_version,
                    ids[i : i + self.chunk_tasks],
                    kind,
                    carried,
                )
                for i in range(0, len(ids), self.chunk_tasks)
            ]
            self.enqueue(chunks, at_front=at_front)
        return RunStatus(run, project, len(ids), {}, {"queued": len(chunks)}, source=source)

    def enqueue(self, chunks: list[Chunk], at_front: bool = False) -> list[str]:
        """Queue chunks of existing runs (a new run, or the rest of a chunk a stopping worker
        hands back); returns the job ids."""
        if not chunks:
            return []
        with self.reaching("cannot queue the work"):
            datas = [
                Queue.prepare_data(
                    JOB_FUNC,
                    args=(asdict(c),),
                    timeout=CHUNK_TIMEOUT_S,
                    result_ttl=RUN_TTL_S,
                    failure_ttl=RUN_TTL_S,
                    description=f"{c.kind} project {c.project}: {len(c.task_ids)} task(s) of run {c.run}",
                    retry=Retry(max=RETRIES),
                    at_front=at_front,
                )
                for c in chunks
            ]
            jobs = self.queue.enqueue_many(datas)
            pipe = self.redis.pipeline()
            for c, job in zip(chunks, jobs, strict=True):
                pipe.rpush(_jobs_key(c.run), job.id)
                pipe.expire(_jobs_key(c.run), RUN_TTL_S)
            pipe.execute()
        return [j.id for j in jobs]

    # --- what workers report -------------------------------------------------------------------

    def record(self, run: str, task_id: int, outcome: str, why: str | None = None) -> None:
        """The outcome of one task of `run` (done, skipped or failed) and why it was skipped or
        failed; a retry overwrites it."""
        with self.reaching("cannot record progress"):
            self._record(keys=[_tasks_key(run), _counts_key(run)], args=[int(task_id), outcome, RUN_TTL_S])
            if why and outcome != "done":
                pipe = self.redis.pipeline()
                pipe.hset(_why_key(run), int(task_id), why[:300])
                pipe.expire(_why_key(run), RUN_TTL_S)
                pipe.execute()

    def cancelled(self, run: str) -> bool:
        with self.reaching("cannot read the run"):
            return self.redis.hget(_run_key(run), "cancelled") == b"1"

    def worker_finished_job(self, worker: str, seconds: float, failed: bool) -> None:
        """A worker's job ended: per-worker job count, failures and seconds for /metrics."""
        key = f"{PREFIX}worker:{worker}"
        with self.reaching("cannot record the job"):
            pipe = self.redis.pipeline()
            pipe.hincrby(key, "failed" if failed else "jobs", 1)
            pipe.hincrbyfloat(key, "seconds", seconds)
            pipe.expire(key, RUN_TTL_S)
            pipe.execute()

    # --- Retrieve hand-offs --------------------------------------------------------------------

    def hold(self, task_ids: list[int]) -> None:
        """Mark tasks as handed off (until their chunk writes them, or HOLD_S)."""
        with self.reaching("cannot queue the work"):
            pipe = self.redis.pipeline()
            for t in task_ids:
                pipe.set(f"{PREFIX}held:{int(t)}", 1, ex=HOLD_S)
            pipe.execute()

    def holds(self, task_id: int) -> bool:
        with self.reaching("cannot queue the work"):
            return bool(self.redis.exists(f"{PREFIX}held:{int(task_id)}"))

    def release(self, task_id: int) -> None:
        with self.reaching("cannot record progress"):
            self.redis.delete(f"{PREFIX}held:{int(task_id)}")

    # --- status, cancel, metrics ---------------------------------------------------------------

    def runs(self, project: int, last: int = 5) -> list[RunStatus]:
        """The project's latest runs (oldest first)."""
        with self.reaching("cannot read the runs"):
            ids = [r.decode() for r in self.redis.lrange(_runs_key(project), -last, -1)]
            return [s for s in (self.status(r) for r in ids) if s is not None]

    def status(self, run: str) -> RunStatus | None:
        with self.reaching("cannot read the run"):
            meta = {k.decode(): v.decode() for k, v in self.redis.hgetall(_run_key(run)).items()}
            if not meta:
                return None
            counts = {k.decode(): int(v) for k, v in self.redis.hgetall(_counts_key(run)).items()}
            why: dict[str, dict[str, int]] = {}
            reasons = self.redis.hgetall(_why_key(run))
            if reasons:
                for task, outcome in self.redis.hgetall(_tasks_key(run)).items():
                    reason = reasons.get(task)
                    if reason is not None and outcome.decode() in ("skipped", "failed"):
                        per = why.setdefault(outcome.decode(), {})
                        per[reason.decode()] = per.get(reason.decode(), 0) + 1
            job_ids = [j.decode() for j in self.redis.lrange(_jobs_key(run), 0, -1)]
            jobs: dict[str, int] = {}
            for job in Job.fetch_many(job_ids, connection=self.redis, serializer=JSONSerializer):
                state = "expired" if job is None else str(job.get_status(refresh=False) or "unknown")
                state = state.removeprefix("JobStatus.").lower()
                jobs[state] = jobs.get(state, 0) + 1
        project = meta.get("project")
        return RunStatus(
            run,
            int(project) if project else None,
            int(meta.get("total", 0)),
            counts,
            jobs,
            created=float(meta.get("created", 0)),
            source=meta.get("source", ""),
            mode=meta.get("mode", ""),
            model_version=meta.get("model_version", ""),
            why=why,
            cancelled=meta.get("cancelled") == "1",
        )

    def cancel(self, project: int) -> list[RunStatus]:
        """Cancel the project's runs that still have work: queued jobs are cancelled, running
        ones stop after their current task. Returns the runs cancelled."""
        cancelled = []
        for status in self.runs(project, last=100):
            if not status.active:
                continue
            with self.reaching("cannot cancel"):
                self.redis.hset(_run_key(status.id), "cancelled", "1")
                job_ids = [j.decode() for j in self.redis.lrange(_jobs_key(status.id), 0, -1)]
                for job in Job.fetch_many(job_ids, connection=self.redis, serializer=JSONSerializer):
                    if job is not None and job.get_status(refresh=False) in (
                        JobStatus.QUEUED,
                        JobStatus.SCHEDULED,
                        JobStatus.DEFERRED,
                    ):
                        with contextlib.suppress(Exception):  # taken by a worker meanwhile: it stops itself
                            job.cancel()
            cancelled.append(self.status(status.id))
        return cancelled

    def snapshot(self) -> dict:
        """Queue depth, jobs by state and per-worker job counts, for /metrics (read at scrape
        time, so every server replica and gunicorn worker shows the same fleet)."""
        q = self.queue
        with self.reaching("cannot read the queue"):
            states = {
                "queued": q.count,
                "started": q.started_job_registry.count,
                "failed": q.failed_job_registry.count,
                "finished": q.finished_job_registry.count,
            }
            workers = Worker.count(queue=q)
            per_worker = {}
            for key in self.redis.scan_iter(match=f"{PREFIX}worker:*", count=100):
                name = key.decode().removeprefix(f"{PREFIX}worker:")
                values = {k.decode(): float(v) for k, v in self.redis.hgetall(key).items()}
                per_worker[name] = values
        return dict(jobs=states, workers=workers, per_worker=per_worker)

    def workers(self) -> int:
        with self.reaching("cannot read the workers"):
            return Worker.count(queue=self.queue)


def chunk_from_job(data: dict) -> Chunk:
    """A job's argument back as a Chunk; a malformed one (written by something else) raises
    ValueError."""
    try:
        chunk = Chunk(**data)
        chunk.task_ids = [int(t) for t in chunk.task_ids]
        if not isinstance(chunk.settings, dict):
            raise TypeError("settings must be an object")
        json.dumps(chunk.options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"not a job of this backend: {e}") from None
    return chunk


def _run_key(run: str) -> str:
    return f"{PREFIX}run:{run}"


def _tasks_key(run: str) -> str:
    return f"{PREFIX}run:{run}:tasks"


def _why_key(run: str) -> str:
    return f"{PREFIX}run:{run}:why"


def _counts_key(run: str) -> str:
    return f"{PREFIX}run:{run}:counts"


def _jobs_key(run: str) -> str:
    return f"{PREFIX}run:{run}:jobs"


def _runs_key(project: int) -> str:
    return f"{PREFIX}runs:{int(project)}"
