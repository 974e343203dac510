"""Pieces the benchmarks share: synthetic photos and a loopback media server."""

from __future__ import annotations

import io
import os
import time
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


# --- ENCODER_RUNTIME side by side (issue 24): bench.click, bench.bulk, bench.video, bench.auto ---

RUNTIMES = ("torch", "openvino")
PRECISIONS = ("fp32", "bf16")


def add_runtime_options(
    parser, busy_help: str | None = "also time everything again beside two CPU-bound processes"
) -> None:
    """The options of a runtime comparison: --runtime, --precision, --cache-dir (and --busy)."""
    parser.add_argument(
        "--runtime",
        nargs="+",
        choices=RUNTIMES,
        default=None,
        help="time these ENCODER_RUNTIMEs side by side in one run (e.g. torch openvino); "
        "without it the benchmark runs as before, PyTorch only",
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISIONS,
        default=None,
        help="with --runtime: CPU_PRECISION(s) to compare each runtime at (torch fp32 / bf16 autocast, "
        "OpenVINO f32 / bf16 hint); default: what CPU_PRECISION=auto picks on this CPU",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="with --runtime: OpenVINO's conversion cache (default: a new empty temp dir per run, "
        "so the first start is a conversion)",
    )
    if busy_help:
        parser.add_argument("--busy", action="store_true", help=busy_help)


def runtime_precisions(precisions: list[str] | None) -> list[str]:
    """--precision, or the one CPU_PRECISION=auto picks here (bf16 on a CPU with native bf16)."""
    if precisions:
        return list(dict.fromkeys(precisions))
    from label_studio_sam2.engine.models import cpu_has_native_bf16

    return ["bf16" if cpu_has_native_bf16() else "fp32"]


def rss_mb() -> float:
    """The process's resident memory now (VmRSS), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def best_of(fn, repeats: int) -> float:
    """`fn()`'s best time of `repeats` calls, after one warm-up call (first-call allocations, a
    runtime's first inference)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def rel_l2(got, ref) -> float:
    """||got - ref|| / ||ref|| over all elements (got may be a numpy array: another runtime's)."""
    import torch

    a, b = torch.as_tensor(got).float().reshape(-1), ref.float().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def rel_l2_levels(got, ref) -> list[float]:
    """`rel_l2` per feature level."""
    return [rel_l2(a, b) for a, b in zip(got, ref, strict=True)]


def peak_rss_mb() -> float:
    """The process's peak resident memory (ru_maxrss), MB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def runtime_variants(base, runtimes, precisions, cache_dir: str | None) -> list[dict]:
    """One variant of `base` (a LoadedModel, its encoder in PyTorch) per precision and runtime,
    paired by precision: [{"runtime", "precision", "name", "loaded", ...}]. OpenVINO variants are
    converted (or loaded from `cache_dir`) here: `first_start_s` (conversion + compilation when
    `converted`), outside every timed figure; `error` when OpenVINO did not load (PyTorch would
    serve: the variant is left out of the timings). `rss_mb` after each variant is made (one
    process: cumulative)."""
    import dataclasses
    import tempfile
    import time

    import torch

    from label_studio_sam2.engine import openvino_encoder as ove
    from label_studio_sam2.engine.models import with_encoder_runtime

    cache = cache_dir or tempfile.mkdtemp(prefix="ov-cache-")
    out = []
    for precision in precisions:
        for runtime in runtimes:
            # the torch variants share base's model; an OpenVINO one is a view of it with its own encoder
            loaded = dataclasses.replace(
                base, cpu_encoder_autocast=torch.bfloat16 if precision == "bf16" else None
            )
            v = {
                "runtime": runtime,
                "precision": precision,
                "name": f"{runtime} {precision}",
                "loaded": loaded,
            }
            if runtime == "openvino":
                before, start = ove.conversions, time.perf_counter()
                v["loaded"] = loaded = with_encoder_runtime(loaded, "openvino", cache)
                v["first_start_s"] = round(time.perf_counter() - start, 2)
                v["converted"] = ove.conversions - before
                if loaded.encoder_runtime != "openvino":
                    v["error"] = "OpenVINO did not load (see the warning above)"
            v["engine_precision"] = loaded.precision
            v["rss_mb"] = round(rss_mb())
            out.append(v)
    return out


def usable(variants: list[dict]) -> list[dict]:
    return [v for v in variants if "error" not in v]


def interleaved(variants: list[dict], round_: int) -> list[dict]:
    """The variants in run order for a round: forward on even rounds, backward on odd ones, so a
    drift of the machine's load falls on every variant alike."""
    return variants if round_ % 2 == 0 else variants[::-1]


def runtime_ratio_rows(variants: list[dict], figures: list[tuple]) -> tuple[list, dict]:
    """Rows for `report` of each figure per precision and runtime, with OpenVINO's speed over
    PyTorch's at the same precision (>1: OpenVINO faster), and those ratios as a dict.

    figures: (key, label, unit, higher_is_better): each variant's `figures[key]` (missing: not
    measured) holds the value; a time (lower is better) gives torch/openvino, a rate openvino/torch."""
    rows, ratios = [], {}
    precisions = list(dict.fromkeys(v["precision"] for v in variants))
    for precision in precisions:
        for key, label, unit, higher in figures:
            by_runtime = {
                v["runtime"]: v["figures"].get(key)
                for v in variants
                if v["precision"] == precision and "figures" in v
            }
            values = [f"{rt} {val:.3f}" for rt, val in by_runtime.items() if val is not None]
            if not values:
                continue
            t, o = by_runtime.get("torch"), by_runtime.get("openvino")
            note = ""
            if t and o:
                ratio = o / t if higher else t / o
                ratios[f"{key} {precision}"] = round(ratio, 3)
                note = f"openvino/torch speed {ratio:.2f}x"
            rows.append((f"{label}, {precision}", f"{' | '.join(values)} {unit}", note))
    return rows, ratios


def runtime_summary_rows(variants: list[dict]) -> list[tuple[str, str, str]]:
    """Per variant: what the engine ran, OpenVINO's first start (conversion), RSS, or the error."""
    rows = []
    for v in variants:
        if "error" in v:
            rows.append((v["name"], "failed", v["error"]))
            continue
        note = f"engine: {v['engine_precision']}; RSS {v['rss_mb']} MB after it was made"
        if "first_start_s" in v:
            what = f"{v['converted']} conversion(s) + compile" if v["converted"] else "from the cache"
            note += f"; first start {v['first_start_s']:.1f} s ({what}, not in the timings)"
        rows.append((v["name"], "", note))
    return rows


def plain(variants: list[dict]) -> list[dict]:
    """The variants as JSON (without the models)."""
    return [{k: val for k, val in v.items() if k != "loaded"} for v in variants]
