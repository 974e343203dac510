"""Automatic masks per image: the transformers decoder (before issue 15), the decoder with its
per-image work done once (identical output), and the opt-in fast mode (AUTO_FAST: coarse grid
first, finer points only near candidates and outside confident masks).

Side by side in one run, each image encoded once outside the timings:
- A random real-size hiera-tiny (real latency; its masks are random blobs that no filter keeps):
  time per image of each variant; the encoder's time (for the share it adds to a whole image);
  and the same with every candidate kept (`pred_iou_thresh = stability_thresh = 0`), the bound
  where no candidate's upscaling can be skipped and post-processing handles every candidate.
- The trained fixture devkit/sam2-shapes on several image kinds (test scenes, touching pairs,
  crowded scenes, 2x2 mosaics of small shapes, rings it was never trained on, smooth synthetic
  photos), at the default filters and at looser ones (more reference masks): the fast mode's
  recall (share of the full run's masks it finds again at IoU >= 0.9) and the share of grid points
  it decodes, for the default setting and a curve over `fine_iou_margin`.
- The fast mode's speed-up on a real-size model, derived: the random model's time per decoded
  point (fast decoder) times the share of points the fast mode decodes on the fixture's kinds.

    .venv/bin/python -m bench.auto [--points 16 32] [--threads 2] [--images 10] [--repeats 2]
Prints a table and writes bench/results/auto.json.

    .venv/bin/python -m bench.auto --runtime torch openvino [--precision fp32 bf16] [--points 16]
                                   [--repeats 2] [--busy] [--cache-dir DIR]
ENCODER_RUNTIME side by side in one process (issue 24), instead of the figures above: automatic
masks of a whole image (its encoder included: a new 1024x768 photo per round; the decoder stays
in PyTorch) with the default options per runtime and precision (default precision:
CPU_PRECISION=auto's pick), after a warm-up, the variants in turn forward and backward order per
round (best kept), split into encoder / decoder / the rest; --busy: again beside two CPU-bound
processes, in the same run. OpenVINO's conversion (into a new temp cache unless --cache-dir) is
timed apart, before. Prints each figure per runtime with OpenVINO's speed over PyTorch's at the
same precision and writes bench/results/auto-runtime.json. On the shared 2-core EPYC at load ~8:
5.4 min with --points 4 --repeats 1 --busy --precision fp32 bf16 (conversion ~85 s, once for both
precisions); at the default 16x16 points the PyTorch decoder takes ~40 s of a ~50 s image there, so
the defaults (one precision, 2 rounds, quiet) take ~6 min and --busy doubles it.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from bench.click import busy_neighbours
from bench.common import (
    add_runtime_options,
    interleaved,
    machine,
    photo,
    plain,
    report,
    rss_mb,
    runtime_precisions,
    runtime_ratio_rows,
    runtime_summary_rows,
    runtime_variants,
    usable,
)

RESULTS = Path(__file__).parent / "results" / "auto.json"
FIXTURE = Path(__file__).parent.parent / "devkit" / "sam2-shapes"

VARIANTS = {  # name: (fast decoder, fast mode)
    "transformers decoder (before)": (False, False),
    "per-image decoder context": (True, False),
    "fast mode (AUTO_FAST)": (True, True),
}
FILTERS = {  # the fixture's predicted IoUs are low: the loose filters keep 3x the masks
    "default filters (IoU 0.8, stability 0.92)": {},
    "loose filters (IoU 0.7, stability 0.85)": {"pred_iou_thresh": 0.7, "stability_thresh": 0.85},
}
MARGINS = [None, 0.2, 0.1, 0.05, 0.0]  # fine_iou_margin for the curve (None: every uncovered point)


def _best_ious(masks, reference) -> list[float]:
    """For each reference mask, its best IoU among `masks`."""
    from label_studio_sam2.engine.automask import mask_iou

    return [max((mask_iou(r, m) for m in masks), default=0.0) for r in reference]


def _generate(loaded, cache, key, rgb, config, fast_decoder: bool):
    """One generation: (masks, seconds, decoder seconds, encoder seconds, points decoded)."""
    from label_studio_sam2.engine.automask import AutoMaskGenerator
    from label_studio_sam2.engine.image import ImagePredictor

    pred = ImagePredictor(loaded, cache, fast_decoder=fast_decoder)
    spent: dict[str, float] = defaultdict(float)
    pred.on_timing = lambda part, s: spent.__setitem__(part, spent[part] + s)
    gen = AutoMaskGenerator(pred, config)
    start = time.perf_counter()
    masks = gen.generate(key, rgb)
    return masks, time.perf_counter() - start, spent["decoder"], spent["encoder"], gen.points_decoded


def _embed(loaded, images: dict[str, np.ndarray]):
    from label_studio_sam2.engine.image import EmbeddingCache, ImagePredictor

    cache = EmbeddingCache(8 << 30)
    pred = ImagePredictor(loaded, cache)
    for key, rgb in images.items():
        pred.embedding(key, rgb)
    return cache


def compare(loaded, images: dict[str, np.ndarray], points: int, repeats: int = 1, **filters) -> dict:
    """The three variants on each image (embeddings cached first), summed over images. With
    repeats, the variants run in rounds, in turn forward and backward order, and each keeps its
    fastest round: a neighbour's burst of load then hits one round of one variant, not a ratio."""
    from label_studio_sam2.engine.automask import AutoMaskConfig

    cache = _embed(loaded, images)
    out: dict = {}
    results: dict[str, list] = {}
    order = list(VARIANTS)
    for round_ in range(repeats):
        for name in order if round_ % 2 == 0 else order[::-1]:
            fast, skip = VARIANTS[name]
            config = AutoMaskConfig(points_per_side=points, skip_covered=skip, **filters)
            total = decoder = 0.0
            decoded = 0
            per_image = []
            for key, rgb in images.items():
                masks, t, d, e, n = _generate(loaded, cache, key, rgb, config, fast)
                assert e == 0.0, "the embedding was cached: no encoder in the timing"
                total, decoder, decoded = total + t, decoder + d, decoded + n
                per_image.append(masks)
            results[name] = per_image
            if name in out and out[name]["s_per_image"] <= total / len(images):
                continue
            out[name] = {
                "s_per_image": total / len(images),
                "decoder_s_per_image": decoder / len(images),
                "ms_per_decoded_point": 1000 * total / max(decoded, 1),
                "points_decoded_share": decoded / (points * points * len(images)),
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


def fast_mode_curve(loaded, kinds: dict[str, dict[str, np.ndarray]], points: int, filters: dict) -> dict:
    """Per image kind: the full run's masks, and for each fine_iou_margin the fast mode's recall
    and share of grid points decoded (the fixture's times are milliseconds: the real-size rows
    say what a point costs)."""
    from label_studio_sam2.engine.automask import AutoMaskConfig

    cache = _embed(loaded, {k: v for images in kinds.values() for k, v in images.items()})
    out: dict = {}
    for kind, images in kinds.items():
        full = {}
        t_full = 0.0
        for key, rgb in images.items():
            full[key], t, *_ = _generate(
                loaded, cache, key, rgb, AutoMaskConfig(points_per_side=points, **filters), True
            )
            t_full += t
        row: dict = {"images": len(images), "full_masks": sum(len(m) for m in full.values()), "margins": {}}
        for margin in MARGINS:
            config = AutoMaskConfig(
                points_per_side=points, skip_covered=True, fine_iou_margin=margin, **filters
            )
            hits, decoded = [], 0
            for key, rgb in images.items():
                masks, _, _, _, n = _generate(loaded, cache, key, rgb, config, True)
                hits += [i >= 0.9 for i in _best_ious(masks, full[key])]
                decoded += n
            row["margins"][str(margin)] = {
                "recall_at_0.9": float(np.mean(hits)) if hits else None,
                "found": int(sum(hits)),
                "points_decoded_share": decoded / (points * points * len(images)),
            }
        out[kind] = row
    return out


def _mosaic(seed: int) -> np.ndarray:
    """2x2 test scenes side by side: shapes of half the usual size, four times as many."""
    from PIL import Image

    from devkit.scenes import make_scene

    tiles = [np.asarray(Image.fromarray(make_scene(seed * 4 + k).image).resize((160, 120))) for k in range(4)]
    return np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)


