"""Pieces the benchmarks share: synthetic photos and a loopback media server."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from devkit.media_server import MediaServer


def serve_directory(directory: str) -> tuple[MediaServer, str]:
    """Serve `directory` on 127.0.0.1 (a free port) in a thread; returns (server, base URL).

    The backend refuses loopback media by default (docs/deployment.md, "Security model"): the benchmark's own
    host is listed in MEDIA_ALLOWED_HOSTS for the settings built, and the servers started, after
    this call, as an operator would list it."""
    server = MediaServer(directory).serve_files()
    hosts = [h for h in os.environ.get("MEDIA_ALLOWED_HOSTS", "").split(",") if h.strip()]
    if "127.0.0.1" not in hosts:
        os.environ["MEDIA_ALLOWED_HOSTS"] = ",".join([*hosts, "127.0.0.1"])
    return server, server.url


def photo(width: int, height: int, seed: int) -> bytes:
    """A smooth synthetic 'photo' as JPEG bytes (gradients and blobs compress like a real one)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width].astype(np.float32)
    img = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(40, 200)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def report(result: dict, rows: list[tuple[str, str, str]], path, value_width: int = 10) -> None:
    """Print a benchmark's header line and (label, value, note) rows; write `result` as JSON."""
    import json
    from pathlib import Path

    width = max(len(a) for a, _, _ in rows)
    print(f"{result['model']}; {result['image']}; {result['torch_threads']} torch threads")
    for a, b, c in rows:
        print(f"{a:<{width}}  {b:>{value_width}}  {c}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def machine() -> tuple[str, str]:
    """The CPU model with its bf16/AVX-512 flags, and the load average, for every figure."""
    name, flags = "unknown CPU", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    marks = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{name} ({os.cpu_count()} cpus; {' '.join(marks) or 'no avx512'})", load
