"""A person's view: Label Studio's labeling page in headless Chromium shows our stored prediction.

Chromium is Debian's (/usr/bin/chromium, installed by `make test`); Playwright drives it and never
downloads a browser of its own. The screenshot is kept under test-output/e2e/.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.e2e import lsserver
from tests.e2e.regions import IMAGE_CONFIG, rectangle
from tests.e2e.sample_media import make_scene

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless, as root, and quiet: without the background-networking flags Chromium keeps
# calling Google's hosts, which this offline machine refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def _offsite(url: str) -> bool:
    parts = urlparse(url)
    return parts.scheme in ("http", "https", "ws", "wss") and parts.hostname != "127.0.0.1"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), (
        "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    )
    user_data_dir = tempfile.mkdtemp(prefix="chromium-e2e-")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            user_data_dir,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        yield context
        context.close()
    shutil.rmtree(user_data_dir, ignore_errors=True)


def log_in(page, label_studio) -> None:
    """Log in through Label Studio's login form, as a person does."""
    page.goto(f"{label_studio.url}/user/login/")
    page.fill("input[name=email]", label_studio.username)
    page.fill("input[name=password]", label_studio.password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url, timeout=30_000)


@pytest.fixture(scope="module")
def task_with_prediction(label_studio, backend_server, tmp_path_factory):
    """A task whose only content is a prediction LS stored from our backend ("Retrieve predictions"
    on a rectangle annotation, which is then deleted so the labeling page starts from the prediction)."""
    scene = make_scene(tmp_path_factory.mktemp("browser-media") / "scene.png", 320, 240, seed=3)
    project = lsserver.create_project(label_studio, "SAM2 browser E2E", IMAGE_CONFIG)
    task = label_studio.upload(project.id, scene.path)
    lsserver.connect_backend(label_studio, project.id, backend_server.url)
    region = rectangle(scene)
    del region["origin"]
    annotation = label_studio.client.annotations.create(id=task["id"], result=[region])
    lsserver.retrieve_predictions(label_studio, project.id, [task["id"]])
    stored = lsserver.predictions(label_studio, task["id"])
    assert stored and stored[0].model_version.startswith("sam2"), "no prediction stored for the browser test"
    label_studio.client.annotations.delete(id=annotation.id)
    return project, task, stored[0]


def test_labeling_page_shows_the_predicted_brush_region(
    label_studio, browser, task_with_prediction, e2e_output_dir
):
    project, task, prediction = task_with_prediction
    page = browser.new_page()
    elsewhere: list[str] = []
    page.on("request", lambda r: elsewhere.append(r.url) if _offsite(r.url) else None)
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)

    log_in(page, label_studio)
    page.goto(f"{label_studio.url}/projects/{project.id}/data?task={task['id']}")
    region = page.locator(".lsf-outliner-item").filter(has_text="object")
    brush = page.locator(".lsf-tree__node_type_brushregion")
    try:
        brush.first.wait_for(state="visible", timeout=60_000)
    finally:
        page.screenshot(path=str(e2e_output_dir / "task-with-prediction.png"))
    assert brush.count() == len([r for r in prediction.result if r["type"] == "brushlabels"])
    assert region.first.is_visible()
    print(
        f"\nrequests to other hosts: {sorted(set(elsewhere)) or 'none'}; console errors: {console_errors[:3]}"
    )
