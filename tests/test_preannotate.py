"""Bulk pre-annotation: polygons, the engine, "Retrieve predictions" with the background hand-off,
and the project job (resume, interrupt, retries) against an in-memory Label Studio.

Masks are checked against known boxes with a stand-in model that returns the prompted box (or,
for clicks, the clicked colour's region: see tests/test_auto.py); the real tiny SAM2 runs
the /predict paths. The job against the real Label Studio is tests/e2e/test_preannotate_cli.py.
"""

from __future__ import annotations

import base64
import copy
import logging
import threading
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from label_studio_sdk.core.api_error import ApiError
from PIL import Image, ImageDraw

from devkit.media_server import MediaServer
from devkit.scenes import box_of, iou, make_scene
from label_studio_sam2.cli.parsers import task_ids
from label_studio_sam2.engine.image import ImagePredictor
from label_studio_sam2.engine.models import LoadedModel
from label_studio_sam2.labelstudio.api import LabelStudioAPI, LabelStudioAPIError, Retry, predicted_versions
from label_studio_sam2.labelstudio.auth import LabelStudioAuth
from label_studio_sam2.labelstudio.bulk import Preannotator
from label_studio_sam2.labelstudio.polygons import mask_polygons
from label_studio_sam2.labelstudio.project_job import Progress, Selection, Summary, run_project
from label_studio_sam2.labelstudio.protocol import Control, parse_label_config
from label_studio_sam2.labelstudio.regions import polygon_results
from label_studio_sam2.labelstudio.retrieve import background_job
from label_studio_sam2.service.bulk import PreannotateOptions
from label_studio_sam2.service.errors import BadRequest, Kind, MediaError
from label_studio_sam2.service.media import MediaClient
from label_studio_sam2.service.segment import ImageSegmenter
from tests.conftest import IMAGE_CONFIG, decode_brush, encode_image, noise_image, predict_body, rect_px
from tests.test_auto import ColourSam, shapes_image

MODEL_VERSION = "test-v1"

BOTH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/><Label value="car"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="object"/><Label value="car"/></PolygonLabels>
  <RectangleLabels name="box" toName="image"><Label value="object"/><Label value="car"/><Label value="roi"/></RectangleLabels>
</View>"""


# --- polygons ----------------------------------------------------------------------------------


def rasterize(points_pct, w: int, h: int) -> np.ndarray:
    """A polygon region's points back to a mask (pixel centres inside, even-odd fill)."""
    xy = np.asarray(points_pct) * [w / 100.0, h / 100.0] - 0.5
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in xy], fill=1)
    return np.asarray(img, bool)


def disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r**2


POLY = Control("poly", "polygonlabels", "image", ("object", "car"))


def test_a_ring_is_one_polygon_whose_fill_leaves_the_hole_empty():
    ring = disc(100, 150, 60, 50, 40) & ~disc(100, 150, 60, 50, 15)
    (region,) = polygon_results(ring, "object", POLY, 0.8)
    back = rasterize(region["value"]["points"], 150, 100)
    assert not back[50, 60]  # the hole's centre
    assert iou(back, ring) > 0.95


def test_parts_become_regions_largest_first_with_the_label_and_score():
    mask = disc(80, 120, 40, 40, 30) | disc(80, 120, 105, 15, 8)
    regions = polygon_results(mask, "car", POLY, 0.7, region_id="abc")
    assert [r["id"] for r in regions] == ["abc", "abc_1"]
    big, small = (rasterize(r["value"]["points"], 120, 80) for r in regions)
    assert big.sum() > small.sum() and iou(big | small, mask) > 0.93
    r = regions[0]
    assert (r["type"], r["from_name"], r["to_name"]) == ("polygonlabels", "poly", "image")
    assert (r["original_width"], r["original_height"]) == (120, 80)
    assert r["value"]["closed"] is True and r["value"]["polygonlabels"] == ["car"] and r["score"] == 0.7
    pts = np.array(r["value"]["points"])
    assert pts.min() >= 0 and pts.max() <= 100
    assert polygon_results(np.zeros((5, 5), bool), "car", POLY, 1.0) == []


