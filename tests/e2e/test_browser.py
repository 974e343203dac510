"""A person's view of Label Studio's pages in headless Chromium: the newcomer's first mask from the
smart keypoint, "Retrieve predictions" from the Data Manager, a task opened without anything to
predict, and a stored prediction shown on the labeling page.

Chromium is Debian's (/usr/bin/chromium, installed by `make test`); Playwright drives it and never
downloads a browser of its own. A failing step leaves a screenshot under test-output/e2e/.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import expect

from devkit import lsserver
from devkit.sample_media import make_scene, rectangle
from tests.e2e.regions import IMAGE_CONFIG, brush_masks, object_iou
from tools import demo

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


@contextlib.contextmanager
def screenshot_on_failure(page, path: Path):
    try:
        yield
    except BaseException:
        page.screenshot(path=str(path))
        raise


def log_in(page, label_studio) -> None:
    page.goto(f"{label_studio.url}/user/login/")
    if "/user/login" not in page.url:
        return  # the browser's session is still logged in
    page.fill("input[name=email]", label_studio.username)
    page.fill("input[name=password]", label_studio.password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/login" not in url, timeout=30_000)


def open_task(page, label_studio, project_id: int, task_id: int) -> None:
    """The labeling page of a task, as the Data Manager opens it; ready when its bottom bar is."""
    page.goto(f"{label_studio.url}/projects/{project_id}/data?task={task_id}")
    page.get_by_test_id("bottombar-auto-annotation-toggle").wait_for(timeout=60_000)


def auto_annotation_on(page) -> None:
    """The bottom bar's Auto-Annotation switch (with it on, the Auto-Accept switch shows)."""
    accept = page.get_by_test_id("bottombar-auto-accept-toggle")
    toggle = page.get_by_test_id("bottombar-auto-annotation-toggle")
    for _ in range(3):  # on a loaded machine a click on a page still settling can be lost
        if accept.is_visible():
            return
        if not toggle.is_checked():
            toggle.click()
        try:
            accept.wait_for(timeout=10_000)
            return
        except PlaywrightTimeoutError:
            continue
    accept.wait_for(timeout=10_000)


def image_point(page, x_pct: float, y_pct: float) -> tuple[float, float]:
    """Page coordinates of a point of the displayed image (percent, Label Studio's units)."""
    box = page.locator(".lsf-main-view canvas, canvas").nth(1).bounding_box()
    return box["x"] + box["width"] * x_pct / 100, box["y"] + box["height"] * y_pct / 100


def stored_predictions(label_studio, task_id: int, wait_s: float = 0.0) -> list:
    deadline = time.monotonic() + wait_s
    while True:
        found = lsserver.predictions(label_studio, task_id)
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.5)


@pytest.fixture(scope="module")
def demo_project(label_studio, backend_server, tmp_path_factory):
    """The `make run` demo project (its samples, instructions and rectangles task) in the session's
    Label Studio; returns (project, {file name: (task id, scene)})."""
    directory = tmp_path_factory.mktemp("demo-samples")
    project = demo.demo_project(label_studio, backend_server.url, demo.sample_images(directory))
    scenes = {
        f"sample-{i + 1}.png": make_scene(directory / f"scene-{i}.png", 640, 480, seed=100 + i)
        for i in range(4)
    }
    scenes[demo.RECTANGLES_SAMPLE] = make_scene(directory / "rect.png", 640, 480, seed=200)
    tasks = {}
    for task in label_studio.client.tasks.list(project=project.id):
        name = next(n for n in scenes if task.data["image"].endswith(n))
        tasks[name] = (task.id, scenes[name])
    return project, tasks


