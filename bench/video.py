"""Video tracking: the streaming tracker beside loading every frame first (the reference examples).

A randomly initialised model of the real hiera-tiny architecture (latency and memory are real,
tracks are not), one object boxed on frame 0 of a synthetic 640x360 H.264 video, tracked forward
N frames. Each (mode, N) runs in a fresh process, so its peak RSS is its own.

- streaming: label_studio_sam2.engine.tracker.VideoTracker over label_studio_sam2.engine.frames.VideoReader (one frame decoded at a time,
  session pruned to what SAM2's memory bank reads).
- baseline: what the reference example does: decode every frame and preprocess it into one
  (N, 3, S, S) float32 tensor first, then transformers' Sam2VideoInferenceSession with the whole
  video and `propagate_in_video_iterator`, which keeps every frame's outputs.
- retrack (at the largest N only, all in one process, side by side): the first track with an
  empty embedding store (which keeps every frame's image features), a re-track with the same
  box, a re-track after a corrected keyframe (a second box halfway), and that corrected track
  without the store. Reports time per frame, the ratios, the encoder's and memory attention's
  share of the first track (timed around the modules), whether the re-tracks' boxes equal the
  tracks without stored features, and the store's bytes per frame.

    .venv/bin/python -m bench.video                          # 1024 px, 4 and 16 frames (~15 min on 2 CPU cores)
    .venv/bin/python -m bench.video --modes retrack --frames 12   # first track vs re-track only
    .venv/bin/python -m bench.video --frames 30,100,300      # the full comparison (hours on CPU, minutes on a GPU)
    .venv/bin/python -m bench.video --frames 30,100,300 --image-size 256   # memory scaling, faster

On 2 CPU cores a 1024 px frame costs ~10 s, so the default counts are small; `--image-size`
keeps the hiera-tiny architecture at a smaller input to measure how memory scales with N.
Prints a table and writes bench/results/video.json (or --out).

    .venv/bin/python -m bench.video --runtime torch openvino [--precision fp32 bf16] [--frames 8]
                                    [--repeats 1] [--busy] [--cache-dir DIR]
ENCODER_RUNTIME side by side in one run (issue 24), instead of the modes above: the streaming
tracker over N frames (default 8) per runtime and precision (default precision: CPU_PRECISION=
auto's pick), each in a fresh process (its RSS its own: after the model, after the runtime is
loaded, after the track, and the peak), one child after the other in turn
forward and backward order per round (best kept); after a warm-up track of two frames. Per
runtime: frames per second, s/frame over the second half (memory bank full), and each part's
share of the tracked time (vision encoder, memory attention, memory encoder, mask decoder, the
rest; timed around the modules): what the other parts would give converted. --busy: every child
again beside two CPU-bound processes, in the same run. OpenVINO's first start (conversion into a
new temp cache per run unless --cache-dir) runs in a child of its own before the others, which
read the cache (so their RSS is that of a server starting from the cache). Prints each figure
per runtime with OpenVINO's speed over PyTorch's at the same precision and writes bench/results/video-runtime.json (or
--out). Took 8-10 min on the shared 2-core EPYC at load 8-10 for one precision and 8 frames,
quiet only (24-26 s/frame PyTorch, 19-24 s OpenVINO, first start ~88 s); --busy doubles it,
--precision fp32 bf16 doubles it again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.click import busy_neighbours
from bench.common import (
    add_runtime_options,
    interleaved,
    machine,
    peak_rss_mb,
    rss_mb,
    runtime_precisions,
    runtime_ratio_rows,
)

RESULTS = Path(__file__).parent / "results" / "video.json"
BOX = (120.0, 100.0, 220.0, 190.0)  # the object on frame 0, pixels of the 640x360 video
VELOCITY = (1.5, 0.4)  # its motion, pixels per frame


def hiera_tiny(image_size: int):
    """sam2.1 hiera-tiny's architecture at a given input side (1024 is the released model)."""
    from transformers import Sam2VideoConfig

    from label_studio_sam2.engine.models import real_config

    if image_size == 1024:
        return real_config()
    s = image_size
    config = real_config()
    vision = config.vision_config.to_dict()
    vision["backbone_config"]["image_size"] = [s, s]
    vision["backbone_feature_sizes"] = [[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]]
    return Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config={**config.prompt_encoder_config.to_dict(), "image_size": s},
        mask_decoder_config=config.mask_decoder_config.to_dict(),
        image_size=s,
        memory_attention_rope_feat_sizes=[s // 16, s // 16],
    )