def test_tolerance_trades_vertices_for_accuracy():
    mask = disc(200, 200, 100, 100, 80)
    exact, rough = mask_polygons(mask, 0.0)[0], mask_polygons(mask, 3.0)[0]
    assert len(rough) < len(exact) / 4
    (region,) = polygon_results(mask, "object", POLY, 1.0, tolerance_px=3.0)
    assert len(region["value"]["points"]) == len(rough)
    assert iou(rasterize(region["value"]["points"], 200, 200), mask) > 0.97


def test_specks_thinner_than_a_polygon_are_dropped():
    mask = np.zeros((20, 20), bool)
    mask[5, 5] = True  # one pixel: no area to draw
    mask[10:15, 10:15] = True
    (region,) = polygon_results(mask, "object", POLY, 1.0)
    assert rasterize(region["value"]["points"], 20, 20)[12, 12]


# --- a stand-in model: boxes come back as box masks ---------------------------------------------


class BoxSam(ColourSam):
    """Box prompts -> the box itself (logits +-10, predicted IoU 0.9); clicks as ColourSam."""

    def forward(self, image_embeddings, input_points=None, input_labels=None, input_boxes=None, **kw):
        if input_boxes is None:
            return super().forward(image_embeddings, input_points, input_labels, **kw)
        h = w = image_embeddings[0].shape[-1] // 4
        b = (input_boxes[0] + 0.5) / 4  # (n, 4) low-res pixels
        ys = torch.arange(h)[None, :, None] + 0.5
        xs = torch.arange(w)[None, None, :] + 0.5
        inside = (xs >= b[:, 0, None, None]) & (xs < b[:, 2, None, None])
        inside = inside & (ys >= b[:, 1, None, None]) & (ys < b[:, 3, None, None])
        n = len(b)
        return SimpleNamespace(
            pred_masks=torch.where(inside, 10.0, -10.0)[None, :, None],
            iou_scores=torch.full((1, n, 1), 0.9),
            object_score_logits=torch.full((1, n, 1), 5.0),
        )


@pytest.fixture
def box_predictor():
    return ImagePredictor(LoadedModel(BoxSam(), "fake", "boxsam", torch.device("cpu"), 1024))


def segmenter_for(predictor) -> ImageSegmenter:
    return ImageSegmenter(predictor, MediaClient(LabelStudioAuth(None, None)), MODEL_VERSION)


def annotated_task(task_id, url, regions, key="annotations", updated="2026-01-01T00:00:00Z") -> dict:
    return {
        "id": task_id,
        "data": {"image": url},
        key: [{"id": task_id, "result": regions, "updated_at": updated}],
    }


# --- the engine ----------------------------------------------------------------------------------


def test_boxes_mode_gives_one_mask_per_rectangle_with_its_label(box_predictor, media_server):
    scene = make_scene(7, n_shapes=4, pair=False)
    h, w = scene.hw
    url = media_server.add_image("scene.png", scene.image)
    boxes = [box_of(m) for m in scene.masks]
    labels = ["object", "car"] * 2
    task = annotated_task(1, url, [rect_px(b, w, h, lab) for b, lab in zip(boxes, labels, strict=False)])
    engine = Preannotator(segmenter_for(box_predictor), PreannotateOptions(mode="boxes"))
    outcome = engine.predict(task, parse_label_config(IMAGE_CONFIG))
    result = outcome.entry["result"]
    assert len(result) == len(boxes) and outcome.entry["model_version"] == MODEL_VERSION
    for region, box, label in zip(result, boxes, labels, strict=False):
        assert region["value"]["brushlabels"] == [label]
        x1, y1, x2, y2 = box.astype(int)
        expected = np.zeros((h, w), bool)
        expected[y1:y2, x1:x2] = True
        assert iou(decode_brush(region), expected) > 0.9
    # one encoder pass for the image, all boxes in one batched decoder call
    assert (box_predictor.encoder_calls, box_predictor.decoder_calls) == (1, 1)


