"""The built image, run as a team runs it (`make image-test`; the image itself is `make image`).

No Docker engine here: buildah runs the image's commands with chroot isolation on the host's
network, so Label Studio, redis-server and the image's processes meet on loopback ports.

- The server: the image's own command (its CMD, gunicorn with deploy/gunicorn.conf.py) as the
  image's own user (its USER, uid 10001), connected to the real Label Studio: a click gives a
  mask of the clicked object, "Retrieve predictions" stores one, and /metrics counts them; the
  image's HEALTHCHECK command passes while it serves and fails once it has stopped.
- The worker: `python -m label_studio_sam2 worker` from the same image against a real redis-server
  finishes a task queued by `preannotate --queue`.
- Every process the image ran is gone once it is stopped.

The image holds no weights: the tiny trained test model is made by the checkout and mounted
read-only. Deselected from plain `pytest` (marker `image`): `make image-test` builds the image
first and runs this with `-m image`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from devkit import lsserver
from devkit.redis_server import RedisServer
from devkit.sample_media import keypoint, make_scene, rectangle
from tests.e2e.regions import IMAGE_CONFIG, brush_masks, object_iou

pytestmark = [pytest.mark.e2e, pytest.mark.image]

IMAGE = os.environ.get("SAM2_IMAGE", "label-studio-sam2:cpu")
MODEL_IN_IMAGE = "/models/sam2-shapes"


def buildah(*args: str, timeout: float = 120) -> str:
    out = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"buildah {' '.join(args)}:\n{out.stderr}"
    return out.stdout.strip()


@pytest.fixture(scope="module")
def image_config() -> dict:
    """The image's config (Cmd, User, Env, WorkingDir) as built by `make image`."""
    if shutil.which("buildah") is None:
        pytest.fail(
            "buildah is not installed: `make image-test` installs Debian's buildah and builds the image"
        )
    out = subprocess.run(
        ["buildah", "inspect", "--type", "image", IMAGE], capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        pytest.fail(f"no image {IMAGE} in buildah's store: `make image` builds it\n{out.stderr}")
    image = json.loads(out.stdout)
    return {**image["OCIv1"]["config"], "Healthcheck": image["Docker"]["config"].get("Healthcheck")}


@pytest.fixture(scope="module")
def model_dir(backend_model_dir) -> Path:
    """The trained tiny model, readable by the image's unprivileged user."""
    for path in [backend_model_dir, *backend_model_dir.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
    return backend_model_dir


class Container:
    """A working container of the image; `run()` starts one of its commands in the background."""

    def __init__(self, name: str):
        self.id = buildah("from", "--pull=never", "--name", f"sam2-image-test-{name}-{os.getpid()}", IMAGE)
        self.processes: list[subprocess.Popen] = []

    def run(
        self, command: list[str], env: dict[str, str], volumes: list[str], log_path: Path
    ) -> subprocess.Popen:
        args = ["buildah", "run", "--isolation", "chroot"]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        for volume in volumes:
            args += ["--volume", volume]
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [*args, self.id, "--", *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def remove(self) -> None:
        for process in self.processes:
            stop(process)
        subprocess.run(["buildah", "rm", self.id], capture_output=True, timeout=60)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 40) -> int:
    """Signal the process group (buildah and what it runs), SIGKILL it if it outlives timeout_s."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return process.wait(10)


def descendants(pid: int) -> dict[int, tuple[str, int]]:
    """pid -> (command line, real uid) of every live process below `pid` (one PID namespace:
    chroot isolation does not hide them)."""
    procs: dict[int, tuple[int, str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        ppid = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
        procs[int(entry.name)] = (ppid, cmdline, uid)
    found: dict[int, tuple[str, int]] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, cmdline, uid) in procs.items():
            if ppid == parent and child not in found:
                found[child] = (cmdline, uid)
                frontier.append(child)
    return found


def wait_for(what: str, condition, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s; log:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.findall(rf"^{re.escape(name)}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    assert len(found) == 1, f"{name}{labels} in:\n{text}"
    return float(found[0])


def ls_env(ls) -> dict[str, str]:
    return {
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
        "SAM2_MODEL": MODEL_IN_IMAGE,
        "DEVICE": "cpu",
    }


def test_the_images_gunicorn_serves_label_studio_as_its_unprivileged_user(
    label_studio, image_config, model_dir, tmp_path
):
    ls = label_studio
    assert image_config["User"] == "10001:10001"
    cmd = image_config["Cmd"]
    assert cmd[0] == "gunicorn" and "deploy/gunicorn.conf.py" in cmd
    port = lsserver.free_port()
    log_path = tmp_path / "image-server.log"
    # the /models volume, prepared ahead as docs/deployment.md says: `warm --model-only` converts the
    # image encoder for OpenVINO (the image's default runtime on a CPU) into it
    models = tmp_path / "models"
    models.mkdir()
    models.chmod(0o777)  # the image's unprivileged user writes there, as into a Docker volume
    volumes = [f"{model_dir}:{MODEL_IN_IMAGE}:ro", f"{models}:/models"]
    prepare = Container("prepare")
    try:
        warm = prepare.run(
            ["label-studio-sam2", "warm", "--model-only"], ls_env(ls), volumes, tmp_path / "prepare.log"
        )
        assert warm.wait(300) == 0, (tmp_path / "prepare.log").read_text()[-4000:]
    finally:
        prepare.remove()
    prepared = (tmp_path / "prepare.log").read_text()
    assert "encoder runtime openvino: encoder OpenVINO" in prepared, prepared[-4000:]
    assert list(models.glob("openvino/*/manifest.json")), prepared[-4000:]
    container = Container("server")
    try:
        # the image's command and user as configured: no --user, no command of ours
        server = container.run(
            cmd,
            {**ls_env(ls), "HOST": "127.0.0.1", "PORT": str(port), "WORKERS": "1", "PREFETCH_TASKS": "0"},
            volumes,
            log_path,
        )
        url = f"http://127.0.0.1:{port}"
        wait_for("gunicorn in the image answered /health", lambda: _up(url, server), 180, log_path)
        health = requests.get(f"{url}/health", timeout=5).json()
        assert health["encoder_runtime"] == "openvino" and health["device"] == "cpu", health
        assert "loaded from the cache" in log_path.read_text()  # the volume's conversion, not a new one
        processes = descendants(server.pid)
        # buildah's chroot runtime, its exec helper, then gunicorn's master and worker
        gunicorns = {
            pid: uid
            for pid, (cmdline, uid) in processes.items()
            if "bin/gunicorn" in cmdline and not cmdline.startswith("buildah")
        }
        assert len(gunicorns) >= 2, processes  # the master and its worker
        assert set(gunicorns.values()) == {10001}, processes

        media = tmp_path / "media"
        media.mkdir()
        scenes = [make_scene(media / "a.png", 96, 72, seed=1), make_scene(media / "b.jpg", 80, 60, seed=2)]
        project = lsserver.create_project(ls, "SAM2 image E2E", IMAGE_CONFIG)
        tasks = [ls.upload(project.id, s.path) for s in scenes]
        ml = lsserver.connect_backend(ls, project.id, url)

        # a click in the labeling UI
        data = lsserver.predict_interactive(ls, ml.id, tasks[0]["id"], [keypoint(scenes[0])])
        [mask] = brush_masks(data["result"], scenes[0].width, scenes[0].height)
        assert object_iou(mask, scenes[0]) >= 0.8, "the mask is not the clicked object"

        # "Retrieve predictions" on the second task, from its box annotation
        region = rectangle(scenes[1])
        del region["origin"]
        ls.client.annotations.create(id=tasks[1]["id"], result=[region], ground_truth=False)
        lsserver.retrieve_predictions(ls, project.id, [tasks[1]["id"]])
        stored = [p for p in lsserver.predictions(ls, tasks[1]["id"]) if p.model_version.startswith("sam2")]
        assert stored, "no sam2 prediction stored by Retrieve predictions"
        [mask] = brush_masks(stored[-1].result, scenes[1].width, scenes[1].height)
        assert object_iou(mask, scenes[1]) >= 0.8

        text = requests.get(f"{url}/metrics", timeout=10).text
        assert metric(text, "sam2_requests_total", endpoint="/predict", outcome="ok") >= 2
        assert metric(text, "sam2_tasks_total", outcome="ok") >= 2

        # the image's HEALTHCHECK, run in the container beside the server, as Docker would
        kind, *health = image_config["Healthcheck"]["Test"]
        assert kind == "CMD"
        check = container.run(health, {"PORT": str(port)}, [], tmp_path / "healthcheck.log")
        assert check.wait(60) == 0, (tmp_path / "healthcheck.log").read_text()

        # what `docker stop` does: SIGTERM to the container's command, gunicorn's master
        [master] = [pid for pid in gunicorns if _parent(pid) not in gunicorns]
        os.kill(master, signal.SIGTERM)
        assert server.wait(60) == 0, log_path.read_text()[-4000:]  # gunicorn exits cleanly
        left = {pid: cmdline for pid, (cmdline, _) in processes.items() if Path(f"/proc/{pid}").exists()}
        assert not left, f"still running after the image's server stopped: {left}"
        check = container.run(health, {"PORT": str(port)}, [], tmp_path / "healthcheck-down.log")
        assert check.wait(60) != 0, "the HEALTHCHECK passed with no server"
    finally:
        container.remove()
    log = log_path.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]


def _parent(pid: int) -> int:
    return int(re.search(r"^PPid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))


def _up(url: str, server: subprocess.Popen) -> bool:
    assert server.poll() is None, "the image's server exited"
    try:
        return requests.get(f"{url}/health", timeout=2).json().get("model_loaded") is True
    except (requests.RequestException, ValueError):
        return False


def test_the_images_worker_finishes_a_queued_task(label_studio, image_config, model_dir, tmp_path):
    ls = label_studio
    media = tmp_path / "media"
    media.mkdir()
    scene = make_scene(media / "queued.png", 96, 72, seed=3)
    project = lsserver.create_project(ls, "SAM2 image queue", IMAGE_CONFIG)
    [task] = [ls.upload(project.id, scene.path)]
    region = rectangle(scene)
    del region["origin"]
    ls.client.annotations.create(id=task["id"], result=[region], ground_truth=False)

    redis = RedisServer(tmp_path / "redis").start()
    container = Container("worker")
    log_path = tmp_path / "image-worker.log"
    cli = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))}
        cli = subprocess.Popen(  # the checkout's CLI queues the project and follows the run
            [
                sys.executable,
                "-m",
                "label_studio_sam2",
                "preannotate",
                "--project",
                str(project.id),
                "--queue",
            ],
            env={**env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token, "REDIS_URL": redis.url},
            cwd=lsserver.REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        first = cli.stdout.readline()
        assert first.startswith("queued 1 task(s)") and "0 worker(s) listening" in first, first
        assert lsserver.prediction_counts(ls, project.id) == {task["id"]: 0}

        worker = container.run(
            ["python", "-m", "label_studio_sam2", "worker", "--burst"],
            {**ls_env(ls), "REDIS_URL": redis.url},
            [f"{model_dir}:{MODEL_IN_IMAGE}:ro"],
            log_path,
        )
        assert worker.wait(300) == 0, log_path.read_text()[-4000:]  # --burst: exits once the queue is empty
        out, _ = cli.communicate(timeout=60)  # the run it followed is finished
        assert cli.returncode == 0 and " 0 failed" in out, first + out
    finally:
        if cli is not None:
            stop(cli)
        container.remove()
        redis.close()
    assert lsserver.prediction_counts(ls, project.id) == {task["id"]: 1}
    [prediction] = lsserver.predictions(ls, task["id"])
    [mask] = brush_masks(prediction.result, scene.width, scene.height)
    assert object_iou(mask, scene) >= 0.8