def test_the_newcomer_follows_the_instructions_to_a_mask_from_a_click_and_a_box_then_retrieve(
    label_studio, browser, demo_project, e2e_output_dir
):
    """The demo project's Instructions (the README and the banner say the same), gesture by
    gesture as written, and what they claim about the page checked on the way."""
    project, tasks = demo_project
    task_id, scene = tasks["sample-1.png"]
    rect_id, rect_scene = tasks[demo.RECTANGLES_SAMPLE]
    instructions = label_studio.client.projects.get(id=project.id).expert_instruction
    assert f"task <b>{rect_id}</b>" in instructions  # the task named by its ID, as the Data Manager shows it
    page = browser.new_page()
    with screenshot_on_failure(page, e2e_output_dir / "newcomer-failed.png"):
        log_in(page, label_studio)
        page.goto(f"{label_studio.url}/projects/")
        page.get_by_text(demo.PROJECT_TITLE, exact=True).first.click()  # open the demo project
        page.wait_for_url(re.compile(rf"/projects/{project.id}/data"), timeout=30_000)
        open_task(page, label_studio, project.id, task_id)
        assert stored_predictions(label_studio, task_id) == []  # opening it stored nothing

        # one visible row of labels: "Click:" object, background, "Box:" object, background
        labels = page.locator(".lsf-label:visible")
        # "object 3": the name, then its hotkey; waited for, as the page may still re-render them
        expect(labels).to_have_text(
            [re.compile(rf"^\s*{name}\s*\d*\s*$") for name in ("object", "background") * 2]
        )
        assert len({round(labels.nth(i).bounding_box()["y"]) for i in range(4)}) == 1
        click_object, box_object = labels.nth(0), labels.nth(2)

        # 1. "Switch on Auto-Annotation in the bar at the bottom of the labeling page."
        auto_annotation_on(page)
        # 2. "Click Auto-Detect, the last button of the tool bar at the right edge of the image: it
        # selects the smart keypoint."
        auto_detect = page.locator("button.lsf-tool").filter(has_text="Auto-Detect").first
        image = page.locator(".lsf-main-view canvas, canvas").nth(1).bounding_box()
        bar_buttons = page.locator("button.lsf-tool:visible")
        last = bar_buttons.nth(bar_buttons.count() - 1).bounding_box()
        detect_box = auto_detect.bounding_box()
        assert detect_box == last  # the last button of the bar
        assert detect_box["x"] >= image["x"] + image["width"] - detect_box["width"]  # at its right edge
        auto_detect.click()
        expect(
            page.locator("button.lsf-tool_smart.lsf-tool_active[aria-label=key-point-tool]")
        ).to_have_count(1)
        # "Click the label object after Click: (it turns solid red), then click the object: its mask
        # appears as a suggestion." 3. "Accept the suggestion with the check mark in the bottom bar"
        click_object.click()
        expect(click_object).to_have_class(re.compile("lsf-label_selected"))
        page.mouse.click(*image_point(page, *scene.center_pct()))
        page.get_by_test_id("bottombar-accept-suggestions-button").click(timeout=60_000)
        expect(page.locator(".lsf-tree__node_type_brushregion")).to_have_count(1, timeout=10_000)

        # "A box. Hover over Auto-Detect: its fly-out opens to the left. Pick the smart rectangle
        # (the second icon), click the label object after Box:, then drag a box around the object."
        auto_detect.hover()
        smart_rect = page.locator("button.lsf-tool_smart[aria-label=rectangle-tool]").first
        smart_rect.wait_for(state="visible", timeout=10_000)
        flyout = page.locator("button.lsf-tool_smart[aria-label]:visible")
        assert flyout.nth(1).get_attribute("aria-label") == "rectangle-tool"  # the second icon
        assert smart_rect.bounding_box()["x"] < detect_box["x"]  # opened to the left
        smart_rect.click()
        box_object.click()
        expect(box_object).to_have_class(re.compile("lsf-label_selected"))
        x0, y0, x1, y1 = scene.object_box_px
        page.mouse.move(*image_point(page, 100 * (x0 - 4) / scene.width, 100 * (y0 - 4) / scene.height))
        page.mouse.down()
        page.mouse.move(
            *image_point(page, 100 * (x1 + 4) / scene.width, 100 * (y1 + 4) / scene.height), steps=8
        )
        page.mouse.up()
        page.get_by_test_id("bottombar-accept-suggestions-button").click(timeout=60_000)
        expect(page.locator(".lsf-tree__node_type_brushregion")).to_have_count(2, timeout=10_000)
        # "Submit to keep the mask."
        page.get_by_role("button", name="Submit current annotation").click()
        annotation = _wait_for_annotation(label_studio, task_id)
        masks = brush_masks(annotation["result"], scene.width, scene.height, from_name="mask")
        assert len(masks) == 2  # the click's and the box's
        assert min(object_iou(m, scene) for m in masks) >= 0.8  # each is the ellipse

        # "In the Data Manager tick it, open the tasks menu at the top left ("1 Task"), choose
        # Retrieve Predictions and confirm; open the task and pick the prediction's tab"
        page.goto(f"{label_studio.url}/projects/{project.id}/data")
        page.get_by_label(f"Select Task {rect_id}").click()
        tasks_menu = page.get_by_role("button", name=re.compile("Actions")).first
        expect(tasks_menu).to_have_text(re.compile("1 Task"))
        tasks_menu.click()
        page.get_by_text("Retrieve Predictions").click()
        page.locator("button", has_text="OK").last.click()
        [prediction] = stored_predictions(label_studio, rect_id, wait_s=60)
        masks = brush_masks(prediction.result, 640, 480, from_name="mask", labels=("object", "background"))
        assert len(masks) == 2  # one per rectangle of the submitted annotation
        assert max(object_iou(m, rect_scene) for m in masks) >= 0.8

        open_task(page, label_studio, project.id, rect_id)
        page.locator(".lsf-annotation-button").filter(has_text="sam2").first.click()  # the prediction's tab
        expect(page.locator(".lsf-tree__node_type_brushregion")).to_have_count(2, timeout=30_000)
    page.close()