def test_boxes_come_from_the_latest_annotation_or_prediction(box_predictor, media_server):
    url = media_server.add_image("a.png", noise_image(60, 80))
    old = annotated_task(1, url, [rect_px((0, 0, 40, 30), 80, 60, "car")], updated="2025-01-01")[
        "annotations"
    ]
    task = annotated_task(1, url, [rect_px((40, 30, 80, 60), 80, 60, "object")])
    task["annotations"] += old
    task["predictions"] = [{"id": 9, "result": [rect_px((0, 0, 20, 20), 80, 60, "car")]}]
    config = parse_label_config(IMAGE_CONFIG)
    seg = segmenter_for(box_predictor)
    (latest,) = Preannotator(seg, PreannotateOptions()).predict(task, config).entry["result"]
    assert latest["value"]["brushlabels"] == ["object"] and decode_brush(latest)[45, 60]
    (pred,) = (
        Preannotator(seg, PreannotateOptions(boxes_from="prediction")).predict(task, config).entry["result"]
    )
    assert pred["value"]["brushlabels"] == ["car"] and decode_brush(pred)[5, 5]
    nothing = Preannotator(seg, PreannotateOptions()).predict({"id": 2, "data": {"image": url}}, config)
    assert nothing.entry is None and "no rectangle" in nothing.skip


def test_polygon_output_follows_the_option_and_its_tolerance(box_predictor, media_server):
    url = media_server.add_image("a.png", noise_image(100, 120))
    task = annotated_task(1, url, [rect_px((10, 20, 70, 90), 120, 100, "car")])
    config = parse_label_config(BOTH_CONFIG)
    seg = segmenter_for(box_predictor)
    (brush,) = Preannotator(seg, PreannotateOptions()).predict(task, config).entry["result"]
    assert brush["type"] == "brushlabels"  # "auto": the config's BrushLabels comes first
    regions = Preannotator(seg, PreannotateOptions(output="polygon")).predict(task, config).entry["result"]
    (poly,) = regions
    assert poly["type"] == "polygonlabels" and poly["value"]["polygonlabels"] == ["car"]
    assert len(poly["value"]["points"]) == 4  # a box, simplified to its corners
    expected = np.zeros((100, 120), bool)
    expected[20:90, 10:70] = True
    assert iou(rasterize(poly["value"]["points"], 120, 100), expected) > 0.9
    with pytest.raises(BadRequest, match="PolygonLabels"):
        Preannotator(seg, PreannotateOptions(output="polygon")).predict(
            task, parse_label_config(IMAGE_CONFIG)
        )


def test_auto_mode_inside_roi_rectangles_with_the_configured_label(media_server):
    predictor = ImagePredictor(LoadedModel(ColourSam(), "fake", "colour", torch.device("cpu"), 1024))
    img, truth = shapes_image()
    url = media_server.add_image("shapes.png", img)
    h, w = img.shape[:2]
    options = PreannotateOptions(
        mode="auto", roi_label="roi", auto_label="car", points_per_side=8, min_area_px=50
    )
    engine = Preannotator(segmenter_for(predictor), options)
    config = parse_label_config(BOTH_CONFIG)
    task = annotated_task(
        1, url, [rect_px((120, 20, 230, 130), w, h, "roi"), rect_px((0, 0, 5, 5), w, h, "object")]
    )
    (region,) = engine.predict(task, config).entry["result"]
    assert region["value"]["brushlabels"] == ["car"] and iou(decode_brush(region), truth[1]) > 0.9
    skipped = engine.predict(annotated_task(2, url, [rect_px((0, 0, 5, 5), w, h, "object")]), config)
    assert skipped.entry is None and "'roi' rectangle" in skipped.skip
    whole = Preannotator(segmenter_for(predictor), PreannotateOptions(mode="auto", points_per_side=8))
    result = whole.predict({"id": 3, "data": {"image": url}}, config).entry["result"]
    assert len(result) == 3 and {r["value"]["brushlabels"][0] for r in result} == {
        "object"
    }  # the first label
    with pytest.raises(BadRequest, match="not a label"):
        Preannotator(segmenter_for(predictor), PreannotateOptions(mode="auto", auto_label="tree")).check(
            config
        )


# --- "Retrieve predictions": deadline and background hand-off -------------------------------------


