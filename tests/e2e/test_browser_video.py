"""A labeler's gesture on a video task in Label Studio 1.23.2's UI, in headless Chromium.

Label Studio sends a video region to the backend only when a label is applied to a selected
region: drawing with the label already chosen sends nothing. The gesture that works: with
Auto-Annotation on and no label selected, draw the box, select it, pick the label. The tracked
keyframes then appear on the region's timeline row. Screenshots go to test-output/e2e/.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from devkit import lsserver
from devkit.videos import crossing_clip, write_video
from tests.e2e import test_browser
from tests.e2e.test_browser import log_in
from tests.test_video import box_iou

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

VIDEO_CONFIG = """<View>
  <Labels name="videoLabels" toName="video"><Label value="ellipse" background="#ff4d4f"/></Labels>
  <Video name="video" value="$video" framerate="25"/>
  <VideoRectangle name="box" toName="video" smart="true"/>
</View>"""
FRAMES = 30
browser = test_browser.browser  # the same headless Chromium fixture


@pytest.fixture(scope="module")
def video_task(label_studio, backend_server, tmp_path_factory):
    clip = crossing_clip(0, num_frames=FRAMES, hw=(192, 256))
    path = write_video(tmp_path_factory.mktemp("browser-video") / "crossing.mp4", clip.frames, fps=25)
    project = lsserver.create_project(label_studio, "SAM2 video browser E2E", VIDEO_CONFIG)
    task = label_studio.upload(project.id, path, "video/mp4")
    lsserver.connect_backend(label_studio, project.id, backend_server.url)
    return project, task, clip


def test_label_a_drawn_box_and_the_track_shows_on_the_timeline(
    label_studio, backend_server, browser, video_task, e2e_output_dir
):
    project, task, clip = video_task
    page = browser.new_page()
    log_in(page, label_studio)
    page.goto(f"{label_studio.url}/projects/{project.id}/data?task={task['id']}")
    page.wait_for_function("document.querySelector('video')?.readyState >= 2", timeout=60_000)
    toggle = page.get_by_test_id("bottombar-auto-annotation-toggle")
    if not toggle.is_checked():
        toggle.click()

    # Frame 1, no label selected: draw a box around the red ellipse, found on the screen by colour.
    stage = page.locator(".lsf-video__main").first
    stage.wait_for(state="visible", timeout=30_000)
    # The first frame is painted onto the stage some time after the video element has data (seconds
    # on a loaded CI machine): look until the ellipse is there.
    for _ in range(60):
        area = stage.bounding_box()
        shown = np.asarray(Image.open(io.BytesIO(stage.screenshot())).convert("RGB")).astype(int)
        ys, xs = np.nonzero(np.abs(shown - (220, 40, 40)).sum(axis=2) < 90)
        if xs.size > 20:
            break
        page.wait_for_timeout(500)
    assert xs.size > 20, "the red ellipse is not on the screen after 30 s"
    left, top = area["x"] + float(xs.min()) - 4, area["y"] + float(ys.min()) - 4
    right, bottom = area["x"] + float(xs.max()) + 5, area["y"] + float(ys.max()) + 5
    regions, points = page.locator(".lsf-outliner-item"), page.locator(".lsf-keypoints__point")
    for attempt in range(3):  # on a loaded machine the stage may take a moment to accept drawing
        page.mouse.move(left, top)
        page.mouse.down()
        page.mouse.move((left + right) / 2, (top + bottom) / 2, steps=5)
        page.mouse.move(right, bottom, steps=5)
        page.mouse.up()
        try:
            expect(regions).to_have_count(1, timeout=10_000)
            break
        except AssertionError:
            page.screenshot(path=str(e2e_output_dir / f"video-draw-attempt-{attempt}.png"))
    expect(regions).to_have_count(1, timeout=5_000)
    expect(points).to_have_count(1, timeout=5_000)  # drawn: one keyframe, nothing sent yet

    # Select the box, pick the label: Label Studio sends the region, the track comes back.
    page.mouse.click((left + right) / 2, (top + bottom) / 2)
    page.locator(".lsf-label").filter(has_text="ellipse").first.click()
    try:
        page.wait_for_function(
            f"document.querySelectorAll('.lsf-keypoints__point').length >= {FRAMES - 5}", timeout=120_000
        )
    finally:
        page.screenshot(path=str(e2e_output_dir / "video-track-on-timeline.png"))
    assert "tracked 1 of 1 region(s)" in backend_server.log()

    # What Label Studio keeps on submit: keyframes on the ellipse, in its frame numbering.
    page.get_by_role("button", name="Submit").click()
    annotations = []
    for _ in range(60):
        annotations = label_studio.client.annotations.list(id=task["id"])
        if annotations:
            break
        page.wait_for_timeout(500)
    (region,) = [r for r in annotations[0].result if r["type"] == "videorectangle"]
    assert region["value"]["labels"] == ["ellipse"]
    sequence = region["value"]["sequence"]
    assert len(sequence) >= FRAMES - 5
    for k in sequence:
        x1, y1 = k["x"] / 100 * 256, k["y"] / 100 * 192
        box = (x1, y1, x1 + k["width"] / 100 * 256, y1 + k["height"] / 100 * 192)
        assert box_iou(box, clip.box(k["frame"] - 1)) >= 0.5, k
