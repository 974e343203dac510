"""The label configs a tool sent ahead of its requests (Label Studio's /setup), per project."""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict


class SchemaCache:
    """The label configs /setup was sent, per project: an LRU bounded by bytes (SETUP_CACHE_MB),
    so a stream of /setup calls for made-up projects never grows the process. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, project: int | None) -> str | None:
        with self._lock:
            xml = self._items.get(project)
            if xml is not None:
                self._items.move_to_end(project)
            return xml

    def put(self, project: int, xml: str) -> None:
        size = _entry_size(project, xml)
        with self._lock:
            old = self._items.pop(project, None)
            if old is not None:
                self.bytes -= _entry_size(project, old)
            if size > self.max_bytes:
                return
            self._items[project] = xml
            self.bytes += size
            while self.bytes > self.max_bytes:
                key, dropped = self._items.popitem(last=False)
                self.bytes -= _entry_size(key, dropped)


def _entry_size(project: int, xml: str) -> int:
    return sys.getsizeof(project) + sys.getsizeof(xml) + 100  # and a share for the dict entry