class FakeLabelStudio:
    """An in-memory Label Studio with LabelStudioAPI's interface (the calls bulk jobs make)."""

    def __init__(self, config: str = IMAGE_CONFIG, tasks: list[dict] = (), project: int = 1):
        """`tasks` belong to `project` unless they name their own; every project has `config`."""
        self.config = config
        self.tasks = {
            t["id"]: copy.deepcopy({"annotations": [], "predictions": [], "project": project, **t})
            for t in tasks
        }
        self.lock = threading.Lock()
        self.writes = 0
        self.posted: list[tuple[int, dict]] = []  # (task id, prediction): every write, as LS got it

    def label_config(self, project_id):
        if not any(t["project"] == project_id for t in self.tasks.values()):
            raise LabelStudioAPIError(f"reading project {project_id}: HTTP 404: Not found.")
        return self.config

    def iter_tasks(self, project_id, query=None, view=None):
        for t in list(self.tasks.values()):
            versions = ",".join(sorted({p["model_version"] for p in t["predictions"]}))
            yield {
                "id": t["id"],
                "data": t["data"],
                "predictions_model_versions": versions,
                "total_annotations": len(t["annotations"]),
            }

    def task(self, task_id):
        with self.lock:
            if task_id not in self.tasks:
                raise LabelStudioAPIError(f"reading task {task_id}: HTTP 404: Not found.")
            return copy.deepcopy(self.tasks[task_id])

    def prediction_versions(self, task_id):
        with self.lock:
            return predicted_versions(self.tasks[task_id]["predictions"])

    def create_prediction(self, task_id, entry, model_version):
        with self.lock:
            preds = self.tasks[task_id]["predictions"]
            if model_version in predicted_versions(preds):
                return False
            preds.append({"id": len(preds) + 1, "model_version": model_version, "result": entry["result"]})
            self.posted.append((task_id, copy.deepcopy(entry)))
            self.writes += 1
            return True

    def count(self, task_id, model_version):
        """Non-empty predictions of `model_version` the task has."""
        return sum(
            p["model_version"] == model_version and bool(p["result"])
            for p in self.tasks[task_id]["predictions"]
        )


@pytest.fixture
def slow_media(tmp_path):
    """Images served after a delay: a task takes long enough for the deadline to bite."""
    server = MediaServer(tmp_path, delay_s=0.4).serve_files()
    url = server.add_image("a.png", noise_image(40, 60))
    yield url
    server.close()


def retrieve_tasks(url, n):
    return [annotated_task(i, url, [rect_px((5, 5, 40, 30), 60, 40, "object")]) for i in range(1, n + 1)]


def test_retrieve_answers_in_time_and_the_background_job_writes_the_rest(app_factory, slow_media):
    app = app_factory(predict_deadline_s=0.6, label_studio_url="http://ls.invalid", label_studio_api_key="k")
    runtime = app.extensions["sam2"]
    runtime.require()
    tasks = retrieve_tasks(slow_media, 6)
    ls = FakeLabelStudio(tasks=tasks)
    job = background_job(runtime, api=ls)
    client = app.test_client()
    body = client.post("/predict", json=predict_body(tasks, None)).get_json()
    results = body["results"]
    assert len(results) == 6
    answered = [i for i, r in enumerate(results) if isinstance(r, dict)]
    assert answered and answered == list(range(len(answered))) and len(answered) < 6
    assert all(r == [] for r in results[len(answered) :])
    mv = results[0]["model_version"]
    # Label Studio stores what was answered; asked again meanwhile, it gets [] for queued tasks
    for i in answered:
        ls.create_prediction(i + 1, results[i], mv)
    again = client.post("/predict", json=predict_body(tasks[len(answered) :], None)).get_json()["results"]
    assert all(r == [] for r in again)
    assert job.wait_idle(30)
    assert [ls.count(t["id"], mv) for t in tasks] == [1] * 6  # every task exactly once
    assert job.counts["done"] == 6 - len(answered)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'sam2_background_tasks_total{{outcome="done"}} {6 - len(answered)}.0' in metrics
    assert "sam2_background_tasks_pending 0.0" in metrics