def _child(mode: str, count: int, video: str, image_size: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from label_studio_sam2.engine.models import random_model

    if mode.startswith(("runtime:", "convert:")):  # runtime|convert:<torch|openvino>:<fp32|bf16>:<cache dir>
        what, runtime, precision, cache_dir = mode.split(":", 3)
        out = _runtime_child(runtime, precision, cache_dir, count, video, image_size, what == "convert")
        return out | {"threads": threads}
    t0 = time.monotonic()
    torch.manual_seed(0)
    loaded = random_model(hiera_tiny(image_size), "video")
    load_s = time.monotonic() - t0
    if mode == "retrack":
        return _retrack(loaded, video, count) | {"image_size": image_size, "threads": threads}
    rss_model = peak_rss_mb()
    t0 = time.monotonic()
    state_mb = _streaming(loaded, video, count) if mode == "streaming" else _baseline(loaded, video, count)
    took = time.monotonic() - t0
    return {
        "mode": mode,
        "frames": count,
        "image_size": image_size,
        "threads": threads,
        "model_init_s": round(load_s, 2),
        "track_s": round(took, 2),
        "s_per_frame": round(took / count, 3),
        "rss_after_model_mb": round(rss_model, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_session_state_mb": state_mb,
    }


def _streaming(loaded, video: str, count: int) -> float:
    from label_studio_sam2.engine.frames import VideoReader
    from label_studio_sam2.engine.tracker import ObjectPrompt, VideoTracker

    peak = [0]
    with VideoReader(video) as reader:
        result = VideoTracker(loaded).track(
            reader,
            [ObjectPrompt(1, {0: BOX})],
            max_frames_each_way=count - 1,
            lost_after=None,  # a random model's presence score means nothing
            on_progress=lambda p: peak.__setitem__(0, max(peak[0], p.state_bytes)),
        )
    assert result.frames_processed == count, result.message
    return round(peak[0] / 2**20, 1)


def _retrack(loaded, video: str, count: int) -> dict:
    """First track vs re-tracks, one process, side by side (see the module's docstring)."""
    from label_studio_sam2.engine.frames import VideoReader
    from label_studio_sam2.engine.store import EmbeddingStore
    from label_studio_sam2.engine.tracker import ObjectPrompt, VideoTracker

    mid = count // 2
    dx, dy = VELOCITY[0] * mid, VELOCITY[1] * mid
    first_box = [ObjectPrompt(1, {0: BOX})]
    corrected = [ObjectPrompt(1, {0: BOX, mid: (BOX[0] + dx, BOX[1] + dy, BOX[2] + dx, BOX[3] + dy)})]
    spent = {"vision_encoder": 0.0, "memory_attention": 0.0}
    for name in spent:
        _time_module(getattr(loaded.model, name), name, spent)

    def run(tracker, objects):
        ends = []
        for key in spent:
            spent[key] = 0.0
        with VideoReader(video) as reader:
            t0 = time.monotonic()
            result = tracker.track(
                reader,
                objects,
                max_frames_each_way=count - 1 - max(objects[0].boxes),
                lost_after=None,
                on_progress=lambda p: ends.append(time.monotonic()),
            )
            took = time.monotonic() - t0
        assert result.frames_processed == count, result.message
        steps = [b - a for a, b in zip([t0, *ends], ends, strict=False)]
        late = steps[len(steps) // 2 :]  # memory bank full (7 frames) from about frame 7 on
        return result, {
            "s_per_frame": round(took / count, 3),
            "s_per_frame_second_half": round(sum(late) / len(late), 3),
            "frames_from_store": result.frames_from_store,
            "encoder_share": round(spent["vision_encoder"] / took, 3),
            "memory_attention_share": round(spent["memory_attention"] / took, 3),
        }

    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddingStore(tmp)
        plain, with_store = VideoTracker(loaded), VideoTracker(loaded, store=store)
        with VideoReader(video) as reader:  # warm-up: first-call costs out of the timings
            plain.track(reader, first_box, max_frames_each_way=0)
        first, first_t = run(with_store, first_box)
        stored_mb = store.bytes / count / 2**20
        again, again_t = run(with_store, first_box)
        fixed_plain, fixed_plain_t = run(plain, corrected)  # each ratio's two runs are adjacent
        fixed, fixed_t = run(with_store, corrected)
    return {
        "mode": "retrack",
        "frames": count,
        "first_track": first_t,
        "retrack_same_box": again_t,
        "retrack_corrected": fixed_t,
        "corrected_without_store": fixed_plain_t,
        "speedup_same_box": round(first_t["s_per_frame"] / again_t["s_per_frame"], 2),
        "speedup_corrected": round(fixed_plain_t["s_per_frame"] / fixed_t["s_per_frame"], 2),
        "speedup_second_half_corrected": round(
            fixed_plain_t["s_per_frame_second_half"] / fixed_t["s_per_frame_second_half"], 2
        ),
        "boxes_equal_same_box": again.tracks[1].boxes == first.tracks[1].boxes,
        "boxes_equal_corrected": fixed.tracks[1].boxes == fixed_plain.tracks[1].boxes,
        "store_mb_per_frame": round(stored_mb, 1),
    }


PARTS = ("vision_encoder", "memory_attention", "memory_encoder", "mask_decoder")


def _runtime_child(
    runtime: str, precision: str, cache_dir: str, count: int, video: str, image_size: int, convert_only: bool
) -> dict:
    """One runtime and precision: the streaming tracker's frames per second and per-part shares
    (convert_only: OpenVINO's first start into `cache_dir`, then nothing else)."""
    import torch

    from label_studio_sam2.engine import openvino_encoder as ove
    from label_studio_sam2.engine.frames import VideoReader
    from label_studio_sam2.engine.models import random_model, use_encoder_runtime
    from label_studio_sam2.engine.tracker import ObjectPrompt, VideoTracker

    torch.manual_seed(0)  # the same weights in every child: one conversion per precision
    loaded = random_model(hiera_tiny(image_size), "video", cpu_precision=precision)
    out: dict = {"runtime": runtime, "precision": precision, "frames": count, "image_size": image_size}
    out["rss_after_model_mb"] = round(rss_mb())
    torch_encoder = loaded.model.vision_encoder
    if runtime == "openvino":
        before, t0 = ove.conversions, time.perf_counter()
        use_encoder_runtime(loaded, "openvino", cache_dir)
        out["load_s"] = round(time.perf_counter() - t0, 2)
        out["converted"] = ove.conversions - before
        if loaded.encoder_runtime != "openvino":
            return out | {"error": "OpenVINO did not load (see the warning above)"}
        if loaded.model.vision_encoder is torch_encoder:
            return out | {
                "error": "the engine keeps the video model's vision_encoder in PyTorch: the tracker "
                "would not run OpenVINO (needs use_encoder_runtime to replace model.vision_encoder)"
            }
    out["engine_precision"] = loaded.precision
    out["encoder_module"] = type(loaded.model.vision_encoder).__name__
    out["rss_after_runtime_mb"] = round(rss_mb())
    if convert_only:
        return out | {"peak_rss_mb": round(peak_rss_mb())}
    spent = dict.fromkeys(PARTS, 0.0)
    dtypes: set[str] = set()
    for name in PARTS:
        _time_module(getattr(loaded.model, name), name, spent)
    loaded.model.vision_encoder.register_forward_hook(
        lambda m, a, o: (
            dtypes.add(str(o.fpn_hidden_states[0].dtype).removeprefix("torch."))
            if getattr(o, "fpn_hidden_states", None)
            else None
        )
    )
    box = [ObjectPrompt(1, {0: BOX})]
    tracker = VideoTracker(loaded)
    with VideoReader(video) as reader:  # warm-up: first-call costs, memory attention included
        tracker.track(reader, box, max_frames_each_way=1, lost_after=None)
    for name in spent:
        spent[name] = 0.0
    ends: list[float] = []
    with VideoReader(video) as reader:
        t0 = time.perf_counter()
        result = tracker.track(
            reader,
            box,
            max_frames_each_way=count - 1,
            lost_after=None,  # a random model's presence score means nothing
            on_progress=lambda p: ends.append(time.perf_counter()),
        )
        took = time.perf_counter() - t0
    assert result.frames_processed == count, result.message
    steps = [b - a for a, b in zip([t0, *ends], ends, strict=False)]
    late = steps[len(steps) // 2 :] or steps
    shares = {name: round(spent[name] / took, 3) for name in PARTS}
    shares["rest"] = round(1 - sum(shares.values()), 3)
    return out | {
        "track_s": round(took, 2),
        "frames_per_s": round(count / took, 4),
        "s_per_frame": round(took / count, 3),
        "s_per_frame_second_half": round(sum(late) / len(late), 3) if late else None,
        "shares": shares,
        "encoder_output_dtype": ",".join(sorted(dtypes)),
        "rss_after_track_mb": round(rss_mb()),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def _runtimes(args, video: str, counts: list[int]) -> dict:
    """The children of a runtime comparison, quiet (and busy), in turn forward and backward order."""
    count = max(counts)
    precisions = runtime_precisions(args.precision)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="ov-cache-")
    pairs = [(rt, pr) for pr in precisions for rt in args.runtime]
    variants = {
        (rt, pr): {"runtime": rt, "precision": pr, "name": f"{rt} {pr}", "runs": {}} for rt, pr in pairs
    }

    def child(mode: str, frames: int) -> dict:
        cmd = [sys.executable, "-m", "bench.video", "--child", mode, str(frames), "--video", video]
        cmd += ["--image-size", str(args.image_size), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{mode.rsplit(':', 1)[0]} with {frames} frames failed")
        return json.loads(out.stdout.strip().splitlines()[-1])

    # OpenVINO's first start in a child of its own: the timed children read the cache, so their
    # RSS is a server's that starts from the cache (a conversion leaves ~1.5 GB more behind)
    for (rt, pr), v in variants.items():
        if rt == "openvino":
            v["first_start"] = first = child(f"convert:{rt}:{pr}:{cache}", 0)
            if "error" in first:
                v["error"] = first["error"]
                print(f"{v['name']}: {first['error']}", flush=True)
    loads = {}
    for phase in ["quiet", "busy"] if args.busy else ["quiet"]:
        neighbours = busy_neighbours(2) if phase == "busy" else []
        try:
            for r in range(args.repeats):
                for rt, pr in interleaved(pairs, r):
                    v = variants[(rt, pr)]
                    if "error" in v:
                        continue
                    run = child(f"runtime:{rt}:{pr}:{cache}", count)
                    v["runs"].setdefault(phase, []).append(run)
                    if "error" in run:
                        v["error"] = run["error"]
                        print(f"{v['name']}: {run['error']}", flush=True)
                        continue
                    best = min(v["runs"][phase], key=lambda x: x["s_per_frame"])
                    f = v.setdefault("figures", {})
                    f[f"fps_{phase}"] = best["frames_per_s"]
                    f[f"s_per_frame_second_half_{phase}"] = best["s_per_frame_second_half"]
                    shares = ", ".join(
                        f"{k.replace('_', ' ')} {100 * x:.0f}%" for k, x in run["shares"].items()
                    )
                    print(
                        f"{phase} {v['name']}: {run['frames_per_s']:.3f} frames/s ({run['s_per_frame']:.2f} s/frame); "
                        f"shares {shares}; RSS {run['rss_after_track_mb']} MB, peak {run['peak_rss_mb']} MB",
                        flush=True,
                    )
            loads[phase] = machine()[1]
        finally:
            for proc in neighbours:
                proc.terminate()
    return {"frames": count, "load_at_end_of": loads, "cache_dir": cache, "variants": list(variants.values())}


def _runtime_report(r: dict, model: str) -> None:
    variants = [v for v in r["variants"] if "error" not in v]
    for v in r["variants"]:
        if "error" in v:
            print(f"{v['name']}: failed: {v['error']}")
    print()
    print(
        f"| {r['frames']} frames, one object | phase | frames/s | s/frame | s/frame, 2nd half | "
        "encoder | memory attention | memory encoder | mask decoder | rest | RSS after track MB | peak RSS MB |"
        f"  ({model})"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        for phase, runs in v["runs"].items():
            b = min(runs, key=lambda x: x["s_per_frame"])
            sh = b["shares"]
            print(
                f"| {v['name']} | {phase} | {b['frames_per_s']:.3f} | {b['s_per_frame']:.2f} | "
                f"{b['s_per_frame_second_half']:.2f} | "
                + " | ".join(f"{100 * sh[k]:.0f} %" for k in (*PARTS, "rest"))
                + f" | {b['rss_after_track_mb']} | {b['peak_rss_mb']} |"
            )
    for v in variants:
        first = v["runs"].get("quiet", [{}])[0]
        if "first_start" in v:
            f = v["first_start"]
            what = f"{f['converted']} conversion(s) + compile" if f["converted"] else "from the cache"
            print(
                f"{v['name']}: first start {f['load_s']:.1f} s ({what}; a child of its own, peak RSS "
                f"{f['peak_rss_mb']} MB); the timed children loaded it from the cache in {first.get('load_s')} s",
                end="",
            )
            print(f"; engine: {first.get('engine_precision')}, encoder module {first.get('encoder_module')}")
        else:
            print(
                f"{v['name']}: engine: {first.get('engine_precision')}, encoder output {first.get('encoder_output_dtype')}"
            )
    for v in variants:
        first = v["runs"].get("quiet", [{}])[0]
        if (
            v["runtime"] == "torch"
            and v["precision"] == "bf16"
            and first.get("encoder_output_dtype") == "float32"
        ):
            print(
                "note: PyTorch's video encoder ran in fp32 although bf16 was asked (the tracker applies no "
                "CPU_PRECISION autocast): the bf16 ratios compare torch fp32 with OpenVINO bf16"
            )
    figures = []
    for phase in r["load_at_end_of"]:
        figures += [
            (f"fps_{phase}", f"video frames per second, {phase}", "frames/s", True),
            (f"s_per_frame_second_half_{phase}", f"s/frame, memory full (2nd half), {phase}", "s", False),
        ]
    rows, r["openvino_over_torch_speed"] = runtime_ratio_rows(variants, figures)
    for label, value, note in rows:
        print(f"{label}: {value}  {note}")


def _time_module(module, name: str, spent: dict) -> None:
    started = {}
    module.register_forward_pre_hook(lambda *a: started.__setitem__(name, time.monotonic()))
    module.register_forward_hook(
        lambda *a: spent.__setitem__(name, spent[name] + time.monotonic() - started[name])
    )


def _baseline(loaded, video: str, count: int) -> None:
    """Returns None: the session holds everything, there is no state size worth tracking."""
    import torch
    from transformers import Sam2VideoInferenceSession

    from label_studio_sam2.engine.frames import VideoReader
    from label_studio_sam2.engine.transforms import preprocess, to_model_coords, upscale_logits

    model, s = loaded.model, loaded.image_size
    with VideoReader(video) as reader:
        hw = (reader.height, reader.width)
        pixels = torch.empty(count, 3, s, s)  # filled in place: no second copy while stacking
        for i, rgb in reader.frames(range(count)):
            pixels[i] = preprocess(rgb, s)[0]
    session = Sam2VideoInferenceSession(
        video=pixels, video_height=hw[0], video_width=hw[1], dtype=torch.float32
    )
    del pixels
    corners = torch.as_tensor(to_model_coords([[BOX[0], BOX[1]], [BOX[2], BOX[3]]], hw, s)).view(1, 1, 2, 2)
    obj_idx = session.obj_id_to_idx(1)
    session.add_point_inputs(obj_idx, 0, {"point_coords": corners, "point_labels": torch.tensor([[[2, 3]]])})
    session.obj_with_new_inputs = [1]
    with torch.inference_mode():
        model(inference_session=session, frame_idx=0)
        seen = 0
        for out in model.propagate_in_video_iterator(
            session, start_frame_idx=0, max_frame_num_to_track=count - 1
        ):
            mask = upscale_logits(out.pred_masks[:, 0], hw) > 0
            seen += int(mask.shape[0] == 1)  # (the streaming tracker turns this into a box)
    assert seen == count, seen


def _video(path: str, frames: int, width: int, height: int) -> str:
    from devkit.videos import Shape, moving_shapes, write_video

    shapes = [Shape((230, 40, 40), BOX, VELOCITY), Shape((40, 60, 230), (420, 200, 520, 300), (-1.0, -0.2))]
    return write_video(path, moving_shapes(frames, height, width, shapes), fps=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--frames", default=None, help="comma-separated frame counts (default 4,16; with --runtime 8)"
    )
    p.add_argument(
        "--image-size", type=int, default=1024, help="model input side (default 1024, the real one)"
    )
    p.add_argument("--modes", default="streaming,baseline,retrack")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--repeats", type=int, default=1, help="with --runtime: rounds (best kept)")
    p.add_argument("--out", default=None, help="default bench/results/video.json (video-runtime.json)")
    add_runtime_options(p)
    p.add_argument("--child", nargs=2, metavar=("MODE", "FRAMES"), help=argparse.SUPPRESS)
    p.add_argument("--video", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        mode, count = args.child[0], int(args.child[1])
        print(json.dumps(_child(mode, count, args.video, args.image_size, args.threads)), flush=True)
        return

    cpu, load_before = machine()
    counts = [int(c) for c in (args.frames or ("8" if args.runtime else "4,16")).split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    args.out = args.out or str(RESULTS.with_name("video-runtime.json") if args.runtime else RESULTS)
    if args.busy and not args.runtime:
        p.error("--busy needs --runtime")
    model = f"random-init sam2.1 hiera-tiny, {args.image_size} px input, CPU, {args.threads} threads"
    if args.runtime:
        with tempfile.TemporaryDirectory() as tmp:
            video = _video(os.path.join(tmp, "bench.mp4"), max(counts) + 1, args.width, args.height)
            r = _runtimes(args, video, counts)
        r = {
            "command": "python -m bench.video " + " ".join(sys.argv[1:]),
            "cpu": cpu,
            "load_average_before": load_before,
            "video": f"{args.width}x{args.height} H.264, one object",
            "model": model,
        } | r
        print(f"{cpu}; load average {load_before} before, at the end of: {r['load_at_end_of']}")
        _runtime_report(r, model)
        _write(r, args.out)
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        video = _video(os.path.join(tmp, "bench.mp4"), max(counts), args.width, args.height)
        retrack = None
        for mode in modes:
            for count in [max(counts)] if mode == "retrack" else counts:
                cmd = [sys.executable, "-m", "bench.video", "--child", mode, str(count), "--video", video]
                cmd += ["--image-size", str(args.image_size), "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{mode} with {count} frames failed")
                run = json.loads(out.stdout.strip().splitlines()[-1])
                if mode == "retrack":
                    retrack = run
                    print(f"  retrack {count:>4} frames: {run['speedup_corrected']:.2f}x", flush=True)
                    continue
                runs.append(run)
                print(
                    f"{mode:>9} {count:>4} frames: {run['s_per_frame']:.2f} s/frame, "
                    f"peak RSS {run['peak_rss_mb']:.0f} MB",
                    flush=True,
                )

    report = {
        "command": "python -m bench.video " + " ".join(sys.argv[1:]),
        "cpu": cpu,
        "load_average_before": load_before,
        "load_average_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "video": f"{args.width}x{args.height} H.264, one object",
        "model": f"random-init sam2.1 hiera-tiny, {args.image_size} px input, CPU fp32, {args.threads} threads",
        "runs": runs,
        "peak_rss_ratio_largest_over_smallest": {
            mode: round(
                max(r["peak_rss_mb"] for r in runs if r["mode"] == mode)
                / min(r["peak_rss_mb"] for r in runs if r["mode"] == mode),
                3,
            )
            for mode in modes
            if mode != "retrack"
        },
        "retrack": retrack,
    }
    print(f"{cpu}; load average {load_before} before, {report['load_average_after']} after")
    if retrack is not None:
        _print_retrack(retrack, report["model"])
    if not runs:
        _write(report, args.out)
        return
    print()
    print(
        f"| mode | frames | s/frame | peak RSS MB | RSS over model MB | session state MB |  ({report['model']})"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in runs:
        state = r["peak_session_state_mb"] if r["peak_session_state_mb"] is not None else "-"
        print(
            f"| {r['mode']} | {r['frames']} | {r['s_per_frame']:.2f} | {r['peak_rss_mb']:.0f} "
            f"| {r['peak_rss_mb'] - r['rss_after_model_mb']:.0f} | {state} |"
        )
    for mode, ratio in report["peak_rss_ratio_largest_over_smallest"].items():
        print(f"{mode}: peak RSS at {max(counts)} frames / at {min(counts)} frames = {ratio:.2f}")
    _write(report, args.out)


def _print_retrack(r: dict, model: str) -> None:
    print()
    print(
        f"| {r['frames']} frames, one object | s/frame | s/frame, 2nd half | from the store | encoder | memory attention |  ({model})"
    )
    print("|---|---:|---:|---:|---:|---:|")
    rows = [
        ("first track (store empty, writes)", "first_track"),
        ("re-track, same box", "retrack_same_box"),
        ("re-track after a corrected keyframe", "retrack_corrected"),
        ("the corrected track without the store", "corrected_without_store"),
    ]
    for label, key in rows:
        t = r[key]
        print(
            f"| {label} | {t['s_per_frame']:.2f} | {t['s_per_frame_second_half']:.2f} | {t['frames_from_store']} "
            f"| {100 * t['encoder_share']:.0f} % | {100 * t['memory_attention_share']:.0f} % |"
        )
    print(
        f"re-track speed-up: same box {r['speedup_same_box']:.2f}x, after a correction "
        f"{r['speedup_corrected']:.2f}x ({r['speedup_second_half_corrected']:.2f}x on the second half, "
        f"memory full); boxes equal to the tracks without stored features: "
        f"{r['boxes_equal_same_box'] and r['boxes_equal_corrected']}; store {r['store_mb_per_frame']} MB per frame"
    )


def _write(report: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
