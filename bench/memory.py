"""Peak memory of boxes to masks, each run in a fresh process.

    python -m bench.memory                   # 1 vs 100 boxes on a 12 MP image, this checkout
    python -m bench.memory --before ../main  # and another checkout side by side (e.g. before a change)
    python -m bench.memory --boxes           # 1, 50, 200 boxes with the real-size hiera-tiny model
    python -m bench.memory --boxes --decode-batch 1000   # the same, every box in one decoder call

Each run is a child process that turns N rectangles into brush masks through
`label_studio_sam2.labelstudio.protocol.boxes_to_masks`, the path of "Retrieve predictions" and the CLI. Peak RSS is the
child's ru_maxrss.

Default mode: the shape-trained tiny SAM2 (devkit/sam2-shapes) on one 4000x3000 JPEG. Target:
100 boxes within 1.5x of one box.

`--boxes` (issue 23, "Boxes"): a randomly initialised SAM2.1 hiera-tiny of the released size
(1024 px input, so the decoder's activations per box are the real model's) on a 1024x1024 JPEG,
boxes decoded DECODE_BATCH at a time (`--decode-batch`, default the setting's default). Target:
peak RSS flat in the box count (200 boxes within 1.5x of one box); before batching, every box
of a request was decoded in one call at about 35 MB a box.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
  <RectangleLabels name="box" toName="image"><Label value="object"/></RectangleLabels>
</View>"""
W, H = 4000, 3000


def child(n_boxes: int, real: bool = False, decode_batch: int | None = None) -> None:
    import base64
    import resource

    import torch

    from bench.common import photo
    from label_studio_sam2.engine.image import ImagePredictor
    from label_studio_sam2.engine.models import load_image_model, random_model, real_config
    from label_studio_sam2.labelstudio import protocol
    from label_studio_sam2.labelstudio.auth import LabelStudioAuth
    from label_studio_sam2.labelstudio.protocol import parse_label_config
    from label_studio_sam2.service.media import MediaClient
    from label_studio_sam2.service.segment import ImageSegmenter

    torch.set_num_threads(2)
    if real:
        torch.manual_seed(0)
        loaded = random_model(real_config(), "image")
        w, h = 1024, 1024
    else:
        from label_studio_sam2.service.settings import Settings

        # CPU_PRECISION as the server reads it (the engine reads no environment)
        loaded = load_image_model(
            str(REPO / "devkit" / "sam2-shapes"), "cpu", Settings.from_env().cpu_precision
        )
        w, h = W, H
    uri = "data:image/jpeg;base64," + base64.b64encode(photo(w, h, 0)).decode()
    boxes = []
    for i in range(n_boxes):
        x, y = (i % 10) * 9 + 1, (i // 10 % 10) * 9 + 1
        boxes.append(
            {
                "type": "rectanglelabels",
                "from_name": "box",
                "to_name": "image",
                "original_width": w,
                "original_height": h,
                "value": {"x": x, "y": y, "width": 12, "height": 12, "rectanglelabels": ["object"]},
            }
        )
    task = {"id": 1, "data": {"image": uri}, "annotations": [{"id": 1, "result": boxes}]}
    kw = {} if decode_batch is None else {"decode_batch": decode_batch}
    predictor = ImagePredictor(loaded, **kw)
    segmenter = ImageSegmenter(
        predictor, MediaClient(LabelStudioAuth(None, None)), "bench", max_regions=10_000
    )
    start = time.perf_counter()
    if hasattr(segmenter, "boxes_to_masks"):  # a checkout from before the service was tool-neutral
        entry = segmenter.boxes_to_masks(task, parse_label_config(CONFIG))
    else:
        entry = protocol.boxes_to_masks(segmenter, task, parse_label_config(CONFIG))
    took = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "boxes": n_boxes,
                "regions": len(entry["result"]),
                "peak_rss_mb": round(peak_mb),
                "decoder_calls": predictor.decoder_calls,
                "decode_batch": getattr(predictor, "decode_batch", None),
                "seconds": round(took, 2),
            }
        )
    )


def measure(tree: Path, n_boxes: int, extra: tuple[str, ...] = ()) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(n_boxes), *extra],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        raise SystemExit(f"child failed in {tree}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", type=int, default=0)
    p.add_argument("--before", type=Path, default=None, help="another checkout to measure side by side")
    p.add_argument("--out", default=None)
    p.add_argument("--boxes", action="store_true", help="1, 50, 200 boxes, real-size hiera-tiny (random)")
    p.add_argument("--decode-batch", type=int, default=None, help="boxes per decoder call (DECODE_BATCH)")
    p.add_argument("--counts", default="1,50,200", help="--boxes: box counts, comma-separated")
    p.add_argument("--real", action="store_true", help=argparse.SUPPRESS)  # the child of --boxes
    args = p.parse_args()
    if args.child:
        child(args.child, args.real, args.decode_batch)
        return
    if args.boxes:
        boxes_mode(args)
        return
    from bench.common import report

    args.out = args.out or str(REPO / "bench" / "results" / "memory.json")

    trees = {"this checkout": REPO} | ({"before": args.before.resolve()} if args.before else {})
    runs = {name: {n: measure(tree, n) for n in (1, 100)} for name, tree in trees.items()}
    rows = []
    for name, r in runs.items():
        ratio = r[100]["peak_rss_mb"] / r[1]["peak_rss_mb"]
        rows.append((f"{name}: 1 box", f"{r[1]['peak_rss_mb']} MB", "peak RSS"))
        rows.append(
            (f"{name}: 100 boxes", f"{r[100]['peak_rss_mb']} MB", f"{ratio:.2f}x one box (target <= 1.5x)")
        )
    result = {
        "model": "sam2-shapes (tiny, trained fixture)",
        "image": f"{W}x{H} JPEG ({W * H / 1e6:.0f} MP)",
        "torch_threads": 2,
        "runs": {name: {str(n): v for n, v in r.items()} for name, r in runs.items()},
        "cpu": _cpu(),
        "load": os.getloadavg(),
    }
    report(result, rows, args.out)


def boxes_mode(args) -> None:
    from bench.common import machine, report
    from label_studio_sam2.service.settings import Settings

    batch = args.decode_batch or Settings.model_fields["decode_batch"].default
    extra = ("--real", "--decode-batch", str(batch))
    runs = {n: measure(REPO, n, extra) for n in (int(c) for c in args.counts.split(","))}
    one = runs[1]["peak_rss_mb"]
    rows = [
        (
            f"{n} box{'es' if n > 1 else ''}",
            f"{r['peak_rss_mb']} MB",
            f"{r['peak_rss_mb'] / one:.2f}x one box; {r['decoder_calls']} decoder call(s), {r['seconds']} s",
        )
        for n, r in runs.items()
    ]
    cpu, load = machine()
    result = {
        "model": "sam2.1 hiera-tiny, real size, random weights (1024 px input)",
        "image": "1024x1024 JPEG",
        "torch_threads": 2,
        "decode_batch": batch,
        "runs": {str(n): r for n, r in runs.items()},
        "target": "peak RSS flat in the box count (200 boxes within 1.5x of one box)",
        "cpu": cpu,
        "load": load,
    }
    out = args.out or str(REPO / "bench" / "results" / f"memory-boxes-batch{batch}.json")
    report(result, rows, out)
    print(f"DECODE_BATCH={batch}; CPU: {cpu}; load average after the runs: {load}")
    print(json.dumps(result))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    if str(REPO) not in sys.path and "--child" not in sys.argv:
        sys.path.insert(0, str(REPO))
    main()
