"""One way to hand off background work, with two backends: in-process, and RQ with REDIS_URL.

Work that must not hold up a request goes through a `Handoff` (one per Runtime):

- **in-process**: a daemon thread of this process (Retrieve's overflow, `BackgroundJob`, which uses
  the server's loaded model and its Settings object as they are), or a child process where
  isolation is worth one (`spawn`): pre-encoding after a click (`warm` at nice 19, see
  `label_studio_sam2.service.prefetch`) and fine-tuning (`train` at nice 10). A child gets the
  server's *effective* settings as its environment (`child_env`): model, device, CPU precision,
  encoder runtime, Label Studio URL and token, embedding store and fine-tune directory, as the
  server resolved them from its flags and environment, so `serve --device cpu` starts children on
  the CPU whatever DEVICE says. The token travels in the environment only, never in argv (which
  `ps` shows to every user) or in a log line.
- **RQ** (`queue`, when REDIS_URL is set): Retrieve's overflow and video tracks the deadline would
  cut become jobs of `label_studio_sam2.service.jobqueue`. A job carries the non-secret effective
  settings (`job_settings`); the worker honours those it can apply per job (the video limits) and
  refuses a job queued for another model (`job_refusal`). Device, CPU precision and encoder runtime
  are the worker's own (a worker is started for its hardware, e.g. one per GPU): they are carried so
  the worker can say when they differ. The token never goes to Redis: a worker uses its own.

Pre-encoding and fine-tuning stay children of the server even with REDIS_URL: pre-encoding fills
the server's own store (a worker's may be another disk), and a training run takes its file locks
in the server's fine-tune directory (`label_studio_sam2.service.trainlock`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Callable

from pydantic import AliasChoices

from label_studio_sam2.service.settings import Settings, inherited_environment

# What a child process is given from the server's Settings (field names), as environment
CHILD_SETTINGS = (
    "model",
    "device",
    "cpu_precision",
    "encoder_runtime",
    "label_studio_url",
    "label_studio_api_key",
    "store_dir",
    "finetune_dir",
)
# What an RQ job carries (never a secret): honoured by the worker per job
JOB_HONOURED = ("video_max_frames", "max_image_mp", "max_regions_per_task")
# carried too: a job queued for another model is refused; the others are the worker's own
JOB_REPORTED = ("device", "cpu_precision", "encoder_runtime")


def env_names(field: str) -> tuple[str, ...]:
    """The environment variables of a Settings field: its name first, then its old aliases."""
    alias = Settings.model_fields[field].validation_alias
    return tuple(alias.choices) if isinstance(alias, AliasChoices) else (field.upper(),)


def child_env(settings: Settings, base: dict[str, str] | None = None, **values: str) -> dict[str, str]:
    """The environment of a child process doing the server's work: `base` (default this process's
    environment: PATH, HOME, ...) with every CHILD_SETTINGS variable replaced by the server's
    effective value (`values`, by field name, win: e.g. the model source the server loaded). A
    setting that is unset in the server (None) is unset in the child too; the store switched off
    stays off."""
    env = inherited_environment() if base is None else dict(base)
    for field in CHILD_SETTINGS:
        names = env_names(field)
        for name in names:
            env.pop(name, None)
        value = values[field] if field in values else getattr(settings, field)
        if value is None and field == "store_dir":
            value = "off"
        if value is not None:
            env[names[0]] = str(value)
    return env


class Handoff:
    """The hand-off of one process: `queue` (RQ, with REDIS_URL) or None, and `thread`; children
    are started with `spawn(argv, child_env(settings))`."""

    def __init__(self, settings: Settings, queue_factory: Callable[[], object] | None = None):
        self.settings = settings
        self._queue_factory = queue_factory
        self._queue = None
        self._lock = threading.Lock()

    @property
    def queue(self):
        """The RQ job queue when REDIS_URL is set (made on first use, no connection yet), else None."""
        if not self.settings.redis_url or self._queue_factory is None:
            return None
        with self._lock:
            if self._queue is None:
                self._queue = self._queue_factory()
            return self._queue

    @staticmethod
    def thread(target: Callable[[], None], name: str) -> threading.Thread:
        """Run `target` in a daemon thread of this process (the server's model and Settings)."""
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread


IDLE_PRIORITY = (
    19  # niceness from which a child also gets SCHED_IDLE (prefetch: label_studio_sam2.service.prefetch)
)


def lower_priority(niceness: int) -> None:
    """This process at `niceness`; from IDLE_PRIORITY on also Linux's SCHED_IDLE, which every
    thread it starts inherits: it runs only on CPU time nothing else wants. Nice 19 alone left
    OpenVINO's encoder (many short parallel regions) 1.18-1.23x slower on a first click beside an
    encoding prefetch; with SCHED_IDLE 1.04x (bench.prefetch --runtime openvino)."""
    os.nice(niceness)
    if niceness >= IDLE_PRIORITY and hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):  # not permitted here (a seccomp profile): nice alone
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def spawn(
    argv: list[str],
    env: dict[str, str],
    *,
    niceness: int,
    stdout=subprocess.DEVNULL,
    on_exit: Callable[[subprocess.Popen], None] | None = None,
) -> subprocess.Popen:
    """The in-process backend's child: `argv` at `niceness` with `env` (`child_env`), waited for
    as soon as it ends (never left <defunct>), then `on_exit(proc)` in that waiting thread.
    OSError if it cannot start."""
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=stdout,
        stderr=subprocess.DEVNULL if stdout == subprocess.DEVNULL else subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: lower_priority(niceness),
    )

    def reap() -> None:
        proc.wait()
        if on_exit is not None:
            on_exit(proc)

    threading.Thread(target=reap, name="reap-child", daemon=True).start()
    return proc


