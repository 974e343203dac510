"""Agreement with Meta's own SAM2 (facebookresearch/sam2) on identical weights.

Builds Meta's SAM2.1 hiera-tiny from its config with random weights (fixed seed; parameters Meta
initialises to a constant, zeros or ones, get small random values so that they matter), saves
`{"model": state_dict}`, converts it with our converter (`label-studio-sam2 convert`), and
compares at 1024 px:

- images: Meta's `SAM2ImagePredictor` against our `ImagePredictor` with the image encoder on
  (a) PyTorch fp32, (b) OpenVINO f32, (c) OpenVINO bf16, (d) PyTorch bf16 autocast (reference):
  the encoder's three feature levels (relative L2 against Meta's), and the masks' IoU for point
  and box prompts (one point: Meta's multimask_output=True, the best candidate by predicted IoU,
  as ours picks; several points or a box: multimask_output=False). Prompts are fed in Meta's
  convention (coordinates as pixel indices: ours get c + 0.5 * W / S, see SAM2.md), so only
  numerics differ. An IoU counts only where Meta's mask is neither empty nor nearly full.
- video (--video): Meta's `SAM2VideoPredictor` on a short synthetic clip (devkit/videos.py
  `crossing_clip`, written to JPEG frames as Meta's loader reads them) against our `VideoTracker`
  with the video model sharing the image model's encoder (on OpenVINO where it runs): per frame,
  is our box between the box of Meta's largest mask piece and the box of Meta's whole mask?

Meta's code is not a dependency of this project. Set it up in scratch directories, never in .venv:

    # its snapshot (git clone https://github.com/facebookresearch/sam2, or an archive of it)
    git clone --depth 1 https://github.com/facebookresearch/sam2 /tmp/meta-sam2
    .venv/bin/pip install --no-deps --target /tmp/metapkgs hydra-core omegaconf iopath \\
        antlr4-python3-runtime==4.9.3 portalocker torchvision==0.28.0   # torchvision of torch 2.13
    PYTHONPATH=/tmp/meta-sam2:/tmp/metapkgs .venv/bin/python tools/meta_agreement.py --video

hydra 1.3 needs antlr4-python3-runtime 4.9 (a newer one fails with "Could not deserialize ATN").
PyPI's torchvision is a CUDA build: beside the CPU build of torch its ops do not load and `import
torchvision` fails ("operator torchvision::nms does not exist"). Install torchvision==0.28.0 from
https://download.pytorch.org/whl/cpu instead, or, where only PyPI is reachable, make the scratch
copy's `torchvision/__init__.py` skip its op registrations (Meta's predictors use only
`torchvision.transforms`, which is plain torch; the automatic mask generator's NMS is not used).

Writes bench/results/meta_agreement.json (or --out) and prints a table. Exits 2 with a message when
Meta's `sam2` cannot be imported, 1 when an agreement bound fails (--check).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "meta_agreement.json"
META_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
MIN_IOU = 0.98  # issue 24: min image IoU against Meta on identical weights
# a mask counts for IoU only when it covers more than this share of the image, and less than 1 - it
TRIVIAL = 0.002


def meta_modules():
    """Meta's `sam2` modules, imported by name (not a dependency of this project), or exit 2."""
    try:
        build = importlib.import_module("sam2.build_sam")
        image = importlib.import_module("sam2.sam2_image_predictor")
    except Exception as e:  # ImportError, or hydra failing on an antlr4 other than 4.9
        print(
            f"tools/meta_agreement.py: Meta's sam2 is not importable ({type(e).__name__}: {e}).\n"
            "Put facebookresearch/sam2 and its dependencies (hydra-core, omegaconf, iopath, "
            "torchvision; antlr4-python3-runtime==4.9.3 for hydra) on PYTHONPATH, see this script's docstring.",
            file=sys.stderr,
        )
        sys.exit(2)
    if not hasattr(build, "build_sam2"):
        sys.exit(f"tools/meta_agreement.py: {build.__file__} is not Meta's sam2 (no build_sam2)")
    return build, image


