"""Peak memory of boxes to masks: 1 box vs 100 boxes on a 12 MP image, each in a fresh process.

    python -m bench.memory                   # this checkout
    python -m bench.memory --before ../main  # and another checkout side by side (e.g. before a change)

Each run is a child process that loads the shape-trained tiny SAM2 (devkit/sam2-shapes),
decodes one 4000x3000 JPEG and turns N rectangles into brush masks through
ImageSegmenter.boxes_to_masks, the path of "Retrieve predictions" and the CLI. Peak RSS is the
child's ru_maxrss. Target: 100 boxes within 1.5x of one box.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
  <RectangleLabels name="box" toName="image"><Label value="object"/></RectangleLabels>
</View>"""
W, H = 4000, 3000


def child(n_boxes: int) -> None:
    import base64
    import resource

    import torch

    from backend.media import LabelStudioAuth, MediaClient
    from backend.protocol import parse_label_config
    from backend.segment import ImageSegmenter
    from bench.common import photo
    from sam2.image import ImagePredictor
    from sam2.models import load_image_model

    torch.set_num_threads(2)
    loaded = load_image_model(str(REPO / "devkit" / "sam2-shapes"), "cpu")
    uri = "data:image/jpeg;base64," + base64.b64encode(photo(W, H, 0)).decode()
    boxes = []
    for i in range(n_boxes):
        x, y = (i % 10) * 9 + 1, (i // 10) * 9 + 1
        boxes.append(
            {
                "type": "rectanglelabels",
                "from_name": "box",
                "to_name": "image",
                "original_width": W,
                "original_height": H,
                "value": {"x": x, "y": y, "width": 12, "height": 12, "rectanglelabels": ["object"]},
            }
        )
    task = {"id": 1, "data": {"image": uri}, "annotations": [{"id": 1, "result": boxes}]}
    segmenter = ImageSegmenter(ImagePredictor(loaded), MediaClient(LabelStudioAuth(None, None)), "bench")
    entry = segmenter.boxes_to_masks(task, parse_label_config(CONFIG))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"boxes": n_boxes, "regions": len(entry["result"]), "peak_rss_mb": round(peak_mb)}))


def measure(tree: Path, n_boxes: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(n_boxes)],
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
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "memory.json"))
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    from bench.common import report

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
