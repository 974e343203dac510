"""SAM2's parts beyond the image encoder on OpenVINO: per part, PyTorch vs OpenVINO side by side.

A randomly initialised model of the real sam2.1 hiera-tiny architecture at 1024 px (speed does not
depend on the weights), one process, 2 torch threads and 2 OpenVINO threads. Per part, at the
shapes the product calls it with:

- memory attention (video, per frame after the first): 4096 query tokens over a memory bank of 1, 4
  and 7 frames (x 4096 tokens of 64) plus that many object pointers (4 tokens each); converted once
  with the bank's length dynamic (one compiled model serves every size), so each size's first call
  is timed too;
- the memory encoder (video, per frame): the 64x64x256 features and a 1024x1024 mask;
- the mask decoder on the automatic-mask grid's batch (automask.py: 64 single-point prompts, three
  candidates each, AutoMaskConfig.points_per_batch): the project's fast decoder
  (label_studio_sam2/engine/mask_decoder.py, what automask runs today) and transformers'
  Sam2MaskDecoder in PyTorch, and that transformers decoder converted (prompt count dynamic);
- with --parts memory_attention_static: a full bank (7 frames) at f32, the dynamic conversion
  beside one converted for exactly that shape.

Runtimes: PyTorch fp32 (what the CPU runs today: the video model has no autocast), PyTorch bf16
autocast (for reference), OpenVINO with INFERENCE_PRECISION_HINT f32 and bf16. Each figure is the
best of --repeats calls after one warm-up, the runtimes interleaved call by call (a neighbour's
load hits them alike). Each OpenVINO output's rel-L2 against PyTorch fp32 is reported.
With --track N, a track of N frames (hooks around each module) gives each part's share of a
frame, and the frame time each conversion would give.

    .venv/bin/python -m bench.ovparts [--repeats 3] [--track 8] [--parts memory_attention,...]

Prints a table and writes bench/results/ovparts.json (or --out). What the figures decided (none
is converted in the product): bench/ovparts_io.py and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import machine, rss_mb
from bench.common import rel_l2 as _rel

RESULTS = Path(__file__).parent / "results" / "ovparts.json"
PRECISIONS = ("f32", "bf16")


def _interleaved(fns: dict, repeats: int) -> dict:
    """Best-of-`repeats` seconds per named callable after one warm-up each, calls interleaved."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: round(min(v), 4) for k, v in times.items()}


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _converted(module, example, shapes, threads) -> tuple[dict, dict]:
    """Convert once, compile per precision; (compiled by precision, costs in seconds)."""
    from bench import ovparts_io as op

    t0 = time.perf_counter()
    ov_model = op.convert(module, example, shapes)
    costs = {"convert_s": round(time.perf_counter() - t0, 2)}
    compiled = {}
    for p in PRECISIONS:
        t0 = time.perf_counter()
        compiled[p] = op.compile_cpu(ov_model, p, threads)
        costs[f"compile_{p}_s"] = round(time.perf_counter() - t0, 2)
    return compiled, costs


def memory_attention(video, repeats: int, threads: int, frames=(1, 4, 7)) -> dict:
    from bench import ovparts_io as op

    cfg = video.config
    io = op.MemoryAttentionIO(video.memory_attention).eval()
    compiled, costs = _converted(
        io, op.memory_attention_example(cfg, 2, 2), op.memory_attention_shapes(cfg), threads
    )
    rows = []
    for n in frames:
        x = op.memory_attention_example(cfg, n, n)
        with torch.inference_mode():
            ref = io(*x)
            with _bf16():
                rel_torch_bf16 = _rel(io(*x), ref)
        first = {}
        rels = {}
        for p in PRECISIONS:
            t0 = time.perf_counter()
            out = op.infer(compiled[p], list(x))[0]
            first[p] = round(time.perf_counter() - t0, 3)  # the first call at this shape
            rels[p] = _rel(out, ref)

        def torch_fp32(x=x):
            with torch.inference_mode():
                io(*x)

        def torch_bf16(x=x):
            with torch.inference_mode(), _bf16():
                io(*x)

        fns = {"torch_fp32": torch_fp32, "torch_bf16": torch_bf16}
        fns |= {f"ov_{p}": (lambda p=p, x=x: op.infer(compiled[p], list(x))) for p in PRECISIONS}
        t = _interleaved(fns, repeats)
        rows.append(
            {
                "memory_frames": n,
                "object_pointers": n,
                "memory_tokens": int(x[2].shape[0] + x[4].shape[0]),
                "s": t,
                "ov_first_call_at_this_shape_s": first,
                "rel_l2_vs_torch_fp32": {"torch_bf16": rel_torch_bf16}
                | {f"ov_{p}": rels[p] for p in PRECISIONS},
                "gain_f32": round(t["torch_fp32"] / t["ov_f32"], 2),
                "gain_bf16_vs_torch_fp32": round(t["torch_fp32"] / t["ov_bf16"], 2),
                "gain_bf16_vs_torch_bf16": round(t["torch_bf16"] / t["ov_bf16"], 2),
            }
        )
        print(f"memory attention, {n} frame(s): {t}", flush=True)
    return {"part": "memory_attention", "conversion": costs, "rows": rows}


