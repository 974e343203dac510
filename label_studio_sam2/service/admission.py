"""A bounded request queue per worker: busy means a quick 503, never a pile-up.

One model per process serves requests one at a time, so a burst of /predict calls would otherwise
wait behind each other until Label Studio's 100 s timeout drops them all. `AdmissionQueue` lets
at most `capacity` requests in (running or waiting for the model); the next one is answered at
once with 503 and a Retry-After estimate. Keep `capacity` below gunicorn's `threads` so spare
threads are left to answer /health, /metrics and those 503s.
"""

from __future__ import annotations

import math
import threading


class AdmissionQueue:
    """Counts requests inside; `capacity <= 0` admits everything (no bound)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._lock = threading.Lock()
        self.depth = 0  # requests admitted and not yet answered
        self._mean_s = 1.0  # moving average of an admitted request's time inside

    def try_enter(self) -> bool:
        with self._lock:
            if 0 < self.capacity <= self.depth:
                return False
            self.depth += 1
            return True

    def leave(self, seconds: float) -> None:
        with self._lock:
            self.depth = max(0, self.depth - 1)
            self._mean_s += 0.2 * (max(0.0, seconds) - self._mean_s)

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free. By Little's law a full queue of `capacity`
        requests, each inside for `mean` seconds, frees one slot every mean / capacity seconds."""
        with self._lock:
            per_slot = self._mean_s / max(1, self.capacity)
        return int(min(30, max(1, math.ceil(per_slot))))
