"""Short-lived memory of each object's last box and mask, so a click refines what came before.

Tool-neutral: the keys are opaque (the adapter chooses them), boxes and clicks are in pixels of
the image. `label_studio_sam2.service.redismemory.RedisPromptMemory` is the same interface shared
through Redis.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class Remembered:
    """What one object's last prompt left behind."""

    box: tuple[float, float, float, float] | None  # the box, continuous pixels x1, y1, x2, y2
    points: frozenset  # the clicks the logits were computed from: (x px, y px, label)
    logits: Any  # opaque to the service: the predictor's low-res logits
    at: float  # time.monotonic() of the write


class PromptMemory:
    """Per object (an opaque, hashable key the adapter chooses; Label Studio's is project, task,
    image, label): the last box and the last mask logits, for a few minutes.

    A tool may send a box and the clicks that fix it in separate requests (Label Studio does: its
    context holds only regions of one smart tool), so "draw a box, then click to fix it" needs the
    service to remember the box.
    Bounded in bytes (PROMPT_MEMORY_MB; the logits are most of an entry) and in entries, the
    least recently written dropped first; entries older than `ttl_s` are dropped on every write,
    not only when read, so memory a burst of clicks took is given back. Thread-safe.
    """

    def __init__(self, ttl_s: float = 300.0, max_entries: int = 10_000, max_bytes: int = 256 << 20):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._items: OrderedDict[tuple, tuple[Remembered, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, key: tuple) -> Remembered | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            if time.monotonic() - found[0].at > self.ttl_s:
                self._drop(key)
                return None
            return found[0]

    def put(self, key: tuple, item: Remembered) -> None:
        size = entry_bytes(item) + sum(sys.getsizeof(part) for part in key)  # ids come from requests
        with self._lock:
            if key in self._items:
                self._drop(key)
            now = time.monotonic()
            while self._items:  # oldest first (written in time order): drop what has expired
                oldest, (first, _) = next(iter(self._items.items()))
                if now - first.at <= self.ttl_s:
                    break
                self._drop(oldest)
            if size > self.max_bytes or self.ttl_s <= 0:
                return  # would evict everything and still not fit
            self._items[key] = (item, size)
            self.bytes += size
            while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def _drop(self, key: tuple) -> None:
        _, size = self._items.pop(key)
        self.bytes -= size


def entry_bytes(item: Remembered) -> int:
    """What an entry holds, roughly: its logits' bytes and a fixed share for the rest."""
    logits = item.logits
    nbytes = getattr(logits, "nbytes", 0) if logits is not None else 0
    return int(nbytes) + 256 + 64 * len(item.points)