# --- weights ------------------------------------------------------------------------------------


def meta_checkpoint(build, image_mod, out: Path, seed: int, centre: bool) -> tuple[torch.nn.Module, dict]:
    """Meta's hiera-tiny, randomly initialised, saved to `out` as Meta's checkpoints are.

    centre: random weights give masks over most of the image (the upscaled mask embedding has a
    positive mean, and the hypernetworks' outputs a component along it). Projecting that direction
    out of the hypernetworks' last layers (measured on the first test image) centres the mask
    logits at 0: masks over about 40 % of the image, a stricter test of the IoU."""
    torch.manual_seed(seed)
    model = build.build_sam2(META_CONFIG, ckpt_path=None, device="cpu", mode="eval")
    gen = torch.Generator().manual_seed(seed + 1)
    perturbed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().flatten()
            if p.numel() and bool((flat == flat[0]).all()):  # zeros (biases, pos_embed) or ones
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
                perturbed.append(name)
    info = {"constant_params_perturbed": len(perturbed), "examples": perturbed[:8], "decoder_centred": centre}
    if centre:
        decoder = model.sam_mask_decoder
        seen = {}
        hook = decoder.output_upscaling[-1].register_forward_hook(lambda m, i, o: seen.setdefault("up", o))
        _, rgb = test_images(seed)[0]
        predictor = image_mod.SAM2ImagePredictor(model)
        h, w = rgb.shape[:2]
        with torch.inference_mode():
            predictor.set_image(rgb)
            predictor.predict(point_coords=np.array([[w / 2, h / 2]]), point_labels=np.array([1]))
        hook.remove()
        mean = seen["up"].float().mean(dim=(0, 2, 3))
        u = mean / mean.norm()
        with torch.no_grad():
            for mlp in decoder.output_hypernetworks_mlps:
                last = mlp.layers[-1]
                last.weight -= torch.outer(u, u @ last.weight)
                last.bias -= u * (u @ last.bias)
    torch.save({"model": model.state_dict()}, out)
    return model, info


# --- images and prompts ---------------------------------------------------------------------------


def test_images(seed: int) -> list[tuple[str, np.ndarray]]:
    from bench.common import photo
    from devkit.sample_media import make_scene

    images = []
    for i, (w, h) in enumerate([(1024, 768), (800, 1200), (1280, 720)]):
        rgb = np.asarray(Image.open(io.BytesIO(photo(w, h, seed + i))).convert("RGB"))
        images.append((f"photo {w}x{h} seed {seed + i}", rgb))
    with tempfile.TemporaryDirectory() as tmp:
        scene = make_scene(Path(tmp) / "scene.jpg", 640, 480, seed)
        rgb = np.asarray(Image.open(scene.path).convert("RGB"))
    images.append(("devkit scene 640x480", rgb))
    return images


def prompts_for(rgb: np.ndarray, rng: np.random.Generator, n: int) -> list[dict]:
    """Prompts in Meta's convention (pixel indices): single points, point sets with a negative,
    boxes, and a box with a point."""
    h, w = rgb.shape[:2]
    out = []
    for i in range(n):
        kind = ("point", "points", "box", "box+point")[i % 4]
        p: dict = {"kind": kind, "points": None, "labels": None, "box": None}
        if kind in ("point", "points", "box+point"):
            k = {"point": 1, "points": 3, "box+point": 1}[kind]
            p["points"] = rng.uniform([0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h], (k, 2)).round()
            p["labels"] = np.array([1] + [0] * (k - 2) + [1] * (k > 1))[:k]
        if kind in ("box", "box+point"):
            cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
            bw, bh = rng.uniform(0.1, 0.45) * w, rng.uniform(0.1, 0.45) * h
            p["box"] = np.array([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]).round()
            if kind == "box+point":
                p["points"] = np.array([[cx, cy]]).round()
        out.append(p)
    return out


