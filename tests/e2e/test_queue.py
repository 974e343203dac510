"""The job queue end to end: a real redis-server, real Label Studio 1.23.2, real worker processes
(`python -m label_studio_sam2 worker`), the real CLI.

- Two workers take a 40-task project queued by `preannotate --queue`; one is killed with SIGKILL
  mid-run: its chunk comes back after the (shortened) job lease, and every task ends with exactly
  one prediction, counted through the Label Studio API.
- A "Retrieve predictions" handed to the queue survives the server: the server is stopped, then a
  worker writes the predictions. That worker gets SIGTERM after its first task: it finishes the
  task, hands the rest of its chunk back and exits; a second worker finishes the run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devkit import lsserver
from devkit.media_server import MediaServer
from devkit.sample_media import make_scene, rectangle

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
  <RectangleLabels name="box" toName="image"><Label value="object"/></RectangleLabels>
</View>"""

# the media host is on loopback beside Label Studio: only Label Studio's own port is trusted
MEDIA_HOSTS = "127.0.0.1"
LEASE_S = 3  # JOB_LEASE_S: a killed worker's chunk is requeued within 2 x this


@pytest.fixture
def media(tmp_path):
    """Images served after 0.1 s each: a chunk of 4 lasts long enough to be cut in the middle."""
    server = MediaServer(tmp_path / "media", delay_s=0.1).serve_files()
    yield tmp_path / "media", server.url
    server.close()


def make_project(ls, media, title: str, n: int):
    """A project of `n` scenes on the media host, each with one rectangle annotation."""
    root, base = media
    root.mkdir(parents=True, exist_ok=True)
    project = lsserver.create_project(ls, title, CONFIG)
    tasks = []
    for i in range(n):
        scene = make_scene(root / f"{title}-{i}.png", seed=i)
        tasks.append(
            {"data": {"image": f"{base}/{scene.path.name}"}, "annotations": [{"result": [rectangle(scene)]}]}
        )
    imported = ls.client.projects.import_tasks(id=project.id, request=tasks, return_task_ids=True)
    return project, imported.task_ids


def env(ls, redis_url: str, **extra) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))}
    return {
        **base,
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
        "REDIS_URL": redis_url,
        "JOB_LEASE_S": str(LEASE_S),
        "PYTHONUNBUFFERED": "1",
        "MEDIA_ALLOWED_HOSTS": MEDIA_HOSTS,
        **extra,
    }


def start_worker(ls, redis_url, model_dir, log_path: Path, *extra) -> subprocess.Popen:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "label_studio_sam2",
                "worker",
                "--model",
                str(model_dir),
                "--device",
                "cpu",
            ]
            + ["--threads", "1", *extra],
            env=env(ls, redis_url),
            cwd=lsserver.REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_for(what: str, condition, timeout_s: float, logs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}\n{Path(p).read_text()[-3000:]}" for p in logs)
            raise AssertionError(f"{what} within {timeout_s} s\n{tails}")
        time.sleep(0.2)