HACKED_CONFIG = IMAGE_CONFIG.replace('<Label value="car"/>', '<Label value="car"/><Label value="HACKED"/>')


def handoff_attack(slow_url: str) -> tuple[FakeLabelStudio, dict]:
    """The attack of issue 23 against "Retrieve predictions": Label Studio holds project 1
    (tasks 1 and 2, rectangles labelled "object") and project 2 (task 777). An anonymous request
    names project 1, sends a first task whose image trickles past the deadline, so that the rest
    is handed off, then task 777 (another project's) and task 2, both with a `data:` image, a
    rectangle labelled HACKED and a label config that has that label."""

    def data_uri(seed: int) -> str:
        return "data:image/png;base64," + base64.b64encode(encode_image(noise_image(40, 60, seed))).decode()

    box = [rect_px((5, 5, 40, 30), 60, 40, "object")]
    stored = data_uri(5)  # what Label Studio holds (served at once: only the request's first trickles)
    ls = FakeLabelStudio(
        tasks=[
            annotated_task(1, slow_url, box),
            annotated_task(2, stored, box),
            {**annotated_task(777, stored, [rect_px((5, 5, 40, 30), 60, 40, "car")]), "project": 2},
        ]
    )
    hacked = [rect_px((0, 0, 60, 40), 60, 40, "HACKED")]
    sent = data_uri(3)
    tasks = [
        annotated_task(1, slow_url, box),
        annotated_task(777, sent, hacked),
        annotated_task(2, sent, hacked),
    ]
    return ls, predict_body(tasks, None, HACKED_CONFIG)


def written_labels(ls: FakeLabelStudio) -> dict[int, set]:
    """Task id -> the labels of what was written to Label Studio's /api/predictions for it."""
    labels: dict[int, set] = {}
    for task_id, entry in ls.posted:
        for region in entry["result"]:
            labels.setdefault(task_id, set()).update(region["value"].get("brushlabels", []))
    return labels


def test_a_handed_off_task_is_read_from_label_studio_and_another_project_s_is_never_written(
    app_factory, slow_media
):
    """What the background job writes comes from Label Studio: each handed-off task is read there
    with the backend's token and checked to be the request's project's, and the project's label
    config is read there too. The request's task dicts are never written back."""
    app = app_factory(predict_deadline_s=0.6, label_studio_url="http://ls.invalid", label_studio_api_key="k")
    runtime = app.extensions["sam2"]
    runtime.require()
    ls, body = handoff_attack(slow_media)
    job = background_job(runtime, api=ls)
    results = app.test_client().post("/predict", json=body).get_json()["results"]
    assert len(results) == 3 and results[1:] == [[], []]  # task 1 answered, the rest handed off
    assert job.wait_idle(60)
    assert 777 not in written_labels(ls) and ls.tasks[777]["predictions"] == []
    assert written_labels(ls) == {2: {"object"}}  # Label Studio's rectangles, not the request's
    assert job.counts == {"done": 1, "failed": 1}


def test_without_a_project_nothing_is_handed_off(app_factory, slow_media):
    app = app_factory(predict_deadline_s=0.6, label_studio_url="http://ls.invalid", label_studio_api_key="k")
    runtime = app.extensions["sam2"]
    runtime.require()
    ls, body = handoff_attack(slow_media)
    job = background_job(runtime, api=ls)
    del body["project"]
    results = app.test_client().post("/predict", json=body).get_json()["results"]
    assert results[1:] == [[], []]
    assert job.wait_idle(30) and not job.counts and ls.posted == []


def test_without_a_job_the_rest_stays_unpredicted_for_the_next_retrieve(app_factory, slow_media, caplog):
    client = app_factory(predict_deadline_s=0.6, background_job=False).test_client()
    tasks = retrieve_tasks(slow_media, 4)
    with caplog.at_level(logging.WARNING, "label_studio_sam2.bulk"):
        results = client.post("/predict", json=predict_body(tasks, None)).get_json()["results"]
    assert isinstance(results[0], dict) and results[-1] == []
    assert "retrieve again" in caplog.text


