"""Scale-out: bulk pre-annotation throughput with 1 and 2 queue workers (`label-studio-sam2 worker`).

Everything real but the weights: a real redis-server (devkit.RedisServer), a real Label Studio
1.23.2 (devkit.lsserver; the workers read tasks and write predictions through its API), worker
processes as deployed, each with ONE torch thread, and a randomly initialised model of the real
hiera-tiny architecture at 1024 px (speed is real, masks are not). Each task is a 1024x768 JPEG
on a loopback media server with one rectangle annotation (boxes mode).

For each worker count the workers are started and wait, with the model loaded, on the queue;
then the run is queued (`JobQueue.start_run`) and timed until every task has its outcome.
Both counts run side by side in one process, on the same tasks (a fresh model_version each, and
no embedding store, so nothing carries over). Target: 2 workers >= 1.7x one.

Label Studio runs on the same machine: on 2 cores it takes CPU from the workers (say so).

    .venv/bin/python -m bench.scale [--tasks 8] [--workers 1 2] [--chunk 2] [--model real-tiny|tiny|DIR]
Prints a table and writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.common import machine, photo, report, serve_directory
from bench.load import model_dir
from devkit import lsserver
from devkit.redis_server import RedisServer

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "scale.json"

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
<RectangleLabels name="box" toName="image"><Label value="object"/></RectangleLabels></View>"""


def make_project(ls, base_url: str, directory: Path, n: int) -> tuple[int, list[int]]:
    tasks = []
    for i in range(n):
        name = f"img{i}.jpg"
        (directory / name).write_bytes(photo(1024, 768, seed=i))
        box = {
            "x": 20.0,
            "y": 25.0,
            "width": 40.0,
            "height": 35.0,
            "rotation": 0,
            "rectanglelabels": ["object"],
        }
        region = {"type": "rectanglelabels", "from_name": "box", "to_name": "image", "value": box}
        region |= {"original_width": 1024, "original_height": 768}
        tasks.append({"data": {"image": f"{base_url}/{name}"}, "annotations": [{"result": [region]}]})
    project = lsserver.create_project(ls, "bench scale", CONFIG)
    imported = ls.client.projects.import_tasks(id=project.id, request=tasks, return_task_ids=True)
    return project.id, list(imported.task_ids)


def cpu_seconds(pids) -> float:
    """User + system CPU seconds the processes have used so far (/proc/PID/stat)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def run_workers(k: int, ls, redis_url: str, model: str, project: int, ids: list[int], chunk: int, logs: Path):
    """(wall seconds, worker CPU seconds) for `k` ready workers to predict and write every task
    of a fresh run."""
    from label_studio_sam2.service.bulk import PreannotateOptions
    from label_studio_sam2.service.jobqueue import JobQueue

    env = {
        **{k_: v for k_, v in os.environ.items() if not k_.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))},
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
        "REDIS_URL": redis_url,
        "EMBEDDING_STORE_DIR": "off",  # nothing carries over from one worker count to the next
        "OMP_NUM_THREADS": "1",
        "LOG_LEVEL": "WARNING",
    }
    procs = []
    for i in range(k):
        log = (logs / f"worker-{k}-{i}.log").open("w")
        cmd = [
            sys.executable,
            "-m",
            "label_studio_sam2",
            "worker",
            "--model",
            model,
            "--device",
            "cpu",
            "--threads",
            "1",
        ]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    queue = JobQueue(redis_url, chunk_tasks=chunk)
    try:
        deadline = time.monotonic() + 600
        while queue.workers() < k:  # registered = model loaded and listening
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"workers did not start; see {logs}")
            time.sleep(0.5)
        options = asdict(PreannotateOptions(mode="boxes"))
        cpu_start = cpu_seconds(p.pid for p in procs)
        start = time.monotonic()
        run = queue.start_run(
            ids,
            project=project,
            label_config=CONFIG,
            options=options,
            model_version=f"bench-scale-{k}w",
            source="bench",
        )
        while True:
            status = queue.status(run.id)
            if status.finished >= status.total:
                break
            time.sleep(0.2)
        seconds = time.monotonic() - start
        cpu = cpu_seconds(p.pid for p in procs) - cpu_start
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    if status.counts.get("done") != len(ids):
        raise SystemExit(f"{k} worker(s): {status.line()}; see {logs}")
    return seconds, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chunk", type=int, default=2, help="tasks per job (JOB_CHUNK_TASKS)")
    p.add_argument("--model", default="real-tiny", help="real-tiny | tiny | a directory / model name")
    args = p.parse_args()
    cpu, load_before = machine()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp = Path(tmp)
        model = model_dir(args.model, tmp)
        media_dir = tmp / "media"
        media_dir.mkdir()
        server, base_url = serve_directory(str(media_dir))
        redis = RedisServer(tmp / "redis").start()
        ls = lsserver.start_label_studio(tmp / "ls", log_path=tmp / "label-studio.log")
        try:
            project, ids = make_project(ls, base_url, media_dir, args.tasks)
            measured = {
                k: run_workers(k, ls, redis.url, model, project, ids, args.chunk, tmp) for k in args.workers
            }
        finally:
            ls.stop()
            redis.close()
            server.close()
    _, load_after = machine()
    seconds = {k: m[0] for k, m in measured.items()}
    cpu_per_task = {k: m[1] / len(ids) for k, m in measured.items()}
    per_s = {k: len(ids) / s for k, s in seconds.items()}
    base = per_s[min(per_s)]
    result = {
        "model": f"{args.model} (random weights, real architecture at 1024 px)"
        if args.model == "real-tiny"
        else args.model,
        "image": "1024x768 JPEG, one rectangle (boxes mode)",
        "torch_threads": "1 per worker",
        "cpu": cpu,
        "load_before": load_before,
        "load_after": load_after,
        "tasks": len(ids),
        "chunk_tasks": args.chunk,
        "seconds": seconds,
        "tasks_per_s": per_s,
        "s_per_task_per_worker": {k: s * k / len(ids) for k, s in seconds.items()},
        # the workers' own CPU per task: the same for 1 and 2 workers means nothing in the queue
        # costs extra per worker; on k free cores, k workers would reach k / this tasks/s
        "worker_cpu_s_per_task": cpu_per_task,
        "speedup": {k: v / base for k, v in per_s.items()},
    }
    rows = [
        (
            f"{k} worker(s)",
            f"{per_s[k]:.3f} task/s",
            f"{seconds[k]:.1f} s, {per_s[k] / base:.2f}x; worker CPU {cpu_per_task[k]:.2f} s/task",
        )
        for k in per_s
    ]
    rows.append(("target", "2 workers >= 1.7x", f"{cpu}; load {load_before} -> {load_after}"))
    report(result, rows, RESULTS, value_width=13)


if __name__ == "__main__":
    main()
