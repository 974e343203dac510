"""OpenVINO int8 (NNCF post-training quantisation) of SAM2's image encoder: its speed beside PyTorch
and OpenVINO f32/bf16, and its agreement with PyTorch fp32 (issue 24: "Where OpenVINO's int8 path
gives more, measure it and its mask agreement, and keep it opt-in unless it holds the agreement
bounds"). A measurement only: the product has no int8 setting.

Two parts, one process:

1. Speed: a randomly initialised model of the real hiera-tiny architecture at 1024 px (latency is
   real, masks are not), the vision encoder (Hiera + FPN neck, `openvino_encoder._FPN`) on one
   preprocessed 1024x768 photo, best of N after a warm-up, the rows taking turns (each round
   runs every row once: the load of a shared machine drifts over minutes): torch fp32 / bf16 autocast, OpenVINO
   f32 / bf16 (INFERENCE_PRECISION_HINT), and the int8 model compiled with the f32 and the bf16
   hint (what int8 leaves unquantised runs in that precision). The int8 model is
   `nncf.quantize(converted IR, calibration, model_type=TRANSFORMER)` with `--calibration`
   preprocessed images (synthetic photos `bench.common.photo` and the fixture's scenes); its
   quantisation time is reported. Random weights say nothing about int8's accuracy: the rel-L2
   printed for them is only a sanity check.
2. Agreement: the small trained fixture `devkit/sam2-shapes` (128 px input; the only trained
   weights the project holds, so the figure is indicative for hiera-tiny at 1024 px, not a
   proof), its encoder quantised the same way with calibration scenes from the fixture's
   training split; on the tests' scenes (test split): rel-L2 of each FPN level vs torch fp32, and
   the mask IoU of every click and box prompt vs torch fp32, as tests/test_openvino.py measures
   OpenVINO bf16. The bounds that test holds bf16 to: rel-L2 < 2 % per level and <= 2x torch
   bf16's own error; min mask IoU >= 0.98.

NNCF is not a project dependency: where `nncf` does not import, the int8 rows are skipped with a
message. To run them without touching the project's venv (its dependencies that the venv lacks,
wheels only):

    .venv/bin/pip install --no-deps --only-binary=:all: --target /tmp/nncfpkgs nncf==3.4.0 \\
        "ninja<1.14" psutil "pydot<=4.0.1" pyparsing scikit-learn narwhals tabulate threadpoolctl
    PYTHONPATH=/tmp/nncfpkgs .venv/bin/python -m bench.encoder_int8 [--calibration 24] [--busy]

Prints a table and writes bench/results/encoder_int8.json (or --out).
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.click import busy_neighbours
from bench.common import machine, photo, report, rss_mb
from bench.common import rel_l2_levels as rel_l2
from bench.encoder_runtimes import cpu_flags, optional, torch_encoders

RESULTS = Path(__file__).parent / "results" / "encoder_int8.json"
FIXTURE = Path(__file__).resolve().parent.parent / "devkit" / "sam2-shapes"


def nncf_missing() -> str | None:
    """Why the int8 rows cannot run here (None: they can)."""
    try:
        optional("nncf")
    except Exception as e:  # ImportError, or a broken install's own errors
        return f"{type(e).__name__}: {e}"
    return None


def quantize(ir_xml: Path, calibration: list[torch.Tensor]):
    """NNCF post-training int8 quantisation of the converted encoder (an `ov.Model`)."""
    import openvino as ov

    nncf = optional("nncf")
    model = ov.Core().read_model(ir_xml)
    dataset = nncf.Dataset(calibration, lambda x: x.numpy())
    return nncf.quantize(
        model,
        dataset,
        subset_size=len(calibration),
        model_type=nncf.ModelType.TRANSFORMER,
    )


def compile_int8(quantized, hint: str, threads: int, position_encoding):
    """The quantised model compiled for the CPU, as `load_openvino_encoder` compiles f32/bf16,
    wrapped as the product's encoder (a stand-in for `model.vision_encoder`; `.infer` gives the
    FPN levels as torch tensors). position_encoding: the PyTorch encoder's neck's."""
    import openvino as ov

    from label_studio_sam2.engine.openvino_encoder import OpenVINOVisionEncoder

    compiled = ov.Core().compile_model(
        quantized,
        "CPU",
        {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"},
    )
    return OpenVINOVisionEncoder(compiled, f"int8+{hint}", threads, None, position_encoding)


def calibration_images(n: int, size: int, split: str) -> list[torch.Tensor]:
    """n preprocessed images as the predictor feeds the encoder (transforms.preprocess): for the
    1024 px model half synthetic photos, half fixture scenes; for the fixture its scenes only."""
    from devkit.scenes import make_scene
    from label_studio_sam2.engine.transforms import preprocess

    out = []
    for i in range(n):
        if size >= 512 and i % 2 == 0:
            rgb = np.array(Image.open(io.BytesIO(photo(1024, 768, 100 + i))).convert("RGB"))
        else:
            rgb = make_scene(1000 + i, split=split).image
        out.append(preprocess(rgb, size))
    return out


def interleaved(calls, pixels, repeats: int, key: str) -> None:
    """Best of `repeats` per row, the rows taking turns (one run of each per round), so that a
    shared machine's load drifting over the minutes this takes weighs on every row alike."""
    times = {id(row): [] for row, _ in calls}
    for _ in range(repeats):
        for row, fn in calls:
            start = time.perf_counter()
            fn(pixels)
            times[id(row)].append(time.perf_counter() - start)
    for row, _ in calls:
        row[key] = round(min(times[id(row)]), 3)
        row[key.replace("_s", "_all_s")] = [round(t, 3) for t in times[id(row)]]


