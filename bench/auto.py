"""Automatic masks per image: the transformers decoder (before issue 15), the decoder with its
per-image work done once (identical output), and the opt-in fast mode (skip covered points).

Side by side in one run on one image embedding (encoded once, outside the timings):
- time per image and the decoder's share, for each variant and grid size;
- the fast decoder's masks against the transformers decoder's (each mask's best IoU, counts);
- the fast mode's recall: the share of the full run's masks it finds again at IoU >= 0.9.
On a random real-size hiera-tiny (real latency; its masks are random blobs) and on the trained
fixture devkit/sam2-shapes over test scenes (masks of real shapes: the recall that means
something).

    .venv/bin/python -m bench.auto [--points 16 32] [--threads 2] [--scenes 6]
Prints a table and writes bench/results/auto.json.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from bench.common import machine, report

RESULTS = Path(__file__).parent / "results" / "auto.json"
FIXTURE = Path(__file__).parent.parent / "devkit" / "sam2-shapes"

VARIANTS = {  # name: (fast decoder, skip covered points)
    "transformers decoder (before)": (False, False),
    "per-image decoder context": (True, False),
    "fast mode (AUTO_FAST)": (True, True),
}


def _best_ious(masks, reference) -> list[float]:
    """For each reference mask, its best IoU among `masks`."""
    from sam2.auto import mask_iou

    return [max((mask_iou(r, m) for m in masks), default=0.0) for r in reference]


def _generate(loaded, cache, key, rgb, points: int, fast: bool, skip: bool):
    from sam2.auto import AutoMaskConfig, AutoMaskGenerator
    from sam2.image import ImagePredictor

    pred = ImagePredictor(loaded, cache, fast_decoder=fast)
    spent: dict[str, float] = defaultdict(float)
    pred.on_timing = lambda part, s: spent.__setitem__(part, spent[part] + s)
    gen = AutoMaskGenerator(pred, AutoMaskConfig(points_per_side=points, skip_covered=skip))
    start = time.perf_counter()
    masks = gen.generate(key, rgb)
    return masks, time.perf_counter() - start, spent["decoder"], spent["encoder"]


def compare(loaded, images: list[np.ndarray], points: int) -> dict:
    """The three variants on each image (embeddings cached first), summed over images."""
    from sam2.image import EmbeddingCache, ImagePredictor

    cache = EmbeddingCache(4 << 30)
    for i, rgb in enumerate(images):
        ImagePredictor(loaded, cache).embedding(f"img{i}", rgb)
    out: dict = {}
    results: dict[str, list] = {}
    for name, (fast, skip) in VARIANTS.items():
        total = decoder = 0.0
        per_image = []
        for i, rgb in enumerate(images):
            masks, t, d, e = _generate(loaded, cache, f"img{i}", rgb, points, fast, skip)
            assert e == 0.0, "the embedding was cached: no encoder in the timing"
            total, decoder = total + t, decoder + d
            per_image.append(masks)
        results[name] = per_image
        out[name] = {
            "s_per_image": total / len(images),
            "decoder_s_per_image": decoder / len(images),
            "masks": sum(len(m) for m in per_image),
        }
    ref, same, quick = (results[n] for n in VARIANTS)
    match = [iou for r, m in zip(ref, same, strict=True) for iou in _best_ious(m, r)]
    recall = [iou for r, m in zip(ref, quick, strict=True) for iou in _best_ious(m, r)]
    before, context, fast_mode = (out[n]["s_per_image"] for n in VARIANTS)
    out["identical_speedup"] = before / context
    out["fast_mode_speedup"] = before / fast_mode
    out["identical_min_iou"] = min(match, default=1.0)
    n_ref, n_same = out[list(VARIANTS)[0]]["masks"], out[list(VARIANTS)[1]]["masks"]
    out["identical_count_change"] = (n_same - n_ref) / max(n_ref, 1)
    out["fast_mode_recall_at_0.9"] = float(np.mean([i >= 0.9 for i in recall])) if recall else None
    return out


def _scenes(n: int) -> list[np.ndarray]:
    from devkit.scenes import make_scene

    return [make_scene(seed).image for seed in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, nargs="+", default=[16], help="points per side (SAM2: 32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scenes", type=int, default=6, help="test scenes for the trained fixture")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from bench.common import photo
    from sam2.models import load_image_model, random_model, real_config

    cpu, load = machine()
    loaded = random_model(real_config(), "image")
    from backend.media import open_image

    rgb = open_image(photo(1024, 768, 7)).load()
    result: dict = {
        "model": "hiera-tiny (random init), 1024 px input; and devkit/sam2-shapes",
        "image": "1024x768 synthetic photo; test scenes for the fixture",
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "load_before": load,
        "precision": loaded.precision,
        "random_real_size": {},
    }
    rows: list[tuple[str, str, str]] = [("machine", cpu, f"load average {load}")]
    for points in args.points:
        r = compare(loaded, [rgb], points)
        result["random_real_size"][points] = r
        rows += _rows(f"hiera-tiny random, {points}x{points}", r, points)
    trained = load_image_model(str(FIXTURE), "cpu", cpu_precision="fp32")
    r = compare(trained, _scenes(args.scenes), 16)
    result["trained_fixture_16"] = r
    rows += _rows(f"sam2-shapes fixture, {args.scenes} scenes, 16x16", r, 16)
    result["load_after"] = machine()[1]
    rows.append(("load average after", result["load_after"], ""))
    report(result, rows, RESULTS, value_width=12)


def _rows(title: str, r: dict, points: int) -> list[tuple[str, str, str]]:
    rows = [(title, "", "")]
    for name in VARIANTS:
        v = r[name]
        note = f"decoder {v['decoder_s_per_image']:.2f} s, {v['masks']} masks"
        rows.append((f"  {name}", f"{v['s_per_image']:.2f} s", note))
    rows += [
        ("  identical output: speed-up", f"{r['identical_speedup']:.2f}x", "target >= 1.5x"),
        (
            "    worst best-IoU, count change",
            f"{r['identical_min_iou']:.3f}",
            f"{r['identical_count_change']:+.1%}",
        ),
        ("  fast mode: speed-up", f"{r['fast_mode_speedup']:.2f}x", "target >= 3x"),
        ("    recall of the full run at IoU 0.9", _pct(r["fast_mode_recall_at_0.9"]), "target >= 90 %"),
    ]
    return rows


def _pct(x) -> str:
    return "n/a (no masks)" if x is None else f"{x:.0%}"


if __name__ == "__main__":
    main()
