"""The image encoder alone, per runtime (ENCODER_RUNTIME) and precision, side by side in one process.

A randomly initialised model of the real hiera-tiny architecture at 1024 px (latency and memory are
real, masks are not), one 1024x768 photo; what the predictor runs for an image (its `_encode`:
preprocessing, the vision encoder, the decoder's projections), best of N after one warm-up, per
runtime (torch, openvino) and precision (fp32, bf16: CPU_PRECISION's choices; OpenVINO's f32/bf16
INFERENCE_PRECISION_HINT). Quiet, and with --busy again beside two CPU-bound processes. Also:
OpenVINO's first-start conversion time (into an empty cache) and its load time from the cache, the
output's rel-L2 against PyTorch fp32 per feature level, and the process's RSS after each runtime's
encodes (one process: the OpenVINO figure includes the PyTorch model the torch rows use; a server
on OpenVINO frees the PyTorch encoder's weights). One conversion serves both precisions.

    .venv/bin/python -m bench.encoder [--runtime torch openvino] [--precision fp32 bf16] [--busy]

Prints a table and writes bench/results/encoder.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.click import busy_neighbours
from bench.common import best_of, machine, photo, rel_l2_levels, report, rss_mb

RESULTS = Path(__file__).parent / "results" / "encoder.json"


def run(runtimes, precisions, repeats: int, busy: bool, image_size: int, cache_dir: str | None) -> dict:
    from label_studio_sam2.engine.image import ImagePredictor
    from label_studio_sam2.engine.models import random_model, real_config, with_encoder_runtime

    cpu, load_before = machine()
    torch.manual_seed(0)
    base = random_model(real_config(), "image", cpu_precision="fp32")
    assert base.image_size == image_size == 1024
    rgb = np.asarray(Image.open(io.BytesIO(photo(1024, 768, 0))).convert("RGB"))
    cache = cache_dir or tempfile.mkdtemp(prefix="ov-cache-")
    r = {
        "model": "random sam2.1 hiera-tiny (real architecture)",
        "image": "1024x768 photo -> 1024 px input",
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "load_before": load_before,
        "repeats": repeats,
        "rows": [],
        "rss_mb_torch_model_loaded": round(rss_mb()),
    }
    variants = []
    for runtime in runtimes:
        for precision in precisions:
            # the torch rows share the base model; an OpenVINO row is a view of it with its own encoder
            loaded = dataclasses.replace(
                base, cpu_encoder_autocast=torch.bfloat16 if precision == "bf16" else None
            )
            row = {"runtime": runtime, "precision": precision}
            if runtime == "openvino":
                from label_studio_sam2.engine import openvino_encoder as ove

                before = ove.conversions
                start = time.perf_counter()
                view = with_encoder_runtime(loaded, "openvino", cache)
                row["first_load_s"] = round(time.perf_counter() - start, 2)
                row["converted"] = ove.conversions - before
                if view.ov_encoder is None:
                    row["error"] = "OpenVINO did not load (see the warning above)"
                    r["rows"].append(row)
                    continue
                start = time.perf_counter()
                loaded = with_encoder_runtime(loaded, "openvino", cache)  # again: from the cache
                row["cached_load_s"] = round(time.perf_counter() - start, 2)
                del view
            predictor = ImagePredictor(loaded)
            variants.append((row, predictor))
            row["quiet_s"] = round(best_of(lambda p=predictor: p._encode(rgb), repeats), 3)
            row["rss_mb_after"] = round(rss_mb())
            r["rows"].append(row)
    reference = next(
        (p for row, p in variants if row["runtime"] == "torch" and row["precision"] == "fp32"), None
    )
    if reference is not None:
        ref = reference._encode(rgb).features
        for row, p in variants:
            got = p._encode(rgb).features
            row["rel_l2_vs_torch_fp32"] = rel_l2_levels(got, ref)
    if busy:
        _, r["load_before_busy"] = machine()
        neighbours = busy_neighbours(2)
        try:
            time.sleep(2)  # let them get going
            for row, p in variants:
                row["busy_s"] = round(best_of(lambda p=p: p._encode(rgb), repeats), 3)
            _, r["load_during_busy"] = machine()
        finally:
            for proc in neighbours:
                proc.terminate()
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime", nargs="+", default=["torch", "openvino"], choices=["torch", "openvino"])
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3, help="best of N (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (OpenVINO follows them)")
    p.add_argument("--busy", action="store_true", help="also time beside two CPU-bound processes")
    p.add_argument("--cache-dir", default=None, help="OpenVINO's cache (default: a new empty one)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    r = run(args.runtime, args.precision, args.repeats, args.busy, 1024, args.cache_dir)
    rows = [("machine", r["cpu"], f"load average before {r['load_before']}")]
    if args.busy:
        rows.append(("busy", "2 procs", f"load average during {r.get('load_during_busy')}"))
    ref = {row["precision"]: row.get("quiet_s") for row in r["rows"] if row["runtime"] == "torch"}
    ref_busy = {row["precision"]: row.get("busy_s") for row in r["rows"] if row["runtime"] == "torch"}
    for row in r["rows"]:
        name = f"{row['runtime']} {row['precision']}"
        if "error" in row:
            rows.append((name, "failed", row["error"]))
            continue
        errs = row.get("rel_l2_vs_torch_fp32")
        note = f"RSS {row['rss_mb_after']} MB"
        if errs is not None:
            note += "; rel-L2 vs torch fp32 " + "/".join(f"{e:.1e}" for e in errs)
        rows.append((f"{name} quiet", f"{row['quiet_s']:.3f} s", note))
        if row["runtime"] == "openvino" and ref.get(row["precision"]):
            rows.append(("  vs torch, same precision", f"{ref[row['precision']] / row['quiet_s']:.2f}x", ""))
        if "busy_s" in row:
            rows.append((f"{name} busy", f"{row['busy_s']:.3f} s", ""))
            if row["runtime"] == "openvino" and ref_busy.get(row["precision"]):
                rows.append(
                    ("  vs torch, same precision", f"{ref_busy[row['precision']] / row['busy_s']:.2f}x", "")
                )
        if "first_load_s" in row:
            rows.append(
                (
                    "  first start / cached load",
                    f"{row['first_load_s']:.1f} s",
                    f"{row['converted']} conversion(s); from the cache {row['cached_load_s']:.1f} s",
                )
            )
    report(r, rows, args.out, value_width=12)


if __name__ == "__main__":
    main()
