"""Load: simulated labelers clicking on their own images against the backend under gunicorn.

The server runs as it is deployed (deploy/gunicorn.conf.py, label_studio_sam2.labelstudio.wsgi:app) on loopback, with a
randomly initialised model of the real hiera-tiny architecture at 1024 px by default (latency is
real, mask quality is not measured). Each labeler has a task and an image of its own and clicks
through a cycle of prompts (1 click, 2 clicks, 3 clicks with a negative one), with think time
between clicks, for `--duration` seconds; a 503 (queue full) is retried after its Retry-After,
as a person clicking again would.

Measured:
- click latency p50 / p95 / max, from the first attempt to the answer, retries included;
- errors (anything but a mask: HTTP errors, task errors, exceptions): target 0;
- cross-talk: every mask must equal the one the same prompts gave with one labeler alone
  (measured first, sequentially, on the same server): target 0;
- RSS of the gunicorn processes at the start and the end of the load (flat: nothing grows per click);
- the first click on each image (the encoder) during the single-labeler pass.

    .venv/bin/python -m bench.load [--users 8] [--duration 60] [--model real-tiny|tiny|DIR]
        [--workers 1] [--threads 8] [--queue 6] [--think-s 1.0] [--torch-threads 2] [--malloc-arenas 2]
Prints a table and writes bench/results/load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

from bench.common import photo, serve_directory
from devkit.lsserver import free_port

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "load.json"

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="object"/></KeyPointLabels></View>"""

# One labeler's cycle on its object: points in percent of the image, (x, y, positive).
CYCLE = [
    [(30, 40, True)],
    [(30, 40, True), (60, 55, True)],
    [(30, 40, True), (60, 55, True), (80, 20, False)],
]


# --- fixtures: model, images, server ---------------------------------------------------------------


def model_dir(spec: str, workdir: Path) -> str:
    """A directory the server can load: `real-tiny` (random weights, real architecture),
    `tiny` (the test model), or an existing directory / model spec passed through."""
    if spec not in ("real-tiny", "tiny"):
        return spec
    import torch

    from label_studio_sam2.engine.models import real_config, write_test_model

    out = workdir / spec
    if spec == "tiny":
        return str(write_test_model(out))
    from transformers import Sam2VideoModel

    torch.manual_seed(0)
    Sam2VideoModel(real_config()).eval().save_pretrained(out)
    return str(out)


class Gunicorn:
    """The backend as deployed, in a subprocess; stopped with SIGTERM (graceful)."""

    def __init__(self, model: str, args, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))},
            "SAM2_MODEL": model,
            "DEVICE": args.device,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WORKERS": str(args.workers),
            "THREADS": str(args.threads),
            "ADMISSION_QUEUE_SIZE": str(args.queue),
            "TORCH_THREADS": str(args.torch_threads),
            "OMP_NUM_THREADS": str(args.torch_threads),
            "EMBEDDING_CACHE_MB": "2048",
            **({"MALLOC_ARENA_MAX": str(args.malloc_arenas)} if args.malloc_arenas > 0 else {}),
            "ACCESS_LOG": "0",
            "LOG_LEVEL": "WARNING",
        }
        self.log = log_path.open("w")
        gunicorn = Path(sys.executable).with_name("gunicorn")
        self.proc = subprocess.Popen(
            [str(gunicorn), "-c", "deploy/gunicorn.conf.py", "label_studio_sam2.labelstudio.wsgi:app"],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 300) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).json().get("model_loaded"):
                    return time.monotonic() - start
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the model did not load in {timeout_s:.0f} s; see {self.log.name}")

    def pids(self) -> list[int]:
        """The master and its workers."""
        pids = [self.proc.pid]
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            pids += [int(c) for c in children]
        except OSError:
            pass
        return pids

    def rss_mb(self) -> dict[str, float]:
        out = {}
        for i, pid in enumerate(self.pids()):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            out["master" if i == 0 else f"worker {pid}"] = kb / 1024
        return out

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


# --- labelers ---------------------------------------------------------------------------------------


def body(url: str, task_id: int, width: int, height: int, step: int) -> dict:
    regions = [
        {
            "id": f"u{task_id}p{i}",
            "type": "keypointlabels",
            "from_name": "kp",
            "to_name": "image",
            "original_width": width,
            "original_height": height,
            "is_positive": positive,
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["object"]},
        }
        for i, (x, y, positive) in enumerate(CYCLE[step])
    ]
    return {
        "tasks": [{"id": task_id, "data": {"image": url}}],
        "project": "1.1",
        "label_config": CONFIG,
        "params": {"context": {"result": regions}},
    }