def ours_prompt(p: dict, hw: tuple[int, int], size: int):
    """The same prompt for our predictor: Meta's pixel index c is our continuous c + 0.5 * W / S."""
    from label_studio_sam2.engine.image import Prompt

    h, w = hw
    shift = np.array([0.5 * w / size, 0.5 * h / size])
    points = np.zeros((0, 2), np.float32) if p["points"] is None else (p["points"] + shift).astype(np.float32)
    labels = np.zeros((0,), np.int64) if p["labels"] is None else p["labels"].astype(np.int64)
    box = None if p["box"] is None else (p["box"].reshape(2, 2) + shift).reshape(4).astype(np.float32)
    return Prompt(points, labels, box)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def rel_l2(ours: torch.Tensor, meta: torch.Tensor) -> float:
    return float((ours.float() - meta.float()).norm() / meta.float().norm())


# --- our variants ----------------------------------------------------------------------------------

VARIANTS = {  # name: (encoder_runtime, cpu_precision)
    "torch fp32": ("torch", "fp32"),
    "openvino f32": ("openvino", "fp32"),
    "openvino bf16": ("openvino", "bf16"),
    "torch bf16": ("torch", "bf16"),
}


def load_variants(model_dir: Path, cache_dir: Path, names: list[str]) -> dict:
    from label_studio_sam2.engine.models import load_image_model

    loaded = {}
    for name in names:
        runtime, precision = VARIANTS[name]
        start = time.perf_counter()
        lm = load_image_model(str(model_dir), "cpu", precision, runtime, cache_dir)
        if lm.encoder_runtime != runtime:
            sys.exit(
                f"{name}: the encoder runs on {lm.encoder_runtime}, not {runtime} (is openvino installed?)"
            )
        print(f"loaded {name}: {lm.precision} in {time.perf_counter() - start:.1f} s", flush=True)
        loaded[name] = lm
    return loaded


# --- the image comparison ----------------------------------------------------------------------------


def compare_images(meta_model, image_mod, variants: dict, seed: int, prompts_per_image: int) -> dict:
    from label_studio_sam2.engine.image import ImagePredictor

    meta = image_mod.SAM2ImagePredictor(meta_model)
    ours = {name: ImagePredictor(lm) for name, lm in variants.items()}
    rng = np.random.default_rng(seed)
    per_variant = {
        name: {"features": [], "ious": [], "logit_max_abs": [], "choice_differs": 0} for name in ours
    }
    trivial = 0
    counted = 0
    shares = []  # Meta's mask's share of the image, for each counted prompt
    for title, rgb in test_images(seed):
        hw = rgb.shape[:2]
        start = time.perf_counter()
        with torch.inference_mode():
            meta.set_image(rgb)
        meta_s = time.perf_counter() - start
        meta_feats = [*meta._features["high_res_feats"], meta._features["image_embed"]]
        embs = {}
        for name, pred in ours.items():
            start = time.perf_counter()
            embs[name] = pred.embedding(title, rgb)
            levels = [rel_l2(o, m) for o, m in zip(embs[name].features, meta_feats, strict=True)]
            per_variant[name]["features"].append(levels)
            print(
                f"{title}: {name} encoder {time.perf_counter() - start:.1f} s (Meta {meta_s:.1f} s), "
                f"rel-L2 vs Meta {', '.join(f'{v:.2e}' for v in levels)}",
                flush=True,
            )
        for p in prompts_for(rgb, rng, prompts_per_image):
            multimask = p["kind"] == "point"
            with torch.inference_mode():
                masks, scores, low = meta.predict(
                    point_coords=p["points"],
                    point_labels=p["labels"],
                    box=p["box"],
                    multimask_output=multimask,
                )
            best = int(np.argmax(scores))
            meta_mask = masks[best] > 0.5
            share = float(meta_mask.mean())
            if not TRIVIAL < share < 1 - TRIVIAL:
                trivial += 1
                continue
            counted += 1
            shares.append(share)
            for name, pred in ours.items():
                prompt = ours_prompt(p, hw, variants[name].image_size)
                assert prompt.multimask == multimask
                (result,) = pred.predict(title, rgb, [prompt])
                logits, our_iou, _ = pred.decode_logits(embs[name], [prompt])
                row = per_variant[name]
                row["ious"].append(iou(result.mask, meta_mask))
                row["logit_max_abs"].append(float((logits[0].cpu() - torch.as_tensor(low)).abs().max()))
                row["choice_differs"] += int(int(our_iou[0].argmax()) != best)
    out = {}
    for name, row in per_variant.items():
        feats = np.array(row["features"])
        ious = np.array(row["ious"])
        out[name] = {
            "encoder": f"{variants[name].precision}",
            "feature_rel_l2_per_level_max": [float(v) for v in feats.max(axis=0)],
            "feature_rel_l2_per_level_median": [float(v) for v in np.median(feats, axis=0)],
            "prompts": len(ious),
            "min_iou": float(ious.min()),
            "median_iou": float(np.median(ious)),
            "mean_iou": float(ious.mean()),
            "low_res_logits_max_abs_diff": float(max(row["logit_max_abs"])),
            "single_point_best_candidate_differs": row["choice_differs"],
            "holds_min_iou": bool(ious.min() >= MIN_IOU),
        }
    return {
        "variants": out,
        "prompts_counted": counted,
        "prompts_trivial_skipped": trivial,
        "meta_mask_share_min_median_max": [float(min(shares)), float(np.median(shares)), float(max(shares))],
    }