def test_retrieve_in_auto_mode_labels_masks_with_the_configured_label(app_factory, media_server):
    client = app_factory(
        retrieve_mode="auto",
        auto_label="car",
        points_per_side=3,
        auto_iou_thresh=0.0,
        auto_stability_thresh=0.0,
        min_area=0,
    ).test_client()
    url = media_server.add_image("a.png", noise_image(40, 60))
    (entry,) = client.post(
        "/predict", json=predict_body([{"id": 1, "data": {"image": url}}], None)
    ).get_json()["results"]
    assert entry["result"] and {r["value"]["brushlabels"][0] for r in entry["result"]} == {"car"}
    for region in entry["result"]:
        assert decode_brush(region).shape == (40, 60)


def test_automatic_masks_of_unknown_cost_go_to_the_background_at_once(app_factory, media_server):
    """A minute or more per image on a CPU: without a measured task time, auto mode does not
    gamble the whole request on the first task."""
    app = app_factory(
        retrieve_mode="auto",
        points_per_side=2,
        auto_iou_thresh=0.0,
        auto_stability_thresh=0.0,
        min_area=0,
        label_studio_url="http://ls.invalid",
        label_studio_api_key="k",
    )
    runtime = app.extensions["sam2"]
    runtime.require()
    url = media_server.add_image("a.png", noise_image(40, 60))
    tasks = [{"id": i, "data": {"image": url}} for i in (1, 2)]
    ls = FakeLabelStudio(tasks=tasks)
    job = background_job(runtime, api=ls)
    results = app.test_client().post("/predict", json=predict_body(tasks, None)).get_json()["results"]
    assert results == [[], []]
    assert job.wait_idle(30) and job.counts["done"] == 2
    assert [len(ls.tasks[i]["predictions"]) for i in (1, 2)] == [1, 1]


def test_retrieve_with_a_config_the_mode_cannot_use_is_a_bad_request(client, media_server):
    config = '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image"/></View>'
    body = predict_body([{"id": 1, "data": {"image": "x"}}], None, config)
    resp = client.post("/predict", json=body)
    assert resp.status_code == 400 and "RectangleLabels" in resp.get_json()["error"]


# --- the project job -----------------------------------------------------------------------------


def project(media_server, n_good=4):
    """Tasks with rectangles, plus one of each kind that cannot be predicted."""
    url = media_server.add_image("a.png", noise_image(60, 80))
    tasks = [annotated_task(i, url, [rect_px((10, 10, 50, 40), 80, 60, "car")]) for i in range(1, n_good + 1)]
    tasks.append({"id": 20, "data": {"image": url}})  # no annotation
    brush_only = {
        "type": "brushlabels",
        "from_name": "tag",
        "to_name": "image",
        "value": {"format": "rle", "rle": [0]},
    }
    tasks.append(annotated_task(21, url, [brush_only]))  # an annotation without rectangles
    tasks.append(
        annotated_task(22, media_server.url + "/missing.png", [rect_px((1, 1, 9, 9), 80, 60, "car")])
    )
    done = annotated_task(23, url, [rect_px((10, 10, 50, 40), 80, 60, "car")])
    done["predictions"] = [{"id": 1, "model_version": MODEL_VERSION, "result": [brush_only]}]
    tasks.append(done)
    # an empty prediction of this version (what task open stored before): counts as absent
    emptied = annotated_task(24, url, [rect_px((10, 10, 50, 40), 80, 60, "car")])
    emptied["predictions"] = [{"id": 1, "model_version": MODEL_VERSION, "result": []}]
    tasks.append(emptied)
    return tasks


def run(ls, predictor, stop=None, progress=None, **kw):
    return run_project(
        ls,
        1,
        segmenter_for(predictor),
        PreannotateOptions(**kw),
        model_version=MODEL_VERSION,
        stop=stop,
        progress=progress,
        media_retry=Retry(attempts=1),
    )


