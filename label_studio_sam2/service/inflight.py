"""Concurrent identical requests answered once.

Label Studio 1.23.2 asks /predict twice at once for a video task it reloads (after a submit, with
no prediction yet): both requests would track the same video and Label Studio would store two
identical predictions. The first request does the work; an identical one that arrives while it
runs waits for it and answers with nothing (Label Studio stores nothing for an empty answer). If
the first fails, a waiting request does the work itself.

Within one process: gunicorn workers or replicas each answer their own copy.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Hashable, Iterator


class _Call:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


class Coalescer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, _Call] = {}
        self._waiting = 0

    def waiting(self) -> int:
        """Requests now waiting for an identical one to finish."""
        with self._lock:
            return self._waiting

    @contextlib.contextmanager
    def once(self, key: Hashable, timeout_s: float) -> Iterator[bool]:
        """True: do the work (no identical call runs). False: an identical call ran meanwhile and
        succeeded; answer with nothing. A waiter that times out (`timeout_s`) does the work too."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                call = self._calls.get(key)
                if call is None:
                    call = self._calls[key] = _Call()
                    break
                self._waiting += 1
            try:
                finished = call.done.wait(max(0.0, deadline - time.monotonic()))
            finally:
                with self._lock:
                    self._waiting -= 1
            if finished and call.ok:
                yield False
                return
            if not finished:  # the first is still at it: answer on our own, not coalesced
                yield True
                return
            # the first failed: try again (this request may now be the first)
        try:
            yield True
            call.ok = True
        finally:
            with self._lock:
                del self._calls[key]
            call.done.set()