def _wait_for_annotation(label_studio, task_id: int, wait_s: float = 30.0) -> dict:
    deadline = time.monotonic() + wait_s
    while True:
        task = label_studio.client.tasks.get(id=task_id)
        if task.annotations:
            return (
                task.annotations[-1] if isinstance(task.annotations[-1], dict) else dict(task.annotations[-1])
            )
        assert time.monotonic() < deadline, f"task {task_id} has no annotation after {wait_s} s"
        time.sleep(0.5)


def test_a_task_opened_stores_no_prediction_and_retrieve_after_a_drawn_rectangle_stores_the_mask(
    label_studio, backend_server, browser, tmp_path_factory, e2e_output_dir
):
    """Opening a task makes Label Studio ask the backend (no regions): nothing may be stored, or the
    task is skipped by every later Retrieve. A rectangle drawn with the plain tool and submitted
    then gets its mask."""
    scene = make_scene(tmp_path_factory.mktemp("open-media") / "scene.png", 320, 240, seed=5)
    project = lsserver.create_project(label_studio, "SAM2 task open E2E", IMAGE_CONFIG)
    task = label_studio.upload(project.id, scene.path)
    lsserver.connect_backend(label_studio, project.id, backend_server.url)
    page = browser.new_page()
    with screenshot_on_failure(page, e2e_output_dir / "task-open-failed.png"):
        log_in(page, label_studio)
        open_task(page, label_studio, project.id, task["id"])
        assert stored_predictions(label_studio, task["id"]) == []  # LS asked /predict and stored nothing

        auto_annotation_on(page)  # shows the keypoint and rectangle tools
        page.locator("button.lsf-tool:not(.lsf-tool_smart)[aria-label=rectangle-tool]").first.click()
        page.locator(".lsf-label").filter(has_text="object").nth(2).click()  # the rectangles' "object"
        x0, y0, x1, y1 = scene.object_box_px
        page.mouse.move(*image_point(page, 100 * (x0 - 2) / scene.width, 100 * (y0 - 2) / scene.height))
        page.mouse.down()
        page.mouse.move(
            *image_point(page, 100 * (x1 + 2) / scene.width, 100 * (y1 + 2) / scene.height), steps=8
        )
        page.mouse.up()
        page.locator(".lsf-tree__node_type_rectangleregion").first.wait_for(state="visible", timeout=10_000)
        page.get_by_role("button", name="Submit current annotation").click()
        annotation = _wait_for_annotation(label_studio, task["id"])
        assert [r["type"] for r in annotation["result"]] == ["rectanglelabels"]
    page.close()

    # Label Studio reloads a submitted task and, finding no prediction, asks /predict again (twice,
    # in parallel, in 1.23.2): the rectangle's mask may be stored before Retrieve, which then skips
    # the task. Either way every stored prediction is the mask of the drawn box.
    lsserver.retrieve_predictions(label_studio, project.id, [task["id"]])
    stored = stored_predictions(label_studio, task["id"], wait_s=30)
    assert stored
    for prediction in stored:
        assert prediction.model_version == backend_server.health()["model_version"]
        [mask] = brush_masks(prediction.result, scene.width, scene.height)
        assert object_iou(mask, scene) >= 0.85


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
    with screenshot_on_failure(page, e2e_output_dir / "task-with-prediction-failed.png"):
        # polled: the page may render twice (the Data Manager adds its tab to the URL)
        expect(brush).to_have_count(
            len([r for r in prediction.result if r["type"] == "brushlabels"]), timeout=60_000
        )
        expect(region.first).to_be_visible()
    print(
        f"\nrequests to other hosts: {sorted(set(elsewhere)) or 'none'}; console errors: {console_errors[:3]}"
    )
