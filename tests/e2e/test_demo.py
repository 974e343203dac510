"""`make run` as a user meets it: the demo's banner, and a demo that survives its own token.

Label Studio allows one personal access token per user; a user who revokes the demo's (to get a
copyable one) must not break the running demo or the next `make run`. The demo runs as a real
process (tools/demo.py with the trained test model) on its own Label Studio data dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from devkit import lsserver
from devkit.sample_media import keypoint, make_scene
from tests.e2e.regions import brush_masks, object_iou

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BANNER_END = "Ctrl-C stops both servers."


class Demo:
    """tools/demo.py in its own process group; its output goes to a file read as it grows."""

    def __init__(self, run_dir: Path, ls_port: int, backend_port: int):
        self.run_dir = run_dir
        self.ls_url = f"http://127.0.0.1:{ls_port}"
        self.out = run_dir / f"demo-{time.monotonic_ns()}.out"
        run_dir.mkdir(parents=True, exist_ok=True)
        with self.out.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "tools/demo.py", "--test-model", "--run-dir", str(run_dir)]
                + ["--port", str(ls_port), "--backend-port", str(backend_port)],
                cwd=lsserver.REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float, after: int = 0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.output()[after:]:
            assert self.process.poll() is None, (
                f"the demo exited ({self.process.returncode}):\n{self.output()}"
            )
            assert time.monotonic() < deadline, (
                f"no {text!r} from the demo in {timeout_s} s:\n{self.output()}"
            )
            time.sleep(0.5)

    @property
    def token(self) -> str:
        return json.loads((self.run_dir / "label-studio" / lsserver.CREDENTIALS_FILE).read_text())["token"]

    def stop(self) -> int:
        """Ctrl-C, as a user stops it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return self.process.returncode


def revoke(ls_url: str, token: str) -> None:
    """What "Revoke" in Account & Settings -> Personal Access Token does."""
    access = requests.post(f"{ls_url}/api/token/refresh/", json={"refresh": token}, timeout=10)
    access.raise_for_status()
    response = requests.post(
        f"{ls_url}/api/token/blacklist/",
        json={"refresh": token},
        headers={"Authorization": f"Bearer {access.json()['access']}"},
        timeout=10,
    )
    assert response.status_code == 204, response.text
    assert not lsserver.token_works(ls_url, token)


def browser_login(demo: Demo) -> requests.Session:
    """The demo admin logged in through Label Studio's login form, as a browser holds it."""
    creds = json.loads((demo.run_dir / "label-studio" / lsserver.CREDENTIALS_FILE).read_text())
    session = requests.Session()
    login = f"{demo.ls_url}/user/login/"
    session.get(login, timeout=30)
    session.post(
        login,
        data={
            "email": creds["email"],
            "password": creds["password"],
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
        },
        headers={"Referer": login},
        timeout=30,
    )
    assert logged_in(demo, session)
    return session


def logged_in(demo: Demo, session: requests.Session) -> bool:
    return session.get(f"{demo.ls_url}/api/projects/", timeout=30).status_code == 200


def click_gives_a_mask(demo: Demo, tmp_path: Path) -> None:
    """A click through Label Studio's interactive endpoint on the first sample: the backend
    fetches the uploaded image with the token it was given, so a dead token fails here."""
    from label_studio_sdk import LabelStudio as Client

    client = Client(base_url=demo.ls_url, api_key=demo.token)
    [project] = [p for p in client.projects.list() if p.title == "SAM2 demo"]
    [ml] = client.ml.list(project=project.id)
    task = next(t for t in client.tasks.list(project=project.id) if t.data["image"].endswith("sample-1.png"))
    scene = make_scene(tmp_path / "sample-1.png", 640, 480, seed=100)  # the demo's first sample
    raw = client.ml.with_raw_response.predict_interactive(
        id=ml.id, task=task.id, context={"result": [dict(keypoint(scene), from_name="click")]}
    )
    data = raw.response.json()["data"]
    assert not data.get("error"), data
    [mask] = brush_masks(data["result"], scene.width, scene.height, from_name="mask")
    assert object_iou(mask, scene) >= 0.8


def test_the_demo_survives_a_revoked_token_while_running_and_at_the_next_start(tmp_path):
    run_dir = tmp_path / "run"
    ls_port, backend_port = lsserver.free_port(), lsserver.free_port()
    demo = Demo(run_dir, ls_port, backend_port)
    try:
        demo.wait_for(BANNER_END, 300)
        banner = demo.output()
        assert "Auto-Detect" in banner and "Keep label selected after creating a region" in banner
        assert "Retrieve Predictions" in banner and "Connect Model, with a Name" in banner
        assert f"LABEL_STUDIO_URL={demo.ls_url} " in banner and "-m label_studio_sam2 serve --port " in banner
        assert demo.token not in banner  # where to find it, not the secret itself
        # the video block comes before the last line, which says how to stop
        assert banner.index("Video demo") < banner.index(BANNER_END)
        assert banner.rstrip().endswith(BANNER_END), banner[-300:]
        # the SDK's pager asked Label Studio for a page after the last: a traceback in its log
        assert "Invalid page" not in (run_dir / "label-studio.log").read_text()

        # `make run` again while it runs (e.g. on other ports): refused, the first demo untouched
        second = subprocess.run(
            [sys.executable, "tools/demo.py", "--test-model", "--run-dir", str(run_dir)]
            + ["--port", str(lsserver.free_port()), "--backend-port", str(lsserver.free_port())],
            cwd=lsserver.REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"A demo is already running on {run_dir} (pid {demo.process.pid}" in second.stdout
        assert "--run-dir" in second.stdout and "Traceback" not in second.stdout + second.stderr
        assert demo.process.poll() is None

        session = browser_login(demo)
        first = demo.token
        revoke(demo.ls_url, first)
        seen = len(demo.output())
        demo.wait_for("the backend is back", 180, after=seen)
        assert demo.token != first and lsserver.token_works(demo.ls_url, demo.token)
        assert logged_in(demo, session)  # renewing the token kept the browser's session
        click_gives_a_mask(demo, tmp_path)

        revoke(demo.ls_url, demo.token)  # and then `make run` again
        assert demo.stop() == 0
    finally:
        demo.stop()

    again = Demo(run_dir, ls_port, backend_port)
    try:
        again.wait_for(BANNER_END, 300)
        out = again.output()
        assert "refused the demo's API token" in out and "Traceback" not in out, out
        click_gives_a_mask(again, tmp_path)
        assert again.stop() == 0
    finally:
        again.stop()
    assert "Label Studio and the backend are stopped." in again.output()


def test_without_weights_the_demo_says_each_fact_once_and_how_to_go_on(tmp_path):
    missing = tmp_path / "sam2.1_hiera_tiny.pt"
    proc = subprocess.run(
        [sys.executable, "tools/demo.py", "--model", str(missing), "--run-dir", str(tmp_path / "run")]
        + ["--port", str(lsserver.free_port()), "--backend-port", str(lsserver.free_port())],
        cwd=lsserver.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 3, out + proc.stderr
    assert out.count("does not exist") == 1, out  # the cause, once
    assert "Provide them" in out and out.count("Provide them") == 1, out
    assert "make run MODEL=test" in out and "make-test-model DIR --trained" in out, out
    assert "stopped" not in out and "Traceback" not in out, out  # nothing was started, nothing to stop