def memory_attention_static(video, repeats: int, threads: int, frames: int = 7) -> dict:
    """A full memory bank at f32: the dynamic-shape conversion beside one converted for exactly
    this shape (the tracker would need one per bank size and pointer count)."""
    from bench import ovparts_io as op

    cfg = video.config
    io = op.MemoryAttentionIO(video.memory_attention).eval()
    x = op.memory_attention_example(cfg, frames, frames)
    t0 = time.perf_counter()
    dynamic = op.compile_cpu(
        op.convert(io, op.memory_attention_example(cfg, 2, 2), op.memory_attention_shapes(cfg)),
        "f32",
        threads,
    )
    costs = {"dynamic_convert_compile_s": round(time.perf_counter() - t0, 1)}
    t0 = time.perf_counter()
    static = op.compile_cpu(op.convert(io, x, [list(t.shape) for t in x]), "f32", threads)
    costs["static_convert_compile_s"] = round(time.perf_counter() - t0, 1)

    def torch_fp32():
        with torch.inference_mode():
            io(*x)

    fns = {
        "torch_fp32": torch_fp32,
        "ov_f32_dynamic": lambda: op.infer(dynamic, list(x)),
        "ov_f32_static": lambda: op.infer(static, list(x)),
    }
    t = _interleaved(fns, repeats)
    print(f"memory attention, {frames} frames, dynamic vs static: {t}", flush=True)
    return {"part": "memory_attention_static", "memory_frames": frames, "conversion": costs, "s": t}


def memory_encoder(video, repeats: int, threads: int) -> dict:
    from bench import ovparts_io as op

    cfg = video.config
    io = op.MemoryEncoderIO(video.memory_encoder).eval()
    g = torch.Generator().manual_seed(1)
    h = cfg.memory_attention_rope_feat_sizes[0]
    s = int(cfg.image_size)
    x = (
        torch.randn(1, cfg.memory_encoder_hidden_size, h, h, generator=g),
        torch.randn(1, 1, s, s, generator=g),
    )
    compiled, costs = _converted(io, x, [list(t.shape) for t in x], threads)
    with torch.inference_mode():
        ref = io(*x)
        with _bf16():
            rel_bf16 = _rel(io(*x)[0], ref[0])
    rels = {f"ov_{p}": _rel(op.infer(compiled[p], list(x))[0], ref[0]) for p in PRECISIONS}

    def torch_fp32():
        with torch.inference_mode():
            io(*x)

    def torch_bf16():
        with torch.inference_mode(), _bf16():
            io(*x)

    fns = {"torch_fp32": torch_fp32, "torch_bf16": torch_bf16}
    fns |= {f"ov_{p}": (lambda p=p: op.infer(compiled[p], list(x))) for p in PRECISIONS}
    t = _interleaved(fns, repeats)
    print(f"memory encoder: {t}", flush=True)
    return {
        "part": "memory_encoder",
        "conversion": costs,
        "rows": [
            {
                "s": t,
                "rel_l2_vs_torch_fp32": {"torch_bf16": rel_bf16} | rels,
                "gain_f32": round(t["torch_fp32"] / t["ov_f32"], 2),
                "gain_bf16_vs_torch_fp32": round(t["torch_fp32"] / t["ov_bf16"], 2),
                "gain_bf16_vs_torch_bf16": round(t["torch_bf16"] / t["ov_bf16"], 2),
            }
        ],
    }