class Outcome:
    def __init__(self):
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.mismatches = 0
        self.busy = 0  # 503s retried
        self.lock = threading.Lock()


def click(session: requests.Session, server: str, payload: dict, out: Outcome, give_up_at: float):
    """One click as a labeler makes it: retried after Retry-After on 503. Returns the mask (RLE)."""
    start = time.perf_counter()
    while True:
        try:
            r = session.post(f"{server}/predict", json=payload, timeout=120)
        except requests.RequestException as e:
            with out.lock:
                out.errors.append(type(e).__name__)
            return None
        if r.status_code == 503 and time.monotonic() < give_up_at:
            with out.lock:
                out.busy += 1
            time.sleep(float(r.headers.get("Retry-After", "1")))
            continue
        break
    latency = time.perf_counter() - start
    entry = r.json()["results"][0] if r.status_code == 200 else None
    if entry is None or entry.get("error") or not entry["result"]:
        with out.lock:
            out.errors.append(f"HTTP {r.status_code}: {(entry or {}).get('error') or r.text[:100]}")
        return None
    with out.lock:
        out.latencies.append(latency)
    return entry["result"][0]["value"]["rle"]


def labeler(user, server, reference, out: Outcome, stop_at: float, think_s: float, seed: int):
    rng = random.Random(seed)
    session = requests.Session()
    step = 0
    while time.monotonic() < stop_at:
        rle = click(session, server, body(*user, step), out, give_up_at=stop_at + 30)
        if rle is not None and rle != reference[(user[1], step)]:
            with out.lock:
                out.mismatches += 1
        step = (step + 1) % len(CYCLE)
        time.sleep(think_s * rng.uniform(0.5, 1.5))


# --- the run -----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run(args) -> dict:
    load_before = os.getloadavg()[0]  # other work on the machine skews every latency below
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        model = model_dir(args.model, tmp_path)
        print(f"model {args.model}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
        images = tmp_path / "images"
        images.mkdir()
        users = []
        for u in range(args.users):
            w, h = args.width + 8 * u, args.height + 4 * u  # every labeler's image differs, in size too
            (images / f"u{u}.jpg").write_bytes(photo(w, h, seed=u))
            users.append((u, 1000 + u, w, h))
        httpd, media = serve_directory(images)
        users = [(f"{media}/u{u}.jpg", task_id, w, h) for u, task_id, w, h in users]

        server = Gunicorn(model, args, tmp_path / "gunicorn.log")
        try:
            load_s = server.wait_ready()
            print(f"gunicorn up, model loaded in {load_s:.1f} s", flush=True)

            # single labeler, one after the other: the reference masks, and the encoder's first clicks
            reference: dict = {}
            first_clicks, session, alone = [], requests.Session(), Outcome()
            for user in users:
                for step in range(len(CYCLE)):
                    start = time.perf_counter()
                    rle = click(session, server.url, body(*user, step), alone, time.monotonic() + 300)
                    if step == 0:
                        first_clicks.append(time.perf_counter() - start)
                    if rle is None:
                        raise RuntimeError(f"single-labeler click failed: {alone.errors[-1]}")
                    reference[(user[1], step)] = rle
            print(
                f"reference masks: {len(reference)}; first clicks p50 {statistics.median(first_clicks):.2f} s"
            )

            rss_start = server.rss_mb()
            out = Outcome()
            stop_at = time.monotonic() + args.duration
            threads = [
                threading.Thread(
                    target=labeler,
                    args=(user, server.url, reference, out, stop_at, args.think_s, i),
                    daemon=True,
                )
                for i, user in enumerate(users)
            ]
            samples: list[tuple[float, float]] = []  # (seconds into the load, RSS MB)
            load_start = time.monotonic()
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                samples.append((time.monotonic() - load_start, sum(server.rss_mb().values())))
                time.sleep(2.0)
                if time.monotonic() > stop_at + 150:
                    out.errors.append("a labeler did not finish within 150 s of the end")
                    break
            elapsed = time.monotonic() - (stop_at - args.duration)
            rss_end = server.rss_mb()
            metrics = requests.get(f"{server.url}/metrics", timeout=5).text
        finally:
            rc = server.stop()
            httpd.close()

    lat = out.latencies
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "config": {
            "users": args.users,
            "duration_s": args.duration,
            "think_s": args.think_s,
            "model": args.model,
            "device": args.device,
            "workers": args.workers,
            "threads": args.threads,
            "queue": args.queue,
            "torch_threads": args.torch_threads,
            "malloc_arena_max": args.malloc_arenas or "glibc default",
            "image": f"{args.width}x{args.height} (+8x4 px per labeler)",
        },
        "model_load_s": round(load_s, 2),
        "first_click_s": {
            "p50": round(statistics.median(first_clicks), 3),
            "max": round(max(first_clicks), 3),
        },
        "clicks": len(lat),
        "clicks_per_s": round(len(lat) / elapsed, 2),
        "click_latency_s": {
            "p50": round(percentile(lat, 50), 3),
            "p95": round(percentile(lat, 95), 3),
            "max": round(max(lat), 3) if lat else None,
        },
        "busy_503_retried": out.busy,
        "errors": len(out.errors),
        "error_samples": sorted(set(out.errors))[:5],
        "cross_talk": out.mismatches,
        "rss_mb": {
            "start": round(sum(rss_start.values()), 1),
            "end": round(sum(rss_end.values()), 1),
            # where it stands once every labeler has clicked a while: growth after this is a leak
            "after_first_quarter": round(_rss_at(samples, args.duration / 4), 1),
            "max_during": round(max(v for _, v in samples), 1) if samples else None,
            "timeline": [(round(t, 1), round(v, 1)) for t, v in samples],
            "per_process_end": {k: round(v, 1) for k, v in rss_end.items()},
        },
        "encoder_calls": _metric(metrics, 'sam2_model_seconds_count{part="encoder"}'),
        "gunicorn_exit_code": rc,
    }
    return result