def test_a_run_predicts_skips_and_fails_with_reasons_and_a_rerun_does_nothing(box_predictor, media_server):
    tasks = project(media_server)
    ls = FakeLabelStudio(tasks=tasks)
    annotations_before = {t["id"]: copy.deepcopy(t["annotations"]) for t in ls.tasks.values()}
    summary = run(ls, box_predictor)
    assert (summary.selected, summary.done, summary.interrupted) == (9, 5, False)
    assert summary.skipped == {
        f"already has a prediction of {MODEL_VERSION}": 1,
        "no annotation": 1,
        "no rectangle in the latest annotation": 1,
    }
    assert summary.failed == [(22, f"HTTP 404 fetching {media_server.url}/missing.png")]
    assert summary.exit_code == 1
    report = summary.report()
    assert "9 task(s) selected, 5 predicted, 3 skipped, 1 failed" in report and "(task 22)" in report
    assert all(ls.count(i, MODEL_VERSION) == 1 for i in (1, 2, 3, 4, 23, 24))
    assert {t["id"]: t["annotations"] for t in ls.tasks.values()} == annotations_before  # untouched
    assert box_predictor.encoder_calls == 1  # five tasks, one image: encoded once
    again = run(ls, box_predictor)
    assert again.done == 0 and again.skipped[f"already has a prediction of {MODEL_VERSION}"] == 6
    assert ls.writes == 5


def test_an_interrupted_run_resumes_and_every_task_is_predicted_once(box_predictor, media_server):
    ls = FakeLabelStudio(tasks=project(media_server, n_good=8))
    stop = threading.Event()

    class StopAfterTwo(Progress):
        def update(self, summary):
            super().update(summary)
            if self.n == 2:
                stop.set()  # what Ctrl-C does

    first = run(ls, box_predictor, stop=stop, progress=lambda total: StopAfterTwo(total, tty=False))
    assert first.interrupted and first.exit_code == 130 and "run the same command again" in first.report()
    predicted = sum(ls.count(i, MODEL_VERSION) for i in range(1, 9))
    assert 1 <= predicted < 8  # the task being worked on when stopped was still written
    second = run(ls, box_predictor)
    assert not second.interrupted
    assert [ls.count(i, MODEL_VERSION) for i in (*range(1, 9), 24)] == [1] * 9
    assert first.done + second.done == 9  # the eight and the task whose prediction was empty


def test_selection_filters_tasks(box_predictor, media_server):
    ls = FakeLabelStudio(tasks=project(media_server))
    only = run_project(
        ls,
        1,
        segmenter_for(box_predictor),
        PreannotateOptions(),
        model_version=MODEL_VERSION,
        selection=Selection(task_ids=frozenset({2, 3, 20})),
    )
    assert (only.selected, only.done, only.skipped["no annotation"]) == (3, 2, 1)
    assert Selection("unannotated").keeps({"id": 1, "total_annotations": 0})
    assert not Selection("annotated").keeps({"id": 1, "total_annotations": 0})
    assert (
        Selection('{"conjunction": "and", "items": []}').query()
        == '{"filters": {"conjunction": "and", "items": []}}'
    )
    with pytest.raises(ValueError, match="--filter"):
        Selection("nonsense").query()


def test_progress_without_a_terminal_logs_rate_and_eta(caplog):
    bar = Progress(4, tty=False, every_s=0)
    with caplog.at_level(logging.INFO, "label_studio_sam2.bulk"):
        for _ in range(4):
            bar.update(Summary(done=1))
    assert (
        "progress: 4/4 tasks" in caplog.text
        and "tasks/s, ETA 0 s (done 1, skipped 0, failed 0)" in caplog.text
    )


# --- retries -------------------------------------------------------------------------------------


def flaky(errors, value="ok"):
    """A call that raises `errors` one by one, then returns `value`."""
    errors = list(errors)
    calls = []

    def fn():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return value

    fn.calls = calls
    return fn


