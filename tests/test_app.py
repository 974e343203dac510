"""The ML backend protocol through Flask's test client, with a tiny model and real HTTP media."""

from __future__ import annotations

import base64
import json
import logging

import numpy as np
import pytest

from tests.conftest import decode_brush, keypoint, noise_image, predict_body, rectangle


def test_health_setup_webhook(client):
    health = client.get("/health").get_json()
    assert health["status"] == "UP" and health["model_loaded"] is True
    setup = client.post(
        "/setup", json={"project": "1.17", "schema": "<View></View>", "hostname": "x", "access_token": "t"}
    )
    assert setup.status_code == 200 and setup.get_json()["model_version"].startswith("sam2")
    hook = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {}})
    assert hook.status_code == 200
    # unknown events are fine; a body not declared JSON is not (a web page could send it)
    assert client.post("/webhook", data="not json", content_type="application/json").status_code == 200
    assert client.post("/webhook", data="not json").status_code == 415


def test_click_returns_a_brush_mask_of_the_image_size(client, media_server):
    url = media_server.add_image("a.png", noise_image(48, 64))
    resp = client.post("/predict", json=predict_body([{"id": 1, "data": {"image": url}}], [keypoint(50, 50)]))
    assert resp.status_code == 200
    body = resp.get_json()
    (entry,) = body["results"]
    assert entry["model_version"].startswith("sam2")
    (region,) = entry["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["object"]
    assert (region["from_name"], region["to_name"]) == ("tag", "image")
    assert (region["original_width"], region["original_height"]) == (64, 48)
    mask = decode_brush(region)
    assert mask.shape == (48, 64) and mask.any()
    assert 0 <= region["score"] <= 1 and entry["score"] == pytest.approx(region["score"])


def test_every_task_is_answered_in_order_and_a_broken_one_does_not_sink_the_rest(client, media_server):
    ok1 = media_server.add_image("1.png", noise_image(30, 40))
    ok2 = media_server.add_image("2.png", noise_image(50, 20, seed=3))
    not_image = media_server.add("3.png", b"<html>nope</html>")
    tasks = [
        {"id": 1, "data": {"image": ok1}},
        {"id": 2, "data": {"image": media_server.url + "/missing.png"}},
        {"id": 3, "data": {"image": not_image}},
        {"id": 4, "data": {"image": ok2}},
        {"id": 5, "data": {}},
    ]
    body = client.post("/predict", json=predict_body(tasks, [keypoint(40, 40)])).get_json()
    results = body["results"]
    assert len(results) == len(tasks)
    assert decode_brush(results[0]["result"][0]).shape == (30, 40)
    assert "404" in results[1]["error"] and results[1]["result"] == []
    assert "not an image" in results[2]["error"]
    assert decode_brush(results[3]["result"][0]).shape == (50, 20)
    assert "'image'" in results[4]["error"]


def test_exif_rotated_image_reports_the_displayed_size(client, media_server):
    stored = noise_image(40, 100)  # stored landscape, displayed portrait (orientation 6)
    url = media_server.add_image("r.jpg", stored, exif_orientation=6, fmt="JPEG")
    body = client.post(
        "/predict", json=predict_body([{"id": 1, "data": {"image": url}}], [keypoint(50, 10)])
    ).get_json()
    region = body["results"][0]["result"][0]
    assert (region["original_width"], region["original_height"]) == (40, 100)
    assert decode_brush(region).shape == (100, 40)


@pytest.mark.parametrize(
    "body, status, message",
    [
        ("not json", 400, "JSON object"),
        ([1, 2], 400, "JSON object"),
        ({"label_config": "<View/>"}, 400, "tasks"),
        ({"tasks": [], "label_config": "<View/>"}, 400, "tasks"),
        ({"tasks": ["x"], "label_config": "<View/>"}, 400, "task object"),
        ({"tasks": [{"id": 1}]}, 400, "label_config"),
        ({"tasks": [{"id": 1}], "label_config": "<View"}, 400, "not valid XML"),
        ({"tasks": [{"id": 1}], "label_config": "<View/>", "params": {"context": "x"}}, 400, "context"),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_message(client, body, status, message):
    if isinstance(body, str):
        resp = client.post("/predict", data=body, content_type="application/json")
    else:
        resp = client.post("/predict", json=body)
    assert resp.status_code == status
    assert message in resp.get_json()["error"]
    assert client.get("/health").status_code == 200  # still serving


def test_unknown_region_type_is_a_bad_request(client, media_server):
    url = media_server.add_image("a.png", noise_image(10, 10))
    region = {**keypoint(5, 5), "type": "ellipselabels"}
    resp = client.post("/predict", json=predict_body([{"id": 1, "data": {"image": url}}], [region]))
    assert resp.status_code == 400 and "ellipselabels" in resp.get_json()["error"]


def test_decompression_bomb_is_a_task_error(app_factory, media_server):
    client = app_factory(max_image_mp=1.0).test_client()
    url = media_server.add_image("bomb.png", np.zeros((1500, 1500, 3), np.uint8))
    body = client.post(
        "/predict", json=predict_body([{"id": 1, "data": {"image": url}}], [keypoint(5, 5)])
    ).get_json()
    assert "MP limit" in body["results"][0]["error"]


def test_box_then_clicks_combines_the_remembered_box_and_refines(app_factory, media_server):
    app = app_factory()
    client = app.test_client()
    seen = []
    predictor = app.extensions["sam2"].segmenter.predictor
    original = predictor.predict

    def spy(key, image, prompts, **kw):
        seen.append(prompts)
        return original(key, image, prompts, **kw)

    predictor.predict = spy
    url = media_server.add_image("a.png", noise_image(50, 100))
    task = {"id": 42, "data": {"image": url}}
    client.post("/predict", json=predict_body([task], [rectangle(10, 20, 50, 40, w=100, h=50)]))
    client.post("/predict", json=predict_body([task], [keypoint(30, 40, w=100, h=50)]))
    client.post(
        "/predict",
        json=predict_body([task], [keypoint(30, 40, w=100, h=50), keypoint(50, 50, positive=False)]),
    )
    (box_prompt,), (click1,), (click2,) = seen
    np.testing.assert_allclose(box_prompt.box_xyxy, [10, 10, 60, 30])
    np.testing.assert_allclose(click1.box_xyxy, [10, 10, 60, 30])  # the box came from memory
    np.testing.assert_allclose(click1.points_xy, [[30, 20]])
    assert click2.point_labels.tolist() == [1, 0]
    assert click2.mask_logits is not None  # previous mask fed back as a dense prompt
    # another label or another task does not inherit the box
    client.post("/predict", json=predict_body([task], [keypoint(30, 40, label="car", w=100, h=50)]))
    client.post("/predict", json=predict_body([{**task, "id": 43}], [keypoint(30, 40, w=100, h=50)]))
    assert seen[3][0].box_xyxy is None and seen[4][0].box_xyxy is None


def test_retrieve_predictions_turns_annotation_boxes_into_masks(client, media_server):
    url = media_server.add_image("a.png", noise_image(40, 80))
    annotation = {
        "id": 1,
        "result": [rectangle(10, 10, 30, 50, w=80, h=40), rectangle(60, 20, 20, 40, "car", w=80, h=40)],
    }
    tasks = [
        {"id": 1, "data": {"image": url}, "annotations": [annotation]},
        {"id": 2, "data": {"image": url}},
    ]
    body = client.post("/predict", json=predict_body(tasks, None)).get_json()
    first, second = body["results"]
    labels = [r["value"]["brushlabels"] for r in first["result"]]
    assert len(labels) <= 2 and set(map(tuple, labels)) <= {("object",), ("car",)}
    for region in first["result"]:
        assert decode_brush(region).shape == (40, 80)
    assert second == []  # no rectangle: nothing for Label Studio to store


@pytest.mark.parametrize(
    "settings",
    [{}, {"retrieve_mode": "none"}, {"retrieve_mode": "auto", "roi_label": "object"}],
    ids=["boxes", "none", "auto-without-roi"],
)
def test_a_task_with_nothing_to_predict_is_answered_with_nothing_to_store(
    app_factory, media_server, settings
):
    """Opening a task makes Label Studio call /predict without context and store what comes back
    as a prediction of this model version, which hides the task from every later Retrieve and
    from `preannotate`. For [] it stores nothing."""
    client = app_factory(**settings).test_client()
    url = media_server.add_image("a.png", noise_image(40, 80))
    point = {"id": 1, "result": [keypoint(50, 50, w=80, h=40)]}  # an annotation without rectangles
    tasks = [{"id": 1, "data": {"image": url}}, {"id": 2, "data": {"image": url}, "annotations": [point]}]
    body = client.post("/predict", json=predict_body(tasks, None)).get_json()
    assert body["results"] == [[], []]


def test_basic_auth_protects_all_but_health(app_factory, caplog):
    client = app_factory(basic_auth_user="ml", basic_auth_pass="s3cret-pass").test_client()
    assert client.get("/health").status_code == 200
    assert client.post("/setup", json={}).status_code == 401
    wrong = base64.b64encode(b"ml:nope").decode()
    with caplog.at_level(logging.DEBUG):
        assert (
            client.post("/predict", json={}, headers={"Authorization": f"Basic {wrong}"}).status_code == 401
        )
    right = base64.b64encode(b"ml:s3cret-pass").decode()
    assert (
        client.post("/setup", json={"project": "1"}, headers={"Authorization": f"Basic {right}"}).status_code
        == 200
    )
    assert "s3cret-pass" not in caplog.text and "bm9wZQ" not in caplog.text


def test_setup_remembers_the_label_config_for_the_project(client, media_server):
    from tests.conftest import IMAGE_CONFIG

    client.post("/setup", json={"project": "9.123", "schema": IMAGE_CONFIG})
    url = media_server.add_image("a.png", noise_image(20, 20))
    body = {
        "tasks": [{"id": 1, "data": {"image": url}}],
        "project": "9.456",
        "params": {"context": {"result": [keypoint(5, 5)]}},
    }
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200 and resp.get_json()["results"][0]["result"]


def test_metrics_count_requests_and_cache(client, media_server):
    url = media_server.add_image("a.png", noise_image(20, 20))
    for _ in range(2):
        client.post("/predict", json=predict_body([{"id": 1, "data": {"image": url}}], [keypoint(5, 5)]))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'sam2_requests_total{endpoint="/predict",outcome="ok"} 2.0' in text
    assert "sam2_embedding_cache_hits" in text and 'sam2_model_seconds_count{part="decoder"}' in text


def test_model_that_cannot_load_gives_503_with_instructions(tmp_path):
    from label_studio_sam2.labelstudio.app import create_app
    from label_studio_sam2.service.settings import Settings

    app = create_app(Settings.from_env(model=str(tmp_path / "nope.pt")))
    client = app.test_client()
    app.extensions["sam2"].ready.wait(10)
    health = client.get("/health")
    # not "UP": Label Studio would list the backend as Connected while every click gets a 503
    assert health.status_code == 503 and health.get_json()["status"] == "ERROR"
    assert health.get_json()["model_loaded"] is False
    resp = client.post("/predict", json=predict_body([{"id": 1, "data": {"image": "x"}}], None))
    assert resp.status_code == 503 and "does not exist" in resp.get_json()["error"]
    assert resp.headers["Retry-After"]


def test_context_at_the_top_level_is_accepted(client, media_server):
    url = media_server.add_image("a.png", noise_image(20, 30))
    body = predict_body([{"id": 1, "data": {"image": url}}], None)
    body["context"] = {"result": [keypoint(50, 50)]}
    assert client.post("/predict", json=body).get_json()["results"][0]["result"]


def test_response_is_json_serialisable_plain_types(client, media_server):
    url = media_server.add_image("a.png", noise_image(20, 30))
    body = client.post(
        "/predict", json=predict_body([{"id": 1, "data": {"image": url}}], [keypoint(50, 50)])
    ).get_json()
    json.dumps(body)
    assert all(isinstance(v, int) and 0 <= v < 256 for v in body["results"][0]["result"][0]["value"]["rle"])


def test_retrieve_predictions_answers_a_failed_task_with_nothing_to_store(client, media_server):
    """Label Studio stores an error entry as an empty prediction of this model version, which
    would stop every later Retrieve from trying the task again; [] stores nothing."""
    good = media_server.add_image("a.png", noise_image(40, 80))
    annotation = {"id": 1, "result": [rectangle(10, 10, 30, 50, w=80, h=40)]}
    tasks = [
        {"id": 1, "data": {"image": media_server.url + "/missing.png"}, "annotations": [annotation]},
        {"id": 2, "data": {"image": good}, "annotations": [annotation]},
    ]
    failed, ok = client.post("/predict", json=predict_body(tasks, None)).get_json()["results"]
    assert failed == []
    assert ok["model_version"].startswith("sam2") and "error" not in ok


def test_create_app_only_composes_the_runtime_views_and_middleware():
    """create_app wires parts (runtime, views, error handlers, middleware) and holds no handler
    of its own: at most 60 lines (it was a 193-line function of 11 nested handlers)."""
    import ast
    import inspect

    from label_studio_sam2.labelstudio import app

    tree = ast.parse(inspect.getsource(app))
    (factory,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "create_app"]
    assert factory.end_lineno - factory.lineno + 1 <= 60
    nested = [n.name for n in ast.walk(factory) if isinstance(n, ast.FunctionDef) and n is not factory]
    assert not nested


def test_service_errors_carry_a_kind_and_only_the_adapter_knows_http_statuses():
    """No raise in the service passes an HTTP status; every kind of error has its status in the
    adapter's one table (the statuses the API answers are asserted by the endpoint tests)."""
    import ast
    from pathlib import Path

    from label_studio_sam2.labelstudio.middleware import HTTP_STATUS
    from label_studio_sam2.service.errors import BackendError, Kind

    service = Path(__file__).resolve().parent.parent / "label_studio_sam2" / "service"
    numbered = []
    for path in sorted(service.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                values = [*node.exc.args, *(k.value for k in node.exc.keywords)]
                if any(isinstance(v, ast.Constant) and type(v.value) is int for v in values):
                    numbered.append(f"{path.name}:{node.lineno}")
    assert not numbered
    assert not hasattr(BackendError("x"), "status")
    with pytest.raises(TypeError):  # a caller still passing a status number fails at once
        BackendError("x", 502)
    assert set(HTTP_STATUS) == set(Kind)


def test_the_middleware_guards_another_adapter_s_wsgi_app():
    """Auth, admission and metrics wrap any WSGI app, not only this Flask one: a second adapter
    serving the same runtime keeps all three."""
    import threading

    from werkzeug.test import Client

    from label_studio_sam2.labelstudio.middleware import AdmitRequests, guard
    from label_studio_sam2.service.admission import AdmissionQueue
    from label_studio_sam2.service.metrics import Metrics
    from label_studio_sam2.service.settings import Settings

    inside, release = threading.Event(), threading.Event()

    def other_tool(environ, start_response):
        inside.set()
        release.wait(10)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    metrics = Metrics()
    settings = Settings.from_env(basic_auth_user="ml", basic_auth_pass="s3cret-pass")
    admission = AdmissionQueue(settings.admission_queue_size)
    metrics.watch_admission(admission)
    client = Client(guard(other_tool, settings, metrics, admission))
    release.set()
    assert client.post("/predict", json={}).status_code == 401
    auth = {"Authorization": "Basic " + base64.b64encode(b"ml:s3cret-pass").decode()}
    assert client.post("/predict", json={}, headers=auth).status_code == 200
    refused = client.post("/predict", data="x", content_type="text/plain", headers=auth)
    assert refused.status_code == 415 and "application/json" in refused.get_json()["error"]
    scraped = metrics.scrape().decode()
    for outcome in ("401", "ok", "415"):
        assert f'sam2_requests_total{{endpoint="/predict",outcome="{outcome}"}} 1.0' in scraped

    release.clear()
    inside.clear()
    admit = Client(AdmitRequests(other_tool, AdmissionQueue(1), metrics))
    first = threading.Thread(target=admit.post, args=("/predict",), kwargs={"json": {}})
    first.start()
    assert inside.wait(10)
    busy = admit.post("/predict", json={})
    release.set()
    first.join(10)
    assert busy.status_code == 503 and busy.headers["Retry-After"].isdigit()
    assert "queue is full" in busy.get_json()["error"]
    assert admit.post("/predict", json={}).status_code == 200  # the slot was given back