# --- the video comparison ------------------------------------------------------------------------------


class _Frames:
    """A FrameSource over decoded frames (the JPEGs Meta reads)."""

    def __init__(self, frames: list[np.ndarray]):
        self._frames = frames
        self.num_frames = len(frames)
        self.height, self.width = frames[0].shape[:2]
        self.content_key = None

    def frame(self, index: int) -> np.ndarray:
        return self._frames[index]

    def frames(self, indices: range):
        for i in indices:
            yield i, self._frames[i]


def _box(mask: np.ndarray) -> np.ndarray | None:
    from label_studio_sam2.engine.transforms import mask_box

    return None if not mask.any() else mask_box(mask)


def _largest_piece(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def compare_video(ckpt: Path, model_dir: Path, image_models: dict, frames_count: int, seed: int) -> dict:
    """Meta's video predictor once; ours with the video model sharing each image model's encoder."""
    from devkit.videos import crossing_clip

    build = importlib.import_module("sam2.build_sam")
    clip = crossing_clip(seed, num_frames=frames_count, hw=(384, 512))
    with tempfile.TemporaryDirectory() as tmp:
        for i, frame in enumerate(clip.frames):
            Image.fromarray(frame).save(Path(tmp) / f"{i:05d}.jpg", quality=95)
        frames = [
            np.asarray(Image.open(Path(tmp) / f"{i:05d}.jpg").convert("RGB")) for i in range(frames_count)
        ]
        meta = build.build_sam2_video_predictor(META_CONFIG, str(ckpt), device="cpu")
        start = time.perf_counter()
        with torch.inference_mode():
            state = meta.init_state(video_path=tmp)
            truth_box = _box(clip.truth[0])
            meta.add_new_points_or_box(state, frame_idx=0, obj_id=1, box=truth_box)
            meta_masks = {}
            for f, obj_ids, logits in meta.propagate_in_video(state):
                meta_masks[f] = (logits[list(obj_ids).index(1), 0] > 0).cpu().numpy()
    meta_s = time.perf_counter() - start
    h, w = frames[0].shape[:2]
    meta_boxes = {}
    for f, mm in meta_masks.items():
        meta_boxes[f] = (_box(mm), _box(_largest_piece(mm)) if mm.any() else None, float(mm.mean()))
    out = {
        "clip": f"devkit.videos.crossing_clip(seed={seed}, num_frames={frames_count}, hw=(384, 512)) as JPEG q95",
        "prompt": "box of the truth mask on frame 0, tracked forward",
        "meta_s": round(meta_s, 1),
        "meta_mask_share_per_frame": [
            round(meta_boxes[f][2], 4) if f in meta_boxes else None for f in range(frames_count)
        ],
        "meta_whole_box_is_the_frame": sum(
            1 for v in meta_boxes.values() if v[0] is not None and np.allclose(v[0], [0, 0, w, h])
        ),
        "variants": {},
    }
    for name, image_model in image_models.items():
        out["variants"][name] = _track_ours(model_dir, image_model, frames, truth_box, meta_boxes)
    return out


def _track_ours(model_dir: Path, image_model, frames: list[np.ndarray], truth_box, meta_boxes: dict) -> dict:
    from label_studio_sam2.engine.models import load_video_model
    from label_studio_sam2.engine.tracker import ObjectPrompt, VideoTracker

    video = load_video_model(str(model_dir), "cpu", share_with=image_model)
    frames_count = len(frames)
    start = time.perf_counter()
    # Meta's box is in pixel indices, ours continuous: the same shift as for images
    h, w = frames[0].shape[:2]
    s = video.image_size
    ours_box = tuple(float(v) for v in (truth_box.reshape(2, 2) + [0.5 * w / s, 0.5 * h / s]).reshape(4))
    result = VideoTracker(video).track(
        _Frames(frames), [ObjectPrompt(1, {0: ours_box})], max_frames_each_way=frames_count, lost_after=None
    )
    ours_s = time.perf_counter() - start
    track = result.tracks[1]
    rows, between, compared, tol = [], 0, 0, 1.0
    for f in range(frames_count):
        whole, piece, share = meta_boxes.get(f, (None, None, None))
        ob = track.boxes.get(f)
        ok = None
        if whole is not None and ob is not None:
            o = np.asarray(ob, np.float64)
            inside_whole = (o[:2] >= whole[:2] - tol).all() and (o[2:] <= whole[2:] + tol).all()
            holds_piece = (o[:2] <= piece[:2] + tol).all() and (o[2:] >= piece[2:] - tol).all()
            ok = bool(inside_whole and holds_piece)
            compared += 1
            between += ok
        rows.append(
            {
                "frame": f,
                "ours": None if ob is None else [round(float(v), 1) for v in ob],
                "meta_whole": None if whole is None else whole.tolist(),
                "meta_largest_piece": None if piece is None else piece.tolist(),
                "between": ok,
            }
        )
    both_absent = sum(1 for r in rows if r["ours"] is None and r["meta_whole"] is None)
    return {
        "encoder": video.precision if video.ov_encoder is not None else "torch fp32",
        "encoder_runtime": video.encoder_runtime,
        "frames_compared": compared,
        "frames_between": between,
        "frames_absent_in_both": both_absent,
        "frames_present_in_one_only": frames_count - compared - both_absent,
        "tolerance_px": tol,
        "ours_s": round(ours_s, 1),
        "frames": rows,
    }


# --- main --------------------------------------------------------------------------------------------------


def machine() -> dict:
    flags = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(
            (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), ""
        )
        flags = next((ln.split(":", 1)[1] for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    except OSError:
        model = platform.processor()
    have = set(flags.split())
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": {f: f in have for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")},
        "load_average_at_start": os.getloadavg(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, flags {m['flags']}, torch threads {m['torch_threads']}")
    print(f"load average {m['load_average_at_start']} -> {m['load_average_at_end']}")
    for tag, run in result["runs"].items():
        images = run["images"]
        lo, mid, hi = images["meta_mask_share_min_median_max"]
        print(
            f"\nweights {tag}: {images['prompts_counted']} prompts counted, {images['prompts_trivial_skipped']} "
            f"skipped (Meta's mask empty or full); Meta's masks cover {lo:.0%} / {mid:.0%} / {hi:.0%} (min/median/max)"
        )
        print(
            f"{'variant':<14}  {'feature rel-L2 (max per level)':<30}  {'min IoU':>8}  {'median':>8}  >= {MIN_IOU}"
        )
        for name, v in images["variants"].items():
            levels = " / ".join(f"{x:.1e}" for x in v["feature_rel_l2_per_level_max"])
            print(
                f"{name:<14}  {levels:<30}  {v['min_iou']:>8.4f}  {v['median_iou']:>8.4f}  "
                f"{'yes' if v['holds_min_iou'] else 'NO'}"
            )
        if "video" in run:
            v = run["video"]
            print(
                f"video: Meta's whole-mask box is the whole frame on {v['meta_whole_box_is_the_frame']} frames"
            )
            for name, r in v["variants"].items():
                print(
                    f"video, ours on {name}: our box between Meta's largest piece and whole mask on "
                    f"{r['frames_between']} of {r['frames_compared']} frames compared "
                    f"({r['frames_absent_in_both']} absent in both, {r['frames_present_in_one_only']} in one only)"
                )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts-per-image", type=int, default=8, help="4 images, so 4x this many prompts")
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}"
    )
    ap.add_argument("--video", action="store_true", help="also compare video tracks")
    ap.add_argument("--video-frames", type=int, default=12)
    ap.add_argument(
        "--weights",
        default="meta-init,centred",
        help="comma-separated: meta-init (Meta's random init: masks over ~50-95 %% of the image), "
        "centred (the decoder's mask logits centred at 0: masks over ~40 %%), each a separate run",
    )
    ap.add_argument(
        "--work", default=None, help="keep the checkpoint, converted model and OpenVINO cache here"
    )
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--check", action="store_true", help="exit 1 when min IoU < 0.98 for an fp32 or f32 variant"
    )
    args = ap.parse_args(argv)

    build, image_mod = meta_modules()
    from label_studio_sam2.engine.convert import convert_checkpoint

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}: choose from {list(VARIANTS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="meta-agreement-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine(), "meta_config": META_CONFIG, "seed": args.seed}
    try:
        import openvino

        result["openvino"] = openvino.__version__
    except ImportError:
        result["openvino"] = None
    tags = [t.strip() for t in args.weights.split(",") if t.strip()]
    if not tags or set(tags) - {"meta-init", "centred"}:
        sys.exit(f"--weights {args.weights!r}: expected meta-init and/or centred")
    result["runs"] = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for tag in tags:
        print(f"--- weights: {tag}", flush=True)
        run: dict = {}
        ckpt = work / f"meta_sam2.1_hiera_tiny_random_{tag}_{args.seed}.pt"
        meta_model, run["weights"] = meta_checkpoint(build, image_mod, ckpt, args.seed, tag == "centred")
        model_dir = work / f"converted_{tag}_{args.seed}"
        convert_checkpoint(ckpt, model_dir)
        variants = load_variants(model_dir, work / "ov-cache", names)
        run["images"] = compare_images(meta_model, image_mod, variants, args.seed, args.prompts_per_image)
        if args.video:
            # torch bf16 is left out: the video model shares the encoder module, not its autocast
            shared = {n: variants[n] for n in names if n != "torch bf16"}
            run["video"] = compare_video(ckpt, model_dir, shared, args.video_frames, args.seed)
        result["runs"][tag] = run
        del meta_model, variants
        result["machine"]["load_average_at_end"] = os.getloadavg()
        out.write_text(json.dumps(result, indent=2))  # after each run: a long second run may be cut
    print_table(result)
    print(f"wrote {out}")
    if args.check:
        failed = [
            (tag, n)
            for tag, run in result["runs"].items()
            for n, v in run["images"]["variants"].items()
            if "bf16" not in n and not v["holds_min_iou"]
        ]
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
