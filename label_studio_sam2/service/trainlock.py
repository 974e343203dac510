"""Who may train now: one run per project, and at most MAX_TRAININGS runs at once, across every
process that shares the fine-tune directory (the server's gunicorn workers, the `train` CLI,
replicas on one volume).

Both are `fcntl.flock` locks on files under the fine-tune root (SAM2_FINETUNE_DIR):

    project-<id>/train.lock     held by the run of that project
    .trainings/slot-<k>.lock    k < MAX_TRAININGS: a run holds one free slot

A lock belongs to the open file: the kernel releases it when its process ends, however it ends
(a crash, SIGKILL), so a dead run never blocks the next. The file holds the holder's pid (for
the message only).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from label_studio_sam2.service.errors import BackendError, Kind

SLOTS_DIR = ".trainings"


class TrainingBusy(BackendError):
    """The project is training already (a conflict), or MAX_TRAININGS runs are (busy): with what
    to do."""

    def __init__(self, message: str, project_busy: bool):
        super().__init__(message, Kind.CONFLICT if project_busy else Kind.BUSY)
        self.project_busy = project_busy


def _try_lock(path: Path) -> int | None:
    """The fd of `path` locked exclusively, or None when another open file holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


@contextlib.contextmanager
def training_slot(root: str | os.PathLike, project: int, max_trainings: int) -> Iterator[None]:
    """Hold the project's lock and one of `max_trainings` slots while the block runs; raises
    TrainingBusy at once (never waits) when either is taken."""
    root = Path(root)
    project_lock = root / f"project-{int(project)}" / "train.lock"
    fds = []
    try:
        fd = _try_lock(project_lock)
        if fd is None:
            raise TrainingBusy(
                f"project {int(project)} is already training{_holder(project_lock)}; "
                "its run must end before another starts",
                project_busy=True,
            )
        fds.append(fd)
        for k in range(max_trainings):
            fd = _try_lock(root / SLOTS_DIR / f"slot-{k}.lock")
            if fd is not None:
                fds.append(fd)
                break
        else:
            raise TrainingBusy(
                f"{max_trainings} training run(s) already running here (MAX_TRAININGS={max_trainings}): "
                "start this one when one ends, or raise MAX_TRAININGS",
                project_busy=False,
            )
        yield
    finally:
        for fd in fds:
            os.close(fd)  # closing the file releases its lock


def check_free(root: str | os.PathLike, project: int, max_trainings: int) -> None:
    """Raise TrainingBusy if a run of `project` could not start now (nothing is held after)."""
    with training_slot(root, project, max_trainings):
        pass