def fixture_kinds(n: int) -> dict[str, dict[str, np.ndarray]]:
    """Image kinds for the trained fixture, n images each (test split: never trained on)."""
    from devkit.rings import make_ring
    from devkit.scenes import make_scene
    from label_studio_sam2.service.media import open_image

    makers = {
        "test scenes": lambda s: make_scene(s).image,
        "touching pairs": lambda s: make_scene(100 + s, pair=True, n_shapes=3).image,
        "crowded (8 shapes, 288 px)": lambda s: make_scene(200 + s, hw=(288, 288), n_shapes=8).image,
        "mosaic (small shapes)": lambda s: _mosaic(300 + s),
        "rings (never trained on)": lambda s: make_ring(s).image,
        "synthetic photos 512x384": lambda s: open_image(photo(512, 384, s)).load(),
    }
    return {kind: {f"{kind}/{s}": make(s) for s in range(n)} for kind, make in makers.items()}


def runtime_run(
    runtimes, precisions, points: list[int], repeats: int = 2, busy: bool = False, cache_dir=None
):
    """Automatic masks of a new image, encoder included, per ENCODER_RUNTIME and precision, side
    by side (see the module's docstring)."""
    from label_studio_sam2.engine.automask import AutoMaskConfig
    from label_studio_sam2.engine.image import EmbeddingCache
    from label_studio_sam2.engine.models import random_model, real_config
    from label_studio_sam2.service.media import open_image

    cpu, load_before = machine()
    torch.manual_seed(0)
    base = random_model(real_config(), "image", cpu_precision="fp32")
    variants = runtime_variants(base, runtimes, precisions, cache_dir)
    warm = open_image(photo(1024, 768, 999)).load()
    for v in usable(variants):  # first-call allocations, OpenVINO's first inference
        _generate(v["loaded"], EmbeddingCache(), "warm", warm, AutoMaskConfig(points_per_side=4), True)
        v["rss_mb_after_warm_up"] = round(rss_mb())
    loads, seed = {}, 0
    for phase in ["quiet", "busy"] if busy else ["quiet"]:
        neighbours = busy_neighbours(2) if phase == "busy" else []
        try:
            if neighbours:
                time.sleep(2)  # let them get going
            for r in range(repeats):
                for n in points:
                    config = AutoMaskConfig(points_per_side=n)
                    seed += 1
                    rgb = open_image(photo(1024, 768, seed)).load()  # new to every variant's cache
                    for v in interleaved(usable(variants), r):
                        masks, total, decoder, encoder, decoded = _generate(
                            v["loaded"], EmbeddingCache(), f"img{seed}", rgb, config, True
                        )
                        assert encoder > 0, "the image was not encoded"
                        run = {
                            "total_s": total,
                            "encoder_s": encoder,
                            "decoder_s": decoder,
                            "masks": len(masks),
                        }
                        v.setdefault(f"rounds_{phase}_{n}", []).append(run)
                        f = v.setdefault("figures", {})
                        for part in ("total", "encoder", "decoder"):
                            key = f"{part}_s_{phase}_{n}"
                            f[key] = min(f.get(key, float("inf")), run[f"{part}_s"])
            loads[phase] = machine()[1]
        finally:
            for proc in neighbours:
                proc.terminate()
    for v in usable(variants):
        v["rss_mb_end"] = round(rss_mb())
    return {
        "model": "hiera-tiny (random init), 1024 px input",
        "image": "1024x768 synthetic photo, a new one per round",
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "load_before": load_before,
        "load_at_end_of": loads,
        "points_per_side": points,
        "points_per_batch": AutoMaskConfig().points_per_batch,
        "repeats": repeats,
        "variants": variants,
    }


