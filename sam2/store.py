"""A persistent embedding store on disk: the second level behind the in-memory cache.

One file per image embedding, keyed by model id + image content hash, fp16 on disk, written
atomically (temporary file + rename), so every gunicorn worker and the `warm` job can share one
directory and entries survive restarts. Each file carries a checksum: a corrupt or truncated
entry is detected on read, deleted and re-encoded by the caller. The directory is bounded in
bytes; the least recently used entries (by modification time, touched on every hit) go first.
A full disk or an unwritable directory never fails a request: the entry is simply not stored.

File layout: b"SAM2EMB1" | uint32 little-endian header length | JSON header | payload, where the
header holds the original image size, each tensor's shape, and the payload's sha256.
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

from sam2.image import ImageEmbedding

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
        emb = _decode(data)
        if emb is None:
            self.corrupt += 1
            self.misses += 1
            log.warning("embedding store: %s is corrupt or truncated; it will be re-encoded", path.name)
            self._remove(path)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # LRU: a hit makes it recent
        self.hits += 1
        return emb

    # --- write ------------------------------------------------------------------------------

    def put(self, key: str, emb: ImageEmbedding) -> bool:
        """Store an embedding; returns False (and logs) if the disk refuses, never raises."""
        path = self.path(key)
        data = _encode(emb)
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


def _encode(emb: ImageEmbedding) -> bytes:
    arrays = [f.detach().to("cpu", torch.float16).contiguous().numpy() for f in emb.features]
    payload = b"".join(a.tobytes() for a in arrays)
    header = json.dumps(
        {
            "hw": list(emb.original_hw),
            "shapes": [list(a.shape) for a in arrays],
            "dtype": "float16",
            "sha256": hashlib.sha256(payload).hexdigest(),
            "created": time.time(),
        }
    ).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + payload


def _decode(data: bytes) -> ImageEmbedding | None:
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        return None
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start : start + hlen])
        shapes = [tuple(s) for s in header["shapes"]]
        hw = tuple(int(v) for v in header["hw"])
        digest = header["sha256"]
    except (ValueError, KeyError, TypeError):
        return None
    payload = memoryview(data)[start + hlen :]
    if len(payload) != sum(int(np.prod(s)) * 2 for s in shapes):
        return None
    if hashlib.sha256(payload).hexdigest() != digest:
        return None
    flat = torch.frombuffer(bytearray(payload), dtype=torch.float16)
    features, offset = [], 0
    for s in shapes:
        n = int(np.prod(s))
        features.append(flat[offset : offset + n].view(s).float())
        offset += n
    return ImageEmbedding.of(features, hw)