def job_settings(settings: Settings, model_id: str | None = None) -> dict:
    """The non-secret effective settings an RQ job carries; `model`: the id of the model the
    server loaded (`LoadedModel.model_id`, what its predictions' model_version names; the same
    model may sit at another path on a worker's machine), left out while none is loaded."""
    carried = {f: getattr(settings, f) for f in JOB_REPORTED + JOB_HONOURED}
    if model_id:
        carried["model"] = model_id
    return carried


def video_limits(settings: Settings, carried: dict | None = None) -> dict:
    """predict_video_task's limits: the server's as its job carried them (JOB_HONOURED), each
    one missing or not a positive number (a job queued before, or written by something else)
    the worker's own."""
    values = {f: getattr(settings, f) for f in JOB_HONOURED}
    for f, v in (carried or {}).items():
        if f in JOB_HONOURED and type(v) in (int, float) and v > 0:
            values[f] = int(v) if f != "max_image_mp" else float(v)
    return dict(
        max_frames=values["video_max_frames"],
        max_pixels=int(values["max_image_mp"] * 1e6),
        max_regions=values["max_regions_per_task"],
    )


def job_differences(carried: dict, settings: Settings) -> list[str]:
    """The carried settings a worker runs with its own values instead (JOB_REPORTED), as
    `NAME=server's (worker: own)`, for the worker's log."""
    return [
        f"{env_names(f)[0]}={carried[f]} (worker: {getattr(settings, f)})"
        for f in JOB_REPORTED
        if f in carried and carried[f] != getattr(settings, f)
    ]


def job_refusal(carried: dict, model_id: str) -> str | None:
    """Why a worker serving model `model_id` must not run a job that carries `carried`, or None.
    A job queued before jobs carried settings (empty) runs with the worker's own, as it did."""
    model = carried.get("model")
    if model and model != model_id:
        return (
            f"queued for model {str(model)[:200]!r}, this worker serves {model_id!r}: "
            "start the worker with the server's SAM2_MODEL"
        )
    return None