def speed(repeats: int, calibration: int, busy: bool, threads: int, work: Path, r: dict) -> None:
    from label_studio_sam2.engine.models import random_model, real_config
    from label_studio_sam2.engine.openvino_encoder import _FPN, load_openvino_encoder
    from label_studio_sam2.engine.transforms import preprocess

    torch.manual_seed(0)
    base = random_model(real_config(), "image", cpu_precision="fp32")
    assert base.image_size == 1024
    rgb = np.array(Image.open(io.BytesIO(photo(1024, 768, 0))).convert("RGB"))
    pixels = preprocess(rgb, base.image_size)
    fpn = _FPN(base.model.vision_encoder).eval()
    rows, calls = r["speed"]["rows"], []

    def add(row: dict, fn, before: float | None = None) -> None:
        before = before or rss_mb()
        fn(pixels)  # warm-up; timed below, all rows interleaved
        row["rss_mb_after"] = round(rss_mb())
        row["rss_mb_added"] = round(row["rss_mb_after"] - before)
        rows.append(row)
        calls.append((row, fn))

    torch_fp32, torch_bf16 = torch_encoders(fpn)
    add({"runtime": "torch", "precision": "fp32"}, torch_fp32)
    add({"runtime": "torch", "precision": "bf16"}, torch_bf16)
    encoders = {}
    for hint in ("f32", "bf16"):
        before = rss_mb()
        start = time.perf_counter()
        encoders[hint] = load_openvino_encoder(
            fpn.vision_encoder, "bench", 1024, hint, threads, work / "ov1024"
        )
        row = {"runtime": "openvino", "precision": hint, "setup_s": round(time.perf_counter() - start, 2)}
        add(row, encoders[hint].infer, before)
    missing = nncf_missing()
    if missing:
        r["nncf_skipped"] = missing
        print(f"int8 rows skipped (nncf does not import: {missing})")
    else:
        import openvino as ov

        before = rss_mb()
        kept = work / f"int8-1024-{calibration}" / "encoder.xml"
        if kept.exists():  # --keep: quantised by an earlier run
            quantized = ov.Core().read_model(kept)
            r["speed"]["int8_from"] = str(kept)
        else:
            images = calibration_images(calibration, 1024, "train")
            start = time.perf_counter()
            quantized = quantize(encoders["f32"].cache_entry / "encoder.xml", images)
            r["speed"]["quantize_s"] = round(time.perf_counter() - start, 1)
            del images
            ov.save_model(quantized, kept, compress_to_fp16=False)
        for hint in ("f32", "bf16"):
            add(
                {"runtime": "openvino", "precision": f"int8+{hint}"},
                compile_int8(quantized, hint, threads, fpn.vision_encoder.neck.position_encoding).infer,
                before,
            )
            before = None
    interleaved(calls, pixels, repeats, "quiet_s")
    ref = torch_fp32(pixels)
    for row, fn in calls:
        row["rel_l2_vs_torch_fp32"] = rel_l2(fn(pixels), ref)
        row["speedup_vs_torch_fp32"] = round(rows[0]["quiet_s"] / row["quiet_s"], 2)
    if busy:
        _, r["load_before_busy"] = machine()
        neighbours = busy_neighbours(2)
        try:
            time.sleep(2)  # let them get going
            interleaved(calls, pixels, repeats, "busy_s")
            _, r["load_during_busy"] = machine()
        finally:
            for proc in neighbours:
                proc.terminate()
        for row, _ in calls:
            row["busy_speedup_vs_torch_fp32"] = round(rows[0]["busy_s"] / row["busy_s"], 2)