def test_label_studio_errors_are_retried_with_exponential_backoff(caplog):
    sleeps = []
    retry = Retry(attempts=5, base_s=1.0, sleep=sleeps.append)
    fn = flaky(
        [
            ApiError(status_code=503, body={"detail": "busy"}),
            httpx.ConnectError("refused"),
            ApiError(status_code=429),
        ]
    )
    with caplog.at_level(logging.WARNING, "label_studio_sam2.bulk"):
        assert retry.call(fn, "writing") == "ok"
    assert sleeps == [1.0, 2.0, 4.0]
    assert "writing failed (HTTP 503: busy); retry 1 of 4 in 1 s" in caplog.text
    not_found = flaky([ApiError(status_code=404, body={"detail": "Not found."})])
    with pytest.raises(ApiError):
        retry.call(not_found, "reading")
    assert len(not_found.calls) == 1  # a 4xx is not retried
    gone = flaky([MediaError("HTTP 502 fetching x", Kind.UPSTREAM_FAILED)] * 5)
    with pytest.raises(MediaError):
        Retry(attempts=3, sleep=lambda s: None).call(gone, "fetching")
    assert len(gone.calls) == 3


def test_a_lost_response_is_not_written_twice():
    """The first POST is stored but its answer is lost (timeout): the retry sees the prediction."""
    stored = []

    class Predictions:
        def list(self, task):
            return [SimpleNamespace(model_version=v, result=r) for t, v, r in stored if t == task]

        def create(self, task, result, score, model_version):
            stored.append((task, model_version, result))
            if len(stored) == 1:
                raise httpx.ReadTimeout("lost")

    api = LabelStudioAPI("http://127.0.0.1:9", "legacy-token", Retry(sleep=lambda s: None))
    api.client = SimpleNamespace(predictions=Predictions())
    region = {"type": "brushlabels", "value": {"rle": [0]}}
    assert api.create_prediction(5, {"result": [region], "score": 0.5}, "v1") is False
    assert stored == [(5, "v1", [region])]
    assert api.create_prediction(6, {"result": [region], "score": 0.5}, "v1") is True
    # an empty prediction of this version (stored by an older backend on task open) is no prediction
    stored.append((7, "v1", []))
    assert api.create_prediction(7, {"result": [region], "score": 0.5}, "v1") is True


def test_api_errors_say_what_failed_without_headers():
    class Projects:
        def get(self, id):
            raise ApiError(status_code=404, headers={"set-cookie": "secret"}, body={"detail": "Not found."})

    api = LabelStudioAPI("http://127.0.0.1:9", "legacy-token", Retry(sleep=lambda s: None))
    api.client = SimpleNamespace(projects=Projects())
    with pytest.raises(LabelStudioAPIError) as e:
        api.label_config(7)
    assert str(e.value) == "reading project 7: HTTP 404: Not found." and "secret" not in str(e.value)


# --- the command line ------------------------------------------------------------------------------


def test_cli_parses_options_and_needs_label_studio(monkeypatch, capsys):
    from label_studio_sam2.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["preannotate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--project", "--mode", "--filter", "--roi-label", "--output", "--tolerance", "--tasks"):
        assert option in out
    assert task_ids("1,3-5, 9") == {1, 3, 4, 5, 9}
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["preannotate", "--project", "1"])
    assert "LABEL_STUDIO_URL" in str(e.value.code)


def test_options_reject_unknown_values():
    with pytest.raises(ValueError, match="mode"):
        PreannotateOptions(mode="everything")
    with pytest.raises(ValueError, match="output"):
        PreannotateOptions(output="svg")


def test_retrieve_with_nothing_to_predict_says_why_at_warning(app_factory, media_server, caplog):
    # it logged `0 result region(s)` at INFO: nothing told the user why no prediction came
    url = media_server.add_image("a.png", noise_image(60, 80))
    brush_only = {"type": "brushlabels", "from_name": "tag", "to_name": "image", "value": {"rle": [0]}}
    tasks = [
        annotated_task(1, url, [brush_only]),  # nothing to predict: no rectangle
        annotated_task(2, media_server.url + "/missing.png", [rect_px((1, 1, 9, 9), 80, 60, "object")]),
    ]
    client = app_factory(retrieve_mode="boxes", background_job=False).test_client()
    with caplog.at_level(logging.INFO):
        body = client.post("/predict", json=predict_body(tasks, None)).get_json()
    assert body["results"] == [[], []]  # Label Studio stores nothing: a later Retrieve tries again
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("task 2" in w and "HTTP 404" in w for w in warnings), warnings
    assert any(
        "1 of 2 task(s) got no prediction (1 no rectangle in the latest annotation)" in w for w in warnings
    ), warnings
