"""Prompt memory shared through Redis (`REDIS_URL`): the box and mask a labeler made on one
gunicorn worker or replica are there for the click that reaches another.

The same interface as `label_studio_sam2.service.promptmemory.PromptMemory` (get/put). Each entry is one Redis string
under `sam2:prompt:<sha256 of the key>` that Redis expires after PROMPT_MEMORY_S. A value is a
small JSON header (box, clicks, dtype and shape of the logits) followed by the logits'
raw bytes: nothing is unpickled, and a value that does not parse is a miss.

Redis down: every entry is also kept in this process's `PromptMemory`, which answers while Redis
does not (so a box drawn just before an outage still serves the clicks this process gets). After
a failed call Redis is left alone for RETRY_S; one warning per outage, one info line when it is
back. No call waits more than about a second (connect and socket timeouts of 1 s).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
import threading
import time

import numpy as np
import redis

from label_studio_sam2.service import redisconn
from label_studio_sam2.service.logs import url_password
from label_studio_sam2.service.promptmemory import PromptMemory, Remembered

log = logging.getLogger("label_studio_sam2.redis")

PREFIX = "sam2:prompt:"
TIMEOUT_S = 1.0  # one command; a Redis slower than this counts as down for the click
RETRY_S = 3.0  # after a failure, the clicks of the next few seconds do not ask Redis
FORMAT = 2  # 2: the box in pixels (1 held a Label Studio percent rectangle and its rotation)
_LENGTH = struct.Struct(">I")  # bytes of the JSON header
_DTYPES = ("<f4", "<f2")  # what logits may be stored as (little-endian floats)
_MAX_DIMS = 4


def redis_key(key: tuple) -> str:
    """`sam2:prompt:` + sha256 of the memory key (opaque; Label Studio's is project, task id, image,
    label): fixed length, and no task field ever becomes part of a Redis command's structure."""
    text = json.dumps(list(key), default=str, separators=(",", ":"))
    return PREFIX + hashlib.sha256(text.encode()).hexdigest()


def encode(item: Remembered, written_at: float) -> bytes:
    """`item` as bytes: header length (4 bytes, big-endian), JSON header, logits as float32.
    `written_at`: time.time() of the write (which of two copies is newer)."""
    logits = None if item.logits is None else np.ascontiguousarray(np.asarray(item.logits), dtype="<f4")
    header = {
        "v": FORMAT,
        "t": float(written_at),
        "box": None if item.box is None else [float(v) for v in item.box],
        "points": sorted([float(x), float(y), int(label)] for x, y, label in item.points),
        "dtype": None if logits is None else logits.dtype.str,
        "shape": None if logits is None else list(logits.shape),
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return _LENGTH.pack(len(head)) + head + (b"" if logits is None else logits.tobytes())


def decode(data: bytes) -> tuple[Remembered, float] | None:
    """The entry `encode` wrote and when, or None for anything else (another format, a truncated
    or foreign value): a miss, never an error."""
    try:
        (n,) = _LENGTH.unpack_from(data)
        header = json.loads(data[_LENGTH.size : _LENGTH.size + n])
        body = data[_LENGTH.size + n :]
        if not isinstance(header, dict) or header.get("v") != FORMAT:
            return None
        box = header["box"]
        if box is not None:
            box = tuple(_finite(v) for v in box)
            if len(box) != 4:
                return None
        written_at = _finite(header["t"])
        points = frozenset((_finite(x), _finite(y), int(label)) for x, y, label in header["points"])
        logits = _array(header["dtype"], header["shape"], body)
    except (struct.error, ValueError, TypeError, KeyError):  # JSONDecodeError is a ValueError
        return None
    return Remembered(box, points, logits, time.monotonic()), written_at


def _finite(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"not a finite number: {value!r}")
    return float(value)


def _array(dtype, shape, body: bytes) -> np.ndarray | None:
    if dtype is None and shape is None and not body:
        return None
    if dtype not in _DTYPES or not isinstance(shape, list) or not 0 < len(shape) <= _MAX_DIMS:
        raise ValueError("unexpected logits dtype or shape")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError("unexpected logits shape")
    if math.prod(shape) * np.dtype(dtype).itemsize != len(body):
        raise ValueError("logits size does not match their shape")
    # a writable float32 copy: the predictor hands it to torch
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(np.float32)


class RedisPromptMemory:
    """`PromptMemory` shared by every process that reaches the same Redis, with this process's
    own memory as the fallback while Redis is unreachable. Thread-safe."""

    def __init__(
        self, url: str, ttl_s: float = 300.0, *, retry_s: float = RETRY_S, max_bytes: int = 256 << 20
    ):
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self.local = PromptMemory(ttl_s, max_bytes=max_bytes)
        self.where = redisconn.describe(url)  # never the password
        self._password = url_password(url)  # only to keep it out of error text
        self._client = redisconn.connect(url, socket_timeout_s=TIMEOUT_S)
        self._lock = threading.Lock()
        self._skip_until = 0.0  # time.monotonic(): Redis is not asked before this
        self._down = False  # an outage was reported and has not ended yet
        # keys whose last put reached only the local memory, with its time.time(): that copy
        # wins over an older one in Redis (written before an outage that kept Redis's data)
        self._unshared: dict[str, float] = {}

    def get(self, key: tuple) -> Remembered | None:
        name = redis_key(key)
        data = self._call(lambda r: r.get(name))
        found = decode(data) if isinstance(data, bytes) else None
        if isinstance(data, bytes) and found is None:
            log.debug("prompt memory: ignoring an entry in Redis this backend did not write")
        local_at = self._unshared.get(name)
        if found is not None and (local_at is None or found[1] > local_at):
            return found[0]
        item = self.local.get(key)
        if item is None and local_at is not None:
            self._unshared.pop(name, None)  # expired here: nothing to prefer any more
        return item

    def put(self, key: tuple, item: Remembered) -> None:
        self.local.put(key, item)
        if self.ttl_s <= 0:
            return
        name, now = redis_key(key), time.time()
        value = encode(item, now)
        if self._call(lambda r: r.set(name, value, px=max(1, round(self.ttl_s * 1000)))) is _FAILED:
            with self._lock:
                if len(self._unshared) >= self.local.max_entries:
                    self._unshared.clear()  # bounded; those entries fall back to Redis's copies
                self._unshared[name] = now
        else:
            self._unshared.pop(name, None)

    def _call(self, command):
        """`command(client)`, or _FAILED without waiting when Redis is down (or was, within
        the last `retry_s` seconds)."""
        if time.monotonic() < self._skip_until:
            return _FAILED
        try:
            result = command(self._client)
        except (redis.RedisError, OSError) as e:
            with self._lock:
                self._skip_until = time.monotonic() + self.retry_s
                first = not self._down
                self._down = True
            if first:
                log.warning(
                    "prompt memory: Redis at %s is unreachable (%s); boxes and masks stay in this "
                    "process until it is back (asked again every %g s)",
                    self.where,
                    self._describe(e),
                    self.retry_s,
                )
            return _FAILED
        if self._down:
            with self._lock:
                back, self._down = self._down, False
            if back:
                log.info("prompt memory: Redis at %s is back; boxes and masks are shared again", self.where)
        return result

    def _describe(self, error: Exception) -> str:
        text = f"{type(error).__name__}: {error}"[:300]
        return text.replace(self._password, "***") if self._password else text


_FAILED = object()
