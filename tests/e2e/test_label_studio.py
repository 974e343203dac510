"""The backend inside a real Label Studio 1.23.2, driven through Label Studio's own API.

Media are uploaded to Label Studio, so the backend has to fetch /data/upload/... with the
personal access token it exchanges itself. Every answer is read back from Label Studio, never
trusted from its status messages ("Retrieved N predictions" is printed whatever happened).
"""

from __future__ import annotations

import pytest
import requests

from devkit import lsserver
from devkit.sample_media import keypoint, make_scene, make_video, rectangle
from tests.e2e.regions import IMAGE_CONFIG, VIDEO_CONFIG, brush_masks, check_track, object_iou, videorectangle

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def image_project(label_studio, backend_server, tmp_path_factory):
    """A project with two uploaded images (a PNG and a JPEG of other sizes), backend connected."""
    media = tmp_path_factory.mktemp("image-media")
    scenes = [
        make_scene(media / "shapes-a.png", 96, 72, seed=1),
        make_scene(media / "shapes-b.jpg", 80, 60, seed=2),
    ]
    project = lsserver.create_project(label_studio, "SAM2 images E2E", IMAGE_CONFIG)
    tasks = [label_studio.upload(project.id, s.path) for s in scenes]
    ml = lsserver.connect_backend(label_studio, project.id, backend_server.url)
    return project, ml, list(zip(tasks, scenes, strict=True))


def test_uploaded_media_needs_the_token(label_studio, image_project):
    _, _, [(task, scene), _] = image_project
    url = label_studio.url + task["data"]["image"]
    assert task["data"]["image"].startswith("/data/upload/")
    assert requests.get(url, timeout=10, allow_redirects=False).status_code != 200
    response = requests.get(url, headers=label_studio.headers(), timeout=10)
    assert response.status_code == 200 and len(response.content) == scene.path.stat().st_size


def test_interactive_keypoint_gives_a_brush_mask(label_studio, image_project):
    _, ml, [(task, scene), _] = image_project
    data = lsserver.predict_interactive(label_studio, ml.id, task["id"], [keypoint(scene)])
    assert data["model_version"].startswith("sam2")
    [mask] = brush_masks(data["result"], scene.width, scene.height)
    assert object_iou(mask, scene) >= 0.8  # the mask is the clicked object: coordinates survived LS


def test_interactive_rectangle_gives_a_brush_mask(label_studio, image_project):
    _, ml, [_, (task, scene)] = image_project
    data = lsserver.predict_interactive(label_studio, ml.id, task["id"], [rectangle(scene)])
    assert data["model_version"].startswith("sam2")
    [mask] = brush_masks(data["result"], scene.width, scene.height)
    assert object_iou(mask, scene) >= 0.85


def test_retrieve_predictions_stores_masks_for_every_task(label_studio, image_project):
    project, _, tasks = image_project
    client = label_studio.client
    for task, scene in tasks:  # boxes -> masks: each task gets an annotation with a rectangle
        region = rectangle(scene)
        del region["origin"]
        client.annotations.create(id=task["id"], result=[region], ground_truth=False)

    lsserver.retrieve_predictions(label_studio, project.id)

    for task, scene in tasks:
        stored = [
            p for p in lsserver.predictions(label_studio, task["id"]) if p.model_version.startswith("sam2")
        ]
        assert stored, f"no sam2 prediction stored for task {task['id']}"
        [mask] = brush_masks(stored[-1].result, scene.width, scene.height)
        assert object_iou(mask, scene) >= 0.85


@pytest.fixture(scope="module")
def video_project(label_studio, backend_server, tmp_path_factory):
    video = make_video(tmp_path_factory.mktemp("video-media") / "square.mp4")
    project = lsserver.create_project(label_studio, "SAM2 video E2E", VIDEO_CONFIG)
    task = label_studio.upload(project.id, video.path, "video/mp4")
    ml = lsserver.connect_backend(label_studio, project.id, backend_server.url)
    return project, ml, task, video


def test_video_interactive_box_gives_a_track(label_studio, video_project):
    _, ml, task, video = video_project
    assert task["data"]["video"].startswith("/data/upload/")
    region = videorectangle(video)
    data = lsserver.predict_interactive(label_studio, ml.id, task["id"], [region])
    assert data["model_version"].startswith("sam2")
    [track] = data["result"]
    check_track(track, video, region)


def test_video_retrieve_predictions_stores_tracks(label_studio, video_project):
    project, _, task, video = video_project
    region = videorectangle(video)
    del region["origin"]
    label_studio.client.annotations.create(id=task["id"], result=[region], ground_truth=False)

    lsserver.retrieve_predictions(label_studio, project.id)

    stored = lsserver.predictions(label_studio, task["id"])
    assert stored, "no prediction stored for the video task"
    assert stored[-1].model_version.startswith("sam2"), stored[-1].model_version
    [track] = stored[-1].result
    check_track(track, video, region)


def test_a_backend_whose_model_failed_to_load_is_shown_disconnected_not_connected(
    label_studio, backend_model_dir, tmp_path
):
    """A labeler must not see "Connected" while every click gets a 503: Label Studio lists the
    backend as Disconnected once its model failed to load, and refuses to connect it."""
    from label_studio_sdk.core.api_error import ApiError

    project = lsserver.create_project(label_studio, "SAM2 failed model E2E", IMAGE_CONFIG)
    port = lsserver.free_port()
    good = lsserver.start_backend(backend_model_dir, label_studio, port=port, log_path=tmp_path / "good.log")
    try:
        assert good.wait_for_model(120).get("model_loaded")
        ml = lsserver.connect_backend(label_studio, project.id, good.url)
    finally:
        good.stop()
    # the same address, restarted with weights that cannot be loaded
    broken = lsserver.start_backend(
        tmp_path / "no-such-model", label_studio, port=port, log_path=tmp_path / "b.log"
    )
    try:
        assert broken.wait_for_model(120).get("status") == "ERROR"
        assert label_studio.client.ml.get(ml.id).state == "DI"  # the Model page: Disconnected
        other = lsserver.create_project(label_studio, "SAM2 failed model E2E 2", IMAGE_CONFIG)
        with pytest.raises(ApiError) as refused:  # Settings -> Model -> Connect Model
            label_studio.client.ml.create(project=other.id, url=broken.url, title="SAM2", is_interactive=True)
        assert "health check failed" in str(refused.value.body)
    finally:
        broken.stop()
