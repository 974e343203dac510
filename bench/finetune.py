"""Fine-tuning cost on CPU: seconds per training step and per epoch, memory peak, and the time
from "train" to the first activated version for N corrected masks.

A randomly initialised model of the real hiera-tiny architecture at its real 1024 px input
(costs are real; what the random model learns is not the point, though it does learn: its
held-out mIoU rises and the version is activated), on ring scenes (`tests/rings.py`) rendered at
1024 x 1024. The path is the product's: images encoded once through `ImagePredictor.embedding`,
then `label_studio_sam2.engine.finetune.finetune` from the cached embeddings (the encoder is frozen), scored before
and after on a held-out split, activated through `label_studio_sam2.engine.finetuned_decoders.DecoderVersions`.

    .venv/bin/python -m bench.finetune [--masks 100] [--images 100] [--epochs 5] [--threads 2]

`--images` below `--masks` spreads the masks over fewer images (each image then carries several
rings' masks, one per example), which cuts the encoder's share of a run on a slow machine; the
report says what was run. Prints a table and writes bench/results/finetune.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import report

RESULTS = Path(__file__).parent / "results" / "finetune.json"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--masks", type=int, default=100)
    ap.add_argument("--images", type=int, default=None, help="distinct images (default: one per mask)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--size", type=int, default=1024, help="image side (the model's input is 1024)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from devkit.rings import make_ring
    from label_studio_sam2.engine.finetune import Example, FinetuneConfig, finetune, split
    from label_studio_sam2.engine.finetuned_decoders import DecoderVersions
    from label_studio_sam2.engine.image import ImagePredictor
    from label_studio_sam2.engine.models import random_model, real_config

    torch.manual_seed(0)
    loaded = random_model(real_config("sam2.1", "tiny"), "image")
    predictor = ImagePredictor(loaded)
    images = args.images or args.masks
    hw = (args.size, args.size)

    t0 = time.perf_counter()
    features = []
    for i in range(images):
        ring = make_ring(i, "train", hw)
        features.append([f.cpu() for f in predictor.embedding(f"bench-{i}", ring.image).features])
        predictor.cache.clear()
    encode_s = time.perf_counter() - t0
    examples = [
        # one task per mask, as in a project (tasks may share an image's features: --images)
        Example(features[i % images], make_ring(i, "train", hw).mask, f"task-{i}")
        for i in range(args.masks)
    ]
    train, val = split(examples, 0.2)

    steps: list[float] = []
    last = [time.perf_counter()]

    def on_progress(p) -> None:
        now = time.perf_counter()
        steps.append(now - last[0])
        last[0] = now

    cfg = FinetuneConfig(epochs=args.epochs, batch=args.batch, lr=args.lr)
    t1 = time.perf_counter()
    last[0] = t1
    result = finetune(loaded, train, val, cfg, on_progress=on_progress)
    train_s = time.perf_counter() - t1
    with tempfile.TemporaryDirectory() as root:
        t2 = time.perf_counter()
        versions = DecoderVersions(root, 1)
        version = versions.save(result.state, {"base_model": loaded.model_id})
        activated = result.improved(cfg.min_gain)
        if activated:
            versions.activate(version)
        save_s = time.perf_counter() - t2
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_epoch = int(np.ceil(len(train) / cfg.batch))
    step_s = float(np.median(steps[1:] if len(steps) > 1 else steps))
    # the first step pays one-off costs (allocator warm-up): the median of the rest is the rate
    eval_s = train_s - sum(steps)
    per_image_s = encode_s / images
    to_version_s = per_image_s * args.masks + train_s + save_s  # one image per mask, as in a project
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?"
    )
    flags = cpuinfo
    result_json = {
        "model": "random sam2.1-hiera-tiny (real size)",
        "image": f"{args.size}x{args.size} rings",
        "torch_threads": args.threads,
        "cpu": cpu,
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "masks": args.masks,
        "images_encoded": images,
        "train_examples": len(train),
        "val_examples": len(val),
        "epochs": args.epochs,
        "batch": args.batch,
        "steps": result.steps,
        "step_s_median": round(step_s, 3),
        "epoch_s": round(step_s * per_epoch, 2),
        "encode_s_per_image": round(per_image_s, 3),
        "train_and_eval_s": round(train_s, 1),
        "eval_s_before_and_after": round(eval_s, 1),
        "time_to_version_s": round(to_version_s, 1),
        "activated": activated,
        "held_out_before": {"click": result.before.click, "box": result.before.box},
        "held_out_after": {"click": result.after.click, "box": result.after.box},
        "peak_rss_mb": round(peak_mb),
    }
    rows = [
        (
            f"training step (batch {args.batch}, 1 + {cfg.corrective_clicks} prompts)",
            f"{step_s:.2f} s",
            "median",
        ),
        ("epoch", f"{step_s * per_epoch:.1f} s", f"{per_epoch} steps, {len(train)} masks"),
        ("encoder, per image", f"{per_image_s:.2f} s", "once per image; the store keeps it"),
        ("held-out scoring, before + after", f"{eval_s:.1f} s", f"{len(val)} masks, click + box"),
        (
            f"time to a version, {args.masks} masks",
            f"{to_version_s:.0f} s",
            f"encode {args.masks} images + {args.epochs} epochs + scoring"
            + ("" if images == args.masks else f" (encoder measured on {images} images)"),
        ),
        ("activated", str(activated), f"1-click {result.before.click:.3f} -> {result.after.click:.3f}"),
        ("peak RSS", f"{peak_mb:.0f} MB", ""),
    ]
    report(result_json, rows, args.out)


if __name__ == "__main__":
    main()