def mask_ious(reference, other, scenes: int) -> list[float]:
    """Mask IoU per prompt of the test scenes (their clicks and boxes, as tests/test_openvino.py
    prompts them)."""
    from devkit.scenes import scene_prompts
    from label_studio_sam2.engine.image import ImagePredictor

    ref, pred = ImagePredictor(reference), ImagePredictor(other)
    ious = []
    for seed in range(scenes):
        scene, prompts = scene_prompts(seed)
        for p in prompts:
            a = ref.predict(f"s{seed}", scene.image, [p])[0].mask
            b = pred.predict(f"s{seed}", scene.image, [p])[0].mask
            ious.append(float((a & b).sum() / max((a | b).sum(), 1)))
    return ious


def agreement(calibration: int, scenes: int, work: Path, r: dict) -> None:
    from devkit.scenes import make_scene
    from label_studio_sam2.engine.image import ImagePredictor
    from label_studio_sam2.engine.models import load_image_model, with_encoder_runtime

    a = r["agreement"]
    models = {
        ("torch", "fp32"): load_image_model(str(FIXTURE), "cpu", "fp32", "torch"),
        ("torch", "bf16"): load_image_model(str(FIXTURE), "cpu", "bf16", "torch"),
        ("openvino", "f32"): load_image_model(str(FIXTURE), "cpu", "fp32", "openvino", work / "ovfix"),
        ("openvino", "bf16"): load_image_model(str(FIXTURE), "cpu", "bf16", "openvino", work / "ovfix"),
    }
    a["image_size"] = models["torch", "fp32"].image_size
    ov_f32 = models["openvino", "f32"].ov_encoder
    if ov_f32 is None:
        a["error"] = "OpenVINO did not load the fixture (see the warning above)"
        return
    if not nncf_missing():
        images = calibration_images(calibration, a["image_size"], "train")
        start = time.perf_counter()
        quantized = quantize(ov_f32.cache_entry / "encoder.xml", images)
        a["quantize_s"] = round(time.perf_counter() - start, 1)
        position_encoding = models["torch", "fp32"].model.vision_encoder.neck.position_encoding
        for hint in ("f32", "bf16"):
            # a view of the OpenVINO f32 model (its own module dict) with the int8 encoder in its place
            loaded = with_encoder_runtime(models["openvino", "f32"], "openvino")
            loaded.ov_encoder = compile_int8(quantized, hint, ov_f32.threads, position_encoding)
            loaded.model.vision_encoder = loaded.ov_encoder
            models["openvino", f"int8+{hint}"] = loaded
    reference = models["torch", "fp32"]
    for (runtime, precision), loaded in models.items():
        if (runtime, precision) == ("torch", "fp32"):
            continue
        errors = []
        for seed in range(scenes):
            rgb = make_scene(seed).image
            ref = ImagePredictor(reference)._encode(rgb).features
            got = ImagePredictor(loaded)._encode(rgb).features
            errors.append(rel_l2(got, ref))
        ious = mask_ious(reference, loaded, scenes)
        a["rows"].append(
            {
                "runtime": runtime,
                "precision": precision,
                # image_embeddings' levels (the FPN levels after the decoder's projections)
                "rel_l2_vs_torch_fp32_max_per_level": [
                    max(e[i] for e in errors) for i in range(len(errors[0]))
                ],
                "mask_iou_min": round(min(ious), 4),
                "mask_iou_mean": round(float(np.mean(ious)), 4),
                "prompts": len(ious),
            }
        )
    torch_bf16 = next(x for x in a["rows"] if x["runtime"] == "torch" and x["precision"] == "bf16")
    for row in a["rows"]:
        errs, pt = row["rel_l2_vs_torch_fp32_max_per_level"], torch_bf16["rel_l2_vs_torch_fp32_max_per_level"]
        row["holds_bf16_bounds"] = bool(
            max(errs) < 2e-2
            and all(o <= 2 * max(p, 1e-3) for o, p in zip(errs, pt, strict=True))
            and row["mask_iou_min"] >= 0.98
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="best of N (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime")
    p.add_argument("--calibration", type=int, default=24, help="calibration images for NNCF")
    p.add_argument("--scenes", type=int, default=4, help="test scenes for the agreement (as the tests)")
    p.add_argument("--busy", action="store_true", help="also time beside two CPU-bound processes")
    p.add_argument("--skip-speed", action="store_true", help="only the agreement on the fixture")
    p.add_argument(
        "--keep",
        default=None,
        help="a directory kept between runs: the conversions and the 1024 px int8 model are reused from it",
    )
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("nncf").setLevel(logging.WARNING)
    cpu, load_before = machine()
    r = {
        "model": "speed: random sam2.1 hiera-tiny at 1024 px, vision encoder only; agreement: trained fixture",
        "image": "1024x768 photo -> 1024 px input (speed); fixture test scenes -> 128 px (agreement)",
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_flags": cpu_flags(),
        "load_before": load_before,
        "repeats": args.repeats,
        "calibration_images": args.calibration,
        "versions": {"torch": torch.__version__},
        "speed": {"rows": []},
        "agreement": {"fixture": "devkit/sam2-shapes", "scenes": args.scenes, "rows": []},
    }
    import openvino as ov

    r["versions"]["openvino"] = ov.__version__
    if not nncf_missing():
        r["versions"]["nncf"] = optional("nncf").__version__
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="encoder-int8-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_speed:
        speed(args.repeats, args.calibration, args.busy, args.threads, work, r)
    agreement(args.calibration, args.scenes, work, r)
    _, r["load_after"] = machine()

    rows = [("machine", r["cpu"], f"load average before {r['load_before']}, after {r['load_after']}")]
    if args.busy:
        rows.append(("busy", "2 procs", f"load average during {r.get('load_during_busy')}"))
    rows.append(("cpu flags", "", " ".join(r["cpu_flags"])))
    rows.append(("versions", "", ", ".join(f"{k} {v}" for k, v in r["versions"].items())))
    if "nncf_skipped" in r or nncf_missing():
        rows.append(("int8 skipped", "", r.get("nncf_skipped") or nncf_missing()))
    if r["speed"]["rows"]:
        rows.append(("speed (1024 px, random weights)", "", ""))
    for row in r["speed"]["rows"]:
        name = f"  {row['runtime']} {row['precision']}"
        errs = "/".join(f"{e:.1e}" for e in row["rel_l2_vs_torch_fp32"])
        note = f"x{row['speedup_vs_torch_fp32']:.2f} vs torch fp32; rel-L2 {errs}; "
        note += f"RSS {row['rss_mb_after']} MB (+{row['rss_mb_added']})"
        rows.append((f"{name} quiet", f"{row['quiet_s']:.3f} s", note))
        if "busy_s" in row:
            rows.append(
                (f"{name} busy", f"{row['busy_s']:.3f} s", f"x{row['busy_speedup_vs_torch_fp32']:.2f}")
            )
    if "quantize_s" in r["speed"]:
        rows.append(
            ("  nncf.quantize (1024 px)", f"{r['speed']['quantize_s']:.1f} s", f"{args.calibration} images")
        )
    a = r["agreement"]
    rows.append((f"agreement (trained fixture, {a.get('image_size')} px)", "", a.get("error", "")))
    for row in a["rows"]:
        errs = "/".join(f"{e:.1e}" for e in row["rel_l2_vs_torch_fp32_max_per_level"])
        rows.append(
            (
                f"  {row['runtime']} {row['precision']}",
                f"IoU {row['mask_iou_min']:.3f}",
                f"min of {row['prompts']} prompts (mean {row['mask_iou_mean']:.3f}); max rel-L2 {errs}; "
                f"holds the bf16 bounds: {'yes' if row['holds_bf16_bounds'] else 'NO'}",
            )
        )
    if "quantize_s" in a:
        rows.append(("  nncf.quantize (fixture)", f"{a['quantize_s']:.1f} s", f"{args.calibration} images"))
    report(r, rows, args.out, value_width=12)


if __name__ == "__main__":
    main()
