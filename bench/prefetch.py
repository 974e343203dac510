"""Does pre-encoding the next tasks (PREFETCH_TASKS) delay a labeler's click?

After a click the server starts `label-studio-sam2 warm` for the next tasks as a separate process
at nice 19 (label_studio_sam2/service/prefetch.py). Here a process of the same kind (the same model, the same
encoder, at the priority `Prefetcher` gives it) encodes images back to back: the worst case, a
prefetch that never ends. Side by side in one run, alternated (the prefetch process is paused
with SIGSTOP and resumed with SIGCONT between clicks, so both see the same machine):
- a cached click on image N (decode only) through the Flask app, prefetch paused vs encoding;
- a first click on an image not prefetched (encode + decode), paused vs encoding;
- the same with the prefetch process at nice 0, to show what the priority buys.
A random real-size hiera-tiny at 1024 px (real latency), a 1024x768 JPEG over loopback HTTP.

    .venv/bin/python -m bench.prefetch [--clicks 6] [--first-clicks 2] [--threads 2] [--runtime openvino]
--runtime openvino: the server's and the prefetch process's image encoders on OpenVINO
(ENCODER_RUNTIME; one conversion into a temporary cache, which the prefetch process reads).
Prints a table and writes bench/results/prefetch.json (prefetch-openvino.json for OpenVINO).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.click import _body
from bench.common import machine, photo, report, serve_directory

RESULTS = Path(__file__).parent / "results" / "prefetch.json"


def _model(runtime: str, cache: str):
    """The same random real-size hiera-tiny in the server and the prefetch process (one seed, so
    OpenVINO's cache entry serves both), its encoder on `runtime`."""
    from label_studio_sam2.engine.models import random_model, real_config, use_encoder_runtime

    torch.manual_seed(0)
    return use_encoder_runtime(random_model(real_config(), "image"), runtime, cache)


def _prefetch_process(nice: int, threads: int, ready, encoded, runtime: str, cache: str) -> None:
    """What `warm` does per task, forever: encode an image not seen before."""
    import numpy as np

    from label_studio_sam2.engine.image import EmbeddingCache, ImagePredictor
    from label_studio_sam2.service.handoff import lower_priority

    lower_priority(nice)  # as the server starts its prefetch child (nice 19: SCHED_IDLE too)
    torch.set_num_threads(threads)
    pred = ImagePredictor(_model(runtime, cache), EmbeddingCache(0))
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    ready.set()
    while True:
        pred.embedding(f"next{encoded.value}", rgb)
        encoded.value += 1


def run(clicks: int, first_clicks: int, threads: int, runtime: str = "torch") -> dict:
    from label_studio_sam2.labelstudio.app import create_app
    from label_studio_sam2.service.settings import Settings

    cache = tempfile.mkdtemp(prefix="ov-cache-")
    loaded = _model(runtime, cache)
    assert loaded.encoder_runtime == runtime, f"the encoder did not load on {runtime}"
    tmp = tempfile.mkdtemp()
    n_images = 2 + 4 * first_clicks
    for i in range(n_images):
        Path(tmp, f"img{i}.jpg").write_bytes(photo(1024, 768, i))
    httpd, base = serve_directory(tmp)
    settings = Settings.from_env(cache_mb=4096, store_dir="off", media_allowed_hosts=("127.0.0.1",))
    app = create_app(settings, loaded_model=loaded)
    client = app.test_client()

    def click(image: int, n: int) -> float:
        start = time.perf_counter()
        resp = client.post("/predict", json=_body(f"{base}/img{image}.jpg", image + 1, n))
        elapsed = time.perf_counter() - start
        assert resp.status_code == 200 and resp.get_json()["results"][0]["result"]
        return elapsed

    click(1, 1)  # warm-up on another image
    click(0, 1)  # image N is open: its embedding is cached
    next_image = iter(range(2, n_images))
    result: dict = {}
    ctx = mp.get_context("spawn")
    for nice in (19, 0):
        ready, encoded = ctx.Event(), ctx.Value("i", 0)
        proc = ctx.Process(
            target=_prefetch_process, args=(nice, threads, ready, encoded, runtime, cache), daemon=True
        )
        proc.start()
        try:
            if not ready.wait(300):
                raise RuntimeError("the prefetch process did not start")
            while encoded.value < 1:  # running: its first encode is done (allocations made)
                time.sleep(0.2)
            times: dict[str, list[float]] = {
                "cached_alone": [],
                "cached_beside": [],
                "first_alone": [],
                "first_beside": [],
            }
            for n in range(2, 2 + clicks):  # alternated: both see the same machine
                os.kill(proc.pid, signal.SIGSTOP)
                times["cached_alone"].append(click(0, n))
                os.kill(proc.pid, signal.SIGCONT)
                time.sleep(0.3)  # back at work before the click
                times["cached_beside"].append(click(0, n))
            for _ in range(first_clicks):
                os.kill(proc.pid, signal.SIGSTOP)
                times["first_alone"].append(click(next(next_image), 1))
                os.kill(proc.pid, signal.SIGCONT)
                time.sleep(0.3)
                times["first_beside"].append(click(next(next_image), 1))
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            proc.join()
        med = {k: statistics.median(v) for k, v in times.items()}
        result[f"nice_{nice}"] = {
            "times_s": times,
            "median_s": med,
            "cached_delay": med["cached_beside"] / med["cached_alone"],
            "first_delay": med["first_beside"] / med["first_alone"],
            "prefetch_encodes": encoded.value,
        }
    httpd.close()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clicks", type=int, default=6)
    p.add_argument("--first-clicks", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server and of the prefetch")
    p.add_argument(
        "--runtime",
        choices=["torch", "openvino"],
        default="torch",
        help="the image encoder's runtime in both processes (default: torch)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu, load = machine()
    r = run(args.clicks, args.first_clicks, args.threads, args.runtime)
    result = {
        "model": "hiera-tiny (random init), 1024 px input",
        "encoder_runtime": args.runtime,
        "image": "1024x768 JPEG over loopback HTTP",
        "torch_threads": args.threads,
        "cpu": cpu,
        "load_before": load,
        **r,
        "load_after": machine()[1],
    }
    rows = [("machine", cpu, f"load average {load}"), ("image encoder runtime", args.runtime, "")]
    for nice in (19, 0):
        v = r[f"nice_{nice}"]
        m = v["median_s"]
        title = (
            "prefetch at nice 19 (as PREFETCH_TASKS runs it)"
            if nice == 19
            else "prefetch at nice 0 (contrast)"
        )
        rows += [
            (title, "", f"{v['prefetch_encodes']} images encoded meanwhile"),
            ("  cached click, prefetch paused (median)", f"{m['cached_alone']:.3f} s", ""),
            (
                "  cached click, prefetch encoding (median)",
                f"{m['cached_beside']:.3f} s",
                f"{v['cached_delay']:.2f}x",
            ),
            ("  first click on a new image, paused", f"{m['first_alone']:.2f} s", ""),
            (
                "  first click on a new image, encoding",
                f"{m['first_beside']:.2f} s",
                f"{v['first_delay']:.2f}x",
            ),
        ]
    rows.append(("load average after", result["load_after"], ""))
    out = RESULTS if args.runtime == "torch" else RESULTS.with_name(f"prefetch-{args.runtime}.json")
    report(result, rows, out, value_width=12)


if __name__ == "__main__":
    main()