def runtime_main(args) -> None:
    from label_studio_sam2.engine.automask import AutoMaskConfig

    points = args.points or [AutoMaskConfig().points_per_side]
    r = runtime_run(
        args.runtime, runtime_precisions(args.precision), points, args.repeats, args.busy, args.cache_dir
    )
    variants = r.pop("variants")
    rows = [("machine", r["cpu"], f"load average before {r['load_before']}")]
    for phase, load in r["load_at_end_of"].items():
        rows.append((f"{phase} rounds", f"{r['repeats']}", f"load average at their end {load}"))
    rows += runtime_summary_rows(variants)
    figures = []
    for phase in r["load_at_end_of"]:
        for n in points:
            figures += [
                (f"total_s_{phase}_{n}", f"automatic masks {n}x{n}, whole image, {phase}", "s", False),
                (f"encoder_s_{phase}_{n}", f"  of which the encoder, {phase}", "s", False),
                (f"decoder_s_{phase}_{n}", f"  of which the decoder (PyTorch in both), {phase}", "s", False),
            ]
    ratio_rows, r["openvino_over_torch_speed"] = runtime_ratio_rows(usable(variants), figures)
    rows += [("figure (best of the rounds)", "seconds per runtime", "")] + ratio_rows
    r["variants"] = plain(variants)
    report(r, rows, RESULTS.with_name("auto-runtime.json"), value_width=12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--points",
        type=int,
        nargs="+",
        default=None,
        help="points per side (SAM2: 32); default 16 32 (with --runtime: AutoMaskConfig's default, 16)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=10, help="fixture images per kind")
    p.add_argument("--repeats", type=int, default=2, help="rounds of the real-size runs (fastest kept)")
    add_runtime_options(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.runtime:
        runtime_main(args)
        return
    if args.busy:
        p.error("--busy needs --runtime")
    args.points = args.points or [16, 32]
    from label_studio_sam2.engine.automask import AutoMaskConfig
    from label_studio_sam2.engine.image import EmbeddingCache, ImagePredictor
    from label_studio_sam2.engine.models import load_image_model, random_model, real_config
    from label_studio_sam2.service.media import open_image

    cpu, load = machine()
    loaded = random_model(real_config(), "image")
    rgb = open_image(photo(1024, 768, 7)).load()
    start = time.perf_counter()
    ImagePredictor(loaded, EmbeddingCache()).embedding("encoder-time", rgb)
    encoder_s = time.perf_counter() - start
    defaults = AutoMaskConfig()
    result: dict = {
        "model": "hiera-tiny (random init), 1024 px input; and devkit/sam2-shapes",
        "image": "1024x768 synthetic photo; fixture image kinds",
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "load_before": load,
        "precision": loaded.precision,
        "fast_mode_defaults": {
            k: getattr(defaults, k)
            for k in ("coarse_step", "fine_iou_margin", "cover_iou_thresh", "cover_max_area")
        },
        "encoder_s": encoder_s,
        "repeats": args.repeats,
        "random_real_size": {},
    }
    rows: list[tuple[str, str, str]] = [("machine", cpu, f"load average {load}")]
    rows.append(
        ("hiera-tiny random: encoder, once per image", f"{encoder_s:.2f} s", "outside the times below")
    )
    for points in args.points:
        r = compare(loaded, {"photo": rgb}, points, args.repeats)
        result["random_real_size"][points] = r
        rows += _rows(f"hiera-tiny random, {points}x{points} (no candidate passes the filters)", r, encoder_s)
    every = compare(loaded, {"photo": rgb}, 16, args.repeats, pred_iou_thresh=0.0, stability_thresh=0.0)
    result["random_real_size_every_candidate_kept_16"] = every
    rows += _rows("hiera-tiny random, 16x16, every candidate kept (filters 0)", every, encoder_s)

    trained = load_image_model(str(FIXTURE), "cpu", cpu_precision="fp32")
    kinds = fixture_kinds(args.images)
    result["fixture"] = {}
    for title, filters in FILTERS.items():
        curve = fast_mode_curve(trained, kinds, 16, filters)
        result["fixture"][title] = curve
        rows += _curve_rows(f"sam2-shapes fixture, 16x16, {title}, {args.images} images per kind", curve)
    rows += _derived_rows(result, defaults.fine_iou_margin)
    result["load_after"] = machine()[1]
    rows.append(("load average after", result["load_after"], ""))
    report(result, rows, RESULTS, value_width=12)


def _rows(title: str, r: dict, encoder_s: float) -> list[tuple[str, str, str]]:
    rows = [(title, "", "")]
    for name in VARIANTS:
        v = r[name]
        note = (
            f"decoder {v['decoder_s_per_image']:.2f} s, {v['ms_per_decoded_point']:.1f} ms per point decoded, "
            f"{v['points_decoded_share']:.0%} of points, {v['masks']} masks"
        )
        rows.append((f"  {name}", f"{v['s_per_image']:.2f} s", note))
    before, ident, fast = (r[n]["s_per_image"] for n in VARIANTS)
    rows += [
        (
            "  identical output: speed-up",
            f"{r['identical_speedup']:.2f}x",
            f"with the encoder: {(before + encoder_s) / (ident + encoder_s):.2f}x; target >= 1.5x",
        ),
        (
            "    worst best-IoU, count change",
            f"{r['identical_min_iou']:.3f}",
            f"{r['identical_count_change']:+.1%}",
        ),
        (
            "  fast mode: speed-up",
            f"{r['fast_mode_speedup']:.2f}x",
            f"with the encoder: {(before + encoder_s) / (fast + encoder_s):.2f}x; target >= 3x",
        ),
    ]
    return rows


def _curve_rows(title: str, curve: dict) -> list[tuple[str, str, str]]:
    rows = [(title, "recall", "grid points decoded, full-run masks found at IoU >= 0.9")]
    for kind, row in curve.items():
        rows.append((f"  {kind}: {row['full_masks']} masks in the full run", "", ""))
        for margin, m in row["margins"].items():
            rows.append(
                (
                    f"    fine_iou_margin {margin}",
                    _pct(m["recall_at_0.9"]),
                    f"{m['points_decoded_share']:.0%} of points, {m['found']}/{row['full_masks']}",
                )
            )
    for margin in MARGINS:
        found = sum(row["margins"][str(margin)]["found"] for row in curve.values())
        total = sum(row["full_masks"] for row in curve.values())
        share = np.mean([row["margins"][str(margin)]["points_decoded_share"] for row in curve.values()])
        rows.append(
            (
                f"  all kinds, fine_iou_margin {margin}",
                _pct(found / total if total else None),
                f"{share:.0%} of points",
            )
        )
    return rows


def _derived_rows(result: dict, margin) -> list[tuple[str, str, str]]:
    """The fast mode on a real-size model that finds masks, derived: the transformers decoder's
    time per point over the fast decoder's (both from one random-model run), divided by the
    largest share of points the fast mode decoded on any fixture kind. Two bounds for the cost of
    a point: the run where no candidate passes (no upscaling, no post-processing) and the one
    where every candidate is kept (every point upscaled, every candidate through NMS)."""
    before, context = list(VARIANTS)[:2]
    runs = {f"{p}x{p}, no candidate kept": r for p, r in result["random_real_size"].items()}
    runs["16x16, every candidate kept"] = result["random_real_size_every_candidate_kept_16"]
    rows = [(f"fast mode on a real-size model, derived (fine_iou_margin {margin})", "", "")]
    derived = {}
    for title, curve in result["fixture"].items():
        share = max(row["margins"][str(margin)]["points_decoded_share"] for row in curve.values())
        rows.append((f"  {title}: {share:.0%} of points decoded (the most of any kind)", "", ""))
        for name, r in runs.items():
            per_point = r[before]["ms_per_decoded_point"] / r[context]["ms_per_decoded_point"]
            derived[f"{title}; {name}"] = per_point / share
            rows.append(
                (f"    {name}", f"{per_point / share:.2f}x", f"per point {per_point:.2f}x; target >= 3x")
            )
    result["fast_mode_derived_speedup"] = derived
    return rows


def _pct(x) -> str:
    return "n/a (no masks)" if x is None else f"{x:.0%}"


if __name__ == "__main__":
    main()
