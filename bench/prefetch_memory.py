"""What the prefetch child costs in memory: the second model copy beside the server's.

After a click the server starts `label-studio-sam2 warm` as a child process (nice 19, so a click
never waits for it; label_studio_sam2/service/prefetch.py). That child loads its own copy of the
model. Here a fresh process does what the child does, stage by stage, and reports its resident
memory (RSS now, and peak: ru_maxrss):
- the interpreter with the package and torch imported (what any child costs);
- the model loaded (the server's model: a random real-size hiera-tiny, or --model DIR);
- after encoding --images 1024x768 images (the encoder's activations at their peak).

    .venv/bin/python -m bench.prefetch_memory [--images 3] [--threads 2] [--model DIR]
Prints a table and writes bench/results/prefetch_memory.json.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
from pathlib import Path

from bench.common import machine, report

RESULTS = Path(__file__).parent / "results" / "prefetch_memory.json"


def _rss_mb() -> tuple[float, float]:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    now = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            now = int(line.split()[1]) / 1024
    return now, peak


def _child(model: str | None, images: int, threads: int, out) -> None:
    """What the `warm` child holds: imports, the model, the encoder's work."""
    import numpy as np
    import torch

    import label_studio_sam2.labelstudio.warm  # noqa: F401  (what `warm` imports)
    from label_studio_sam2.engine.image import EmbeddingCache, ImagePredictor
    from label_studio_sam2.engine.models import encoder_precision, load_image_model, random_model, real_config

    torch.set_num_threads(threads)
    stages = {"imported": _rss_mb()}
    loaded = load_image_model(model, "cpu") if model else random_model(real_config(), "image")
    params = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / (1 << 20)
    stages["model loaded"] = _rss_mb()
    pred = ImagePredictor(loaded, EmbeddingCache(0))
    rng = np.random.default_rng(1)
    for i in range(images):
        pred.embedding(f"image{i}", rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    stages[f"{images} image(s) encoded"] = _rss_mb()
    out.put(
        {
            "stages": stages,
            "params_mb": params,
            "source": loaded.source,
            "precision": encoder_precision(loaded),
        }
    )


def run(model: str | None, images: int, threads: int) -> dict:
    ctx = mp.get_context("spawn")  # a fresh interpreter, as the child is
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(model, images, threads, q))
    p.start()
    r = q.get(timeout=1800)
    p.join()
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="a model directory (default: random real-size hiera-tiny)")
    args = p.parse_args()
    cpu, load = machine()
    r = run(args.model, args.images, args.threads)
    result = {
        "model": args.model or "hiera-tiny (random init), 1024 px input",
        "image": "1024x768 random pixels",
        "torch_threads": args.threads,
        "cpu": cpu,
        "load_before": load,
        **r,
        "load_after": machine()[1],
    }
    rows = [("machine", cpu, f"load average {load}")]
    rows.append(("model parameters", f"{r['params_mb']:.0f} MB", f"encoder precision {r['precision']}"))
    for stage, (now, peak) in r["stages"].items():
        rows.append((f"prefetch child, {stage}", f"{now:.0f} MB", f"peak {peak:.0f} MB"))
    rows.append(("load average after", result["load_after"], ""))
    report(result, rows, RESULTS, value_width=10)


if __name__ == "__main__":
    main()