def _rss_at(samples: list[tuple[float, float]], t: float) -> float:
    later = [v for s, v in samples if s >= t]
    return later[0] if later else float("nan")


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def table(r: dict) -> str:
    c = r["config"]
    rows = [
        ("labelers x duration", f"{c['users']} x {c['duration_s']:g} s, think {c['think_s']:g} s"),
        (
            "server",
            f"gunicorn {c['workers']} worker(s) x {c['threads']} threads, queue {c['queue']}, {c['device']}",
        ),
        ("model", f"{c['model']}, torch threads {c['torch_threads']}, arenas {c['malloc_arena_max']}"),
        (
            "machine",
            f"{r['machine']['cpus']} CPUs, load average {r['machine']['load_average_before_after'][0]}",
        ),
        ("first click (encoder), p50", f"{r['first_click_s']['p50']:.2f} s"),
        ("clicks answered", f"{r['clicks']} ({r['clicks_per_s']:.2f}/s)"),
        ("click latency p50", f"{r['click_latency_s']['p50']:.3f} s"),
        ("click latency p95", f"{r['click_latency_s']['p95']:.3f} s"),
        ("click latency max", f"{r['click_latency_s']['max']:.3f} s"),
        ("503 busy, retried", str(r["busy_503_retried"])),
        ("errors (target 0)", str(r["errors"])),
        ("cross-talk (target 0)", str(r["cross_talk"])),
        (
            "RSS start -> 1/4 -> end",
            f"{r['rss_mb']['start']:.0f} -> {r['rss_mb']['after_first_quarter']:.0f} -> {r['rss_mb']['end']:.0f} MB",
        ),
        (
            "encoder calls (all phases)",
            f"{r['encoder_calls']:g}" if r["encoder_calls"] is not None else "n/a",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{width}} | {v} |" for k, v in rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (bounded)")
    p.add_argument("--think-s", type=float, default=1.0, help="mean pause between a labeler's clicks")
    p.add_argument("--model", default="real-tiny", help="real-tiny | tiny | a directory / model name")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--queue", type=int, default=6, help="ADMISSION_QUEUE_SIZE per worker")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--width", type=int, default=800)
    p.add_argument("--height", type=int, default=600)
    p.add_argument(
        "--malloc-arenas",
        type=int,
        default=int(os.environ.get("MALLOC_ARENA_MAX", "2")),
        help="MALLOC_ARENA_MAX for the server, as the Dockerfile sets it (0: glibc's default, 8 per core)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    result = run(args)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    print(f"wrote {args.out}")
    if result["errors"] or result["cross_talk"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