def mask_decoder(image_model, repeats: int, threads: int, batch: int = 64) -> dict:
    """The automatic-mask grid's decoder call: `batch` single positive points, three candidates."""
    from bench import ovparts_io as op
    from label_studio_sam2.engine.image import ImagePredictor
    from label_studio_sam2.engine.mask_decoder import DecoderContext, decode

    model = image_model.model
    predictor = ImagePredictor(image_model)
    rgb = np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8)
    emb = predictor.embedding("bench", rgb)
    feats = [f.float() for f in emb.features]
    ctx = DecoderContext.of(model, feats)
    pts = torch.rand(1, batch, 1, 2) * 1024
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(
            input_points=pts,
            input_labels=torch.ones(1, batch, 1, dtype=torch.long),
            input_boxes=None,
            input_masks=None,
        )
        image_pe = model.get_image_wide_positional_embeddings()
    io = op.MaskDecoderIO(model.mask_decoder, multimask_output=True).eval()
    x = (feats[2], image_pe, sparse, dense, feats[0], feats[1])
    shapes = [list(t.shape) for t in x]
    shapes[2] = [1, -1, -1, sparse.shape[-1]]  # prompts per call, tokens per prompt
    small = (feats[2], image_pe, sparse[:, :5], dense, feats[0], feats[1])
    compiled, costs = _converted(io, small, shapes, threads)
    with torch.inference_mode():
        ref = io(*x)
        fast = decode(model, ctx, sparse, None, True)
        with _bf16():
            rel_bf16 = _rel(io(*x)[0], ref[0])
    rels = {f"ov_{p}": _rel(op.infer(compiled[p], list(x))[0], ref[0]) for p in PRECISIONS}

    def fast_fp32():
        with torch.inference_mode():
            decode(model, ctx, sparse, None, True)

    def hf_fp32():
        with torch.inference_mode():
            io(*x)

    def hf_bf16():
        with torch.inference_mode(), _bf16():
            io(*x)

    fns = {"torch_fp32": fast_fp32, "torch_transformers_fp32": hf_fp32, "torch_bf16": hf_bf16}
    fns |= {f"ov_{p}": (lambda p=p: op.infer(compiled[p], list(x))) for p in PRECISIONS}
    t = _interleaved(fns, repeats)
    print(f"mask decoder, {batch} points: {t}", flush=True)
    return {
        "part": "mask_decoder",
        "conversion": costs,
        "rows": [
            {
                "points_per_batch": batch,
                "s": t,
                "rel_l2_vs_torch_fp32": {"fast_decoder": _rel(fast[0], ref[0]), "torch_bf16": rel_bf16}
                | rels,
                "gain_f32": round(t["torch_fp32"] / t["ov_f32"], 2),
                "gain_bf16_vs_torch_fp32": round(t["torch_fp32"] / t["ov_bf16"], 2),
                "gain_bf16_vs_torch_bf16": round(t["torch_bf16"] / t["ov_bf16"], 2),
            }
        ],
        "note": "torch_fp32 is the project's fast decoder (what automask runs); torch_bf16 autocasts transformers' decoder",
    }


