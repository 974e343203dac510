"""A persistent embedding store on disk: the second level behind the in-memory cache.

One file per entry, written atomically (temporary file + rename), so every gunicorn worker and
the `warm` job can share one directory and entries survive restarts. Two kinds of entry share the
directory, its size bound and its eviction:
- image embeddings (`get`/`put`), keyed by model, encoder precision and image content hash
  (label_studio_sam2.engine.models.store_key), fp16 on disk;
- any list of tensors (`get_tensors`/`put_tensors`), kept in their own dtype, bit for bit: the
  video tracker's per-frame image features (label_studio_sam2/engine/tracker.py), keyed by model, precision, video
  content and frame index.
Each file carries a checksum: a corrupt or truncated
entry is detected on read, deleted and re-encoded by the caller. The directory is bounded in
bytes; the least recently used entries (by modification time, touched on every hit) go first.
A full disk or an unwritable directory never fails a request: the entry is simply not stored.

File layout: b"SAM2EMB1" | uint32 little-endian header length | JSON header | payload, where the
header holds each tensor's shape and dtype, the payload's sha256 and the entry's own fields (an
image's original size). Entries written before dtypes were recorded (one "dtype") still read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from label_studio_sam2.engine.image import ImageEmbedding

log = logging.getLogger(__name__)

MAGIC = b"SAM2EMB1"
SUFFIX = ".emb"
TMP_PREFIX = ".tmp-"


class EmbeddingStore:
    """Disk LRU of `ImageEmbedding`s. Thread- and process-safe for concurrent readers/writers."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int = 20 << 30):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._bytes = self._scan_bytes()
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.write_errors = 0

    # --- paths ------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        name = hashlib.sha256(key.encode()).hexdigest()
        return self.dir / name[:2] / (name + SUFFIX)

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    @property
    def bytes(self) -> int:
        return self._bytes

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every stored entry. Other writers' temporary files are not
        entries (evicting one would break its rename), and a file another process removes
        while we look is skipped."""
        out = []
        for p in self.dir.glob(f"*/*{SUFFIX}"):
            if p.name.startswith(TMP_PREFIX):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, p))
        return out

    def _scan_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    # --- read -------------------------------------------------------------------------------

    def get(self, key: str) -> ImageEmbedding | None:
        """The stored embedding (fp32 tensors on CPU), or None if absent or corrupt."""
        found = self.get_tensors(key)
        if found is None:
            return None
        tensors, fields = found
        try:
            hw = tuple(int(v) for v in fields["hw"])
        except (KeyError, TypeError, ValueError):
            return None
        return ImageEmbedding.of([t.float() for t in tensors], hw)

    def get_tensors(self, key: str) -> tuple[list[torch.Tensor], dict] | None:
        """The stored tensors (on CPU, in the dtype they were put with) and the entry's fields,
        or None if absent or corrupt (a corrupt entry is deleted)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as e:
            log.warning("embedding store: cannot read %s: %s", path.name, e)
            self.misses += 1
            return None
        found = _decode(data)
        if found is None:
            self.corrupt += 1
            self.misses += 1
            log.warning("embedding store: %s is corrupt or truncated; it will be re-encoded", path.name)
            self._remove(path)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # LRU: a hit makes it recent
        self.hits += 1
        return found

    # --- write ------------------------------------------------------------------------------

    def put(self, key: str, emb: ImageEmbedding) -> bool:
        """Store an embedding (in fp16); returns False (and logs) if the disk refuses, never raises."""
        return self.put_tensors(key, [f.half() for f in emb.features], {"hw": list(emb.original_hw)})

    def put_tensors(self, key: str, tensors: list[torch.Tensor], fields: dict | None = None) -> bool:
        """Store tensors as they are (dtype and values exact) with JSON-able `fields`; returns
        False (and logs) if the disk refuses, never raises."""
        path = self.path(key)
        data = _encode(tensors, fields or {})
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=SUFFIX)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            existed = path.exists()
            os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
            tmp = None
        except OSError as e:
            self.write_errors += 1
            log.warning("embedding store: not stored (%s: %s)", type(e).__name__, e.strerror or e)
            return False
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        with self._lock:
            if not existed:
                self._bytes += len(data)
            over = self._bytes > self.max_bytes
        if over:
            self.evict()
        return True

    def evict(self) -> int:
        """Delete least recently used entries until the store fits; returns bytes freed."""
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        freed = 0
        for _, size, p in sorted(entries):
            if total - freed <= self.max_bytes:
                break
            if self._remove(p):
                freed += size
        with self._lock:
            self._bytes = total - freed
        return freed

    def _remove(self, path: Path) -> bool:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            log.warning("embedding store: cannot remove %s: %s", path.name, e)
            return False
        with self._lock:
            self._bytes = max(0, self._bytes - size)
        return True


# dtypes an entry may hold (the name in the header -> torch)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _encode(tensors: list[torch.Tensor], fields: dict) -> bytes:
    on_cpu = [t.detach().to("cpu") for t in tensors]
    orders = [_memory_order(t) for t in on_cpu]
    flat = [t.permute(order).contiguous() for t, order in zip(on_cpu, orders, strict=True)]
    payload = b"".join(t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in flat)
    header = json.dumps(
        {
            **fields,
            "shapes": [list(t.shape) for t in on_cpu],
            "dtypes": [str(t.dtype).removeprefix("torch.") for t in on_cpu],
            "orders": orders,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "created": time.time(),
        }
    ).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + payload


def _memory_order(t: torch.Tensor) -> list[int]:
    """The dimensions from the outermost in memory to the innermost: a tensor read back is laid
    out (strided) like the one stored, so kernels that choose by layout choose the same."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def _decode(data: bytes) -> tuple[list[torch.Tensor], dict] | None:
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        return None
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start : start + hlen])
        shapes = [tuple(int(v) for v in s) for s in header["shapes"]]
        names = header.get("dtypes") or [header["dtype"]] * len(shapes)
        dtypes = [DTYPES[n] for n in names]
        orders = header.get("orders") or [list(range(len(s))) for s in shapes]
        digest = header["sha256"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if len(dtypes) != len(shapes) or len(orders) != len(shapes):
        return None
    if any(sorted(o) != list(range(len(s))) for o, s in zip(orders, shapes, strict=True)):
        return None
    sizes = [int(np.prod(s)) * d.itemsize for s, d in zip(shapes, dtypes, strict=True)]
    payload = memoryview(data)[start + hlen :]
    if len(payload) != sum(sizes):
        return None
    if hashlib.sha256(payload).hexdigest() != digest:
        return None
    buffer = bytearray(payload)
    tensors, offset = [], 0
    for shape, dtype, order, size in zip(shapes, dtypes, orders, sizes, strict=True):
        if size:
            t = torch.frombuffer(buffer, dtype=dtype, count=size // dtype.itemsize, offset=offset)
        else:
            t = torch.empty(0, dtype=dtype)
        inverse = sorted(range(len(order)), key=order.__getitem__)
        tensors.append(t.view([shape[d] for d in order]).permute(inverse))
        offset += size
    return tensors, header
