"""Pre-encoding the next tasks after a labeler's click (PREFETCH_TASKS).

After a click the server starts `label-studio-sam2 warm --after-task T --limit N` (label_studio_sam2.labelstudio.warm)
as a separate process at the lowest CPU priority (nice 19), so it only uses time the server
leaves idle; at most one such job runs at a time. It is the in-process backend's child of
`label_studio_sam2.service.handoff`: it gets the server's effective settings (the model the server
loaded, its device, CPU precision, encoder runtime, store, Label Studio URL and token) as its
environment, never the token in argv. The child holds a model of its own (a second copy beside the
server's: about 0.6 GB resident with hiera-tiny on CPU, 1.4 GB at its peak while encoding; measured
by bench/prefetch_memory.py): the price of a priority the OS enforces, so a click never waits for
pre-encoding (bench/prefetch.py); a thread of the server would share the model but not yield the CPU.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections import OrderedDict

from label_studio_sam2.service.handoff import child_env, spawn
from label_studio_sam2.service.settings import Settings

log = logging.getLogger("label_studio_sam2")

REMEMBERED = 10_000  # (project, task) pairs already prefetched after, least recently clicked dropped
_MAX_ID = 2**63 - 1  # Label Studio's ids are 64-bit integers
LOWEST_PRIORITY = 19  # only CPU time the server leaves idle; a click never waits for pre-encoding


class Prefetcher:
    """Starts `warm --after-task T --limit N` at nice 19 after a click; at most one at a time."""

    def __init__(self, settings: Settings, model_source: str):
        self.settings = settings
        self.model_source = model_source
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._done: OrderedDict[tuple[int, int], None] = OrderedDict()  # bounded: REMEMBERED
        self.started = 0

    @property
    def enabled(self) -> bool:
        s = self.settings
        return bool(s.prefetch_tasks > 0 and s.store_dir and s.label_studio_url and s.label_studio_api_key)

    def after_click(self, project, task_id) -> bool:
        """Start pre-encoding after this click; False when it is not started. Ids come from the
        request: only integer ids Label Studio could have made are used (anything else never
        reaches a command line or the memory of ids done), and at most REMEMBERED are kept."""
        if not self.enabled or not (_plain_id(project) and _plain_id(task_id)):
            return False
        key = (project, task_id)
        with self._lock:
            if key in self._done:
                self._done.move_to_end(key)
                return False
            if self._proc is not None and self._proc.poll() is None:
                return False  # one job at a time; the next click will try again
            self._done[key] = None
            while len(self._done) > REMEMBERED:
                self._done.popitem(last=False)
            cmd = [
                sys.executable,
                "-m",
                "label_studio_sam2",
                "warm",
                "--project",
                str(project),
                "--after-task",
                str(task_id),
                "--limit",
                str(self.settings.prefetch_tasks),
                "--quiet",
            ]
            # the server's effective settings (device, precision, ...; the model it loaded), as
            # environment: never a token in argv; waited for as soon as it ends (never <defunct>)
            env = child_env(self.settings, model=self.model_source)
            try:
                self._proc = spawn(cmd, env, niceness=LOWEST_PRIORITY)
            except OSError as e:  # the click is answered anyway; pre-encoding is only a bonus
                log.warning("prefetch: could not start the pre-encoding job: %s", type(e).__name__)
                return False
            self.started += 1
            return True

    def wait(self, timeout_s: float | None = None) -> int | None:
        proc = self._proc
        return None if proc is None else proc.wait(timeout_s)


def _plain_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_ID