def track_shares(video_loaded, frames: int) -> dict:
    """A track of `frames` frames of a synthetic video: each module's share of the time."""
    from bench.video import BOX, _time_module, _video
    from label_studio_sam2.engine.frames import VideoReader
    from label_studio_sam2.engine.tracker import ObjectPrompt, VideoTracker

    model = video_loaded.model
    parts = ("vision_encoder", "memory_attention", "memory_encoder", "mask_decoder")
    spent = dict.fromkeys(parts, 0.0)
    for name in parts:
        _time_module(getattr(model, name), name, spent)
    with tempfile.TemporaryDirectory() as tmp:
        video = _video(os.path.join(tmp, "v.mp4"), frames, 640, 360)
        tracker = VideoTracker(video_loaded)
        with VideoReader(video) as reader:
            for k in spent:
                spent[k] = 0.0
            t0 = time.perf_counter()
            result = tracker.track(
                reader, [ObjectPrompt(1, {0: BOX})], max_frames_each_way=frames - 1, lost_after=None
            )
            took = time.perf_counter() - t0
    assert result.frames_processed == frames, result.message
    return {
        "frames": frames,
        "s_per_frame": round(took / frames, 3),
        "s_per_frame_by_part": {k: round(v / frames, 3) for k, v in spent.items()},
        "share": {k: round(v / took, 3) for k, v in spent.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--track", type=int, default=8, help="frames of a track for each part's share (0: skip)")
    p.add_argument("--parts", default="memory_attention,memory_encoder,mask_decoder")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import openvino as ov

    from label_studio_sam2.engine.models import random_model, real_config

    cpu, load_before = machine()
    torch.manual_seed(0)
    video = random_model(real_config(), "video")
    parts = [s.strip() for s in args.parts.split(",")]
    results = []
    for part in parts:
        if part == "memory_attention":
            results.append(memory_attention(video.model, args.repeats, args.threads))
        elif part == "memory_attention_static":
            results.append(memory_attention_static(video.model, args.repeats, args.threads))
        elif part == "memory_encoder":
            results.append(memory_encoder(video.model, args.repeats, args.threads))
        elif part == "mask_decoder":
            torch.manual_seed(0)
            results.append(mask_decoder(random_model(real_config(), "image"), args.repeats, args.threads))
        else:
            raise SystemExit(f"unknown part {part!r}")
    shares = track_shares(video, args.track) if args.track else None
    report = {
        "command": "python -m bench.ovparts " + " ".join(os.sys.argv[1:]),
        "cpu": cpu,
        "load_average_before": load_before,
        "load_average_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "model": "random-init sam2.1 hiera-tiny (real architecture), 1024 px",
        "threads": args.threads,
        "openvino": ov.__version__,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "parts": results,
        "track": shares,
        "rss_mb_end": round(rss_mb()),
    }
    _print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


def _print(r: dict) -> None:
    print(
        f"\n{r['model']}; {r['cpu']}; {r['threads']} threads; load {r['load_average_before']} before, "
        f"{r['load_average_after']} after; OpenVINO {r['openvino']}, torch {r['torch']}"
    )
    print(
        "| part | shape | torch fp32 s | torch bf16 s | OV f32 s | OV bf16 s | OV f32 gain | OV bf16 gain (vs torch fp32 / bf16) | rel-L2 OV f32 / bf16 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for part in r["parts"]:
        if "rows" not in part:
            print(f"  {part['part']}: {part['s']}; {part['conversion']}")
            continue
        for row in part["rows"]:
            shape = (
                f"{row['memory_frames']} frame(s) + {row['object_pointers']} ptrs ({row['memory_tokens']} tokens)"
                if "memory_frames" in row
                else f"{row['points_per_batch']} points"
                if "points_per_batch" in row
                else "1 frame"
            )
            s, rel = row["s"], row["rel_l2_vs_torch_fp32"]
            print(
                f"| {part['part']} | {shape} | {s['torch_fp32']:.3f} | {s['torch_bf16']:.3f} | {s['ov_f32']:.3f} "
                f"| {s['ov_bf16']:.3f} | {row['gain_f32']:.2f}x | {row['gain_bf16_vs_torch_fp32']:.2f}x / "
                f"{row['gain_bf16_vs_torch_bf16']:.2f}x | {rel['ov_f32']:.1e} / {rel['ov_bf16']:.1e} |"
            )
        print(f"  {part['part']} conversion: {part['conversion']}")
    t = r["track"]
    if t:
        print(
            f"\ntrack of {t['frames']} frames, torch fp32: {t['s_per_frame']:.2f} s/frame; per part "
            + ", ".join(
                f"{k} {v:.2f} s ({100 * t['share'][k]:.0f} %)" for k, v in t["s_per_frame_by_part"].items()
            )
        )


if __name__ == "__main__":
    main()