def mid_chunk(log_path: Path) -> bool:
    """The worker's log shows a job taken (RQ logs "<queue>: <description> (<id>)") and no "Job OK"
    for it yet."""
    text = log_path.read_text()
    started = text.rfind("sam2: preannotate project")
    return started != -1 and text.rfind("Job OK (") < started


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_two_workers_one_killed_mid_run_every_task_predicted_once(
    label_studio, backend_model_dir, redis_server, media, tmp_path
):
    ls = label_studio
    project, task_ids = make_project(ls, media, "queue kill", 40)
    cli = subprocess.Popen(
        [sys.executable, "-m", "label_studio_sam2", "preannotate", "--project", str(project.id), "--queue"],
        env=env(ls, redis_server.url, JOB_CHUNK_TASKS="4"),
        cwd=lsserver.REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    workers = [start_worker(ls, redis_server.url, backend_model_dir, p) for p in logs]
    try:
        wait_for(
            "the workers predicted 6 tasks",
            lambda: sum(lsserver.prediction_counts(ls, project.id).values()) >= 6,
            90,
            logs,
        )
        # Kill worker A mid-chunk (chunks of 4 take ~1.5 s): it took a job and has not finished it.
        # Killed between jobs it abandons nothing, and there is nothing to requeue.
        wait_for("worker A is in the middle of a chunk", lambda: mid_chunk(logs[0]), 60, logs)
        workers[0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        workers[0].wait(10)
        out, _ = cli.communicate(timeout=120)
        finished_after_kill = time.monotonic() - killed_at
    finally:
        for p in [*workers, cli]:
            stop(p)
    assert cli.returncode == 0, out
    assert "queued 40 task(s)" in out and "(10 job(s))" in out, out
    assert "40 task(s) selected" in out and " 0 failed" in out, out
    counts = lsserver.prediction_counts(ls, project.id)
    assert counts == {t: 1 for t in task_ids}, counts  # every task exactly once
    survivor = logs[1].read_text()
    assert "abandoned by its worker" in survivor and "requeued" in survivor, survivor[-3000:]
    print(f"run finished {finished_after_kill:.1f} s after the kill (lease {LEASE_S} s)")


def test_a_queued_retrieve_survives_the_server_and_sigterm_finishes_the_task(
    label_studio, backend_model_dir, redis_server, media, tmp_path
):
    ls = label_studio
    project, task_ids = make_project(ls, media, "queue restart", 8)
    server = lsserver.start_backend(
        backend_model_dir,
        ls,
        log_path=tmp_path / "server.log",
        extra_env={
            "PREDICT_DEADLINE_S": "0.5",
            "RETRIEVE_MODE": "boxes",
            "REDIS_URL": redis_server.url,
            "MEDIA_ALLOWED_HOSTS": MEDIA_HOSTS,
            "EMBEDDING_STORE_DIR": "off",
        },
    )
    try:
        lsserver.connect_backend(ls, project.id, server.url)
        lsserver.retrieve_predictions(ls, project.id, task_ids)
        wait_for("the hand-off was queued", lambda: "queued as run" in server.log(), 30, [server.log_path])
    finally:
        server.stop()
    in_request = sum(lsserver.prediction_counts(ls, project.id).values())
    assert in_request < len(task_ids)
    assert "0 worker(s) listening" in server.log() and "no worker is listening" in server.log()

    first_log, second_log = tmp_path / "worker-1.log", tmp_path / "worker-2.log"
    first = start_worker(ls, redis_server.url, backend_model_dir, first_log)
    try:
        wait_for(
            "the worker predicted a task",
            lambda: sum(lsserver.prediction_counts(ls, project.id).values()) > in_request,
            90,
            [first_log],
        )
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0, first_log.read_text()[-3000:]
    finally:
        stop(first)
    log = first_log.read_text()
    assert "stopping after the current task" in log and "handed back to the queue" in log, log[-3000:]
    [cut] = re.findall(r"job (\S+) stopped part way", log)
    assert not [line for line in log.splitlines() if "Job OK" in line and cut in line], log[-3000:]
    after_sigterm = lsserver.prediction_counts(ls, project.id)
    assert all(n <= 1 for n in after_sigterm.values()) and sum(after_sigterm.values()) < len(task_ids)

    second = start_worker(ls, redis_server.url, backend_model_dir, second_log, "--burst")
    try:
        assert second.wait(120) == 0, second_log.read_text()[-3000:]
    finally:
        stop(second)
    assert lsserver.prediction_counts(ls, project.id) == {t: 1 for t in task_ids}


def test_ctrl_c_stops_following_not_the_jobs(label_studio, redis_server, media):
    ls = label_studio
    project, _ = make_project(ls, media, "queue follow", 3)
    cli = [sys.executable, "-m", "label_studio_sam2", "preannotate", "--project", str(project.id)]
    proc = subprocess.Popen(
        [*cli, "--queue"],
        env=env(ls, redis_server.url),
        cwd=lsserver.REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = proc.stdout.readline()  # no worker runs: it follows until interrupted
        assert first.startswith("queued 3 task(s)") and "0 worker(s) listening" in first, first
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == 130 and "stopped following; the jobs go on" in out, out
    status = subprocess.run(
        [*cli, "--status"],
        env=env(ls, redis_server.url),
        cwd=lsserver.REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0 and "0/3 tasks" in status.stdout and "jobs: 1 queued" in status.stdout, (
        status
    )
