"""Label Studio payloads -> object requests in percent -> pixel prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from label_studio_sam2.labelstudio.protocol import (
    parse_context,
    parse_label_config,
    rectangles_of_annotation,
    task_data_url,
)
from label_studio_sam2.service.errors import BadRequest, TaskError
from tests.conftest import IMAGE_CONFIG, keypoint, rectangle

REQUESTS = Path(__file__).resolve().parents[2] / "shared" / "label-studio-requests.json"


def test_label_config_names_come_from_the_config_not_hard_coded():
    xml = """<View><Image name="photo" value="$img"/>
      <BrushLabels name="masks" toName="photo"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
      <KeyPointLabels name="clicks" toName="photo" smart="true"><Label value="Cat"/></KeyPointLabels></View>"""
    cfg = parse_label_config(xml)
    assert cfg.data_key("photo") == "img"
    out = cfg.output_control("photo", "Dog")
    assert (out.name, out.to_name, out.labels) == ("masks", "photo", ("Cat", "Dog"))
    assert cfg.controls_of("keypointlabels")[0].smart
    assert (
        task_data_url({"id": 3, "data": {"img": "/data/upload/1/a.png"}}, cfg, "photo")
        == "/data/upload/1/a.png"
    )


def test_real_label_studio_interactive_body_parses():
    if not REQUESTS.is_file():
        pytest.skip("shared/label-studio-requests.json not beside the checkout")
    body = json.loads(REQUESTS.read_text())["predict_interactive"]["body"]
    cfg = parse_label_config(body["label_config"])
    objs = parse_context(body["params"]["context"], cfg)
    assert len(objs) == 1
    (obj,) = objs
    assert (obj.to_name, obj.label, obj.from_name) == ("image", "object", "kp")
    # 50 % of the 64x48 image the UI showed
    np.testing.assert_allclose(obj.points_px(64, 48), [[32.0, 24.0]])
    assert obj.point_labels.tolist() == [1]


def test_keypoints_of_one_label_form_one_object_and_missing_is_positive_means_positive():
    cfg = parse_label_config(IMAGE_CONFIG)
    regions = [
        keypoint(10, 20, positive=None),  # plain click: LS omits is_positive
        keypoint(30, 40, positive=False),  # Alt-click
        keypoint(50, 60, positive=True),
        keypoint(70, 80, label="car"),
    ]
    objs = parse_context({"result": regions}, cfg)
    by_label = {o.label: o for o in objs}
    assert set(by_label) == {"object", "car"}
    assert by_label["object"].point_labels.tolist() == [1, 0, 1]
    assert by_label["car"].point_labels.tolist() == [1]


def test_percent_to_pixels_on_a_non_square_image():
    cfg = parse_label_config(IMAGE_CONFIG)
    (kp,) = parse_context({"result": [keypoint(25, 75)]}, cfg)
    np.testing.assert_allclose(kp.points_px(640, 200), [[160.0, 150.0]])  # x by width, y by height
    (box,) = parse_context({"result": [rectangle(10, 20, 30, 40)]}, cfg)
    np.testing.assert_allclose(box.box_px(640, 200), [64, 40, 64 + 192, 40 + 80])


def test_rotated_rectangle_uses_its_enclosing_box_in_pixels():
    cfg = parse_label_config(IMAGE_CONFIG)
    # 90 degrees clockwise about the top-left corner: the box swings to the left of (x, y)
    (box,) = parse_context({"result": [rectangle(50, 10, 10, 20, rotation=90)]}, cfg)
    w, h = 200, 100
    x0, y0, bw, bh = 100, 10, 20, 20
    np.testing.assert_allclose(box.box_px(w, h), [x0 - bh, y0, x0, y0 + bw], atol=1e-6)
    (tilted,) = parse_context({"result": [rectangle(20, 20, 20, 20, rotation=45)]}, cfg)
    x1, y1, x2, y2 = tilted.box_px(w, h)
    assert x2 - x1 > 40 and y2 - y1 > 20  # encloses, so larger than the unrotated 40x20 px


def test_boxes_are_clipped_to_the_image():
    cfg = parse_label_config(IMAGE_CONFIG)
    (box,) = parse_context({"result": [rectangle(90, 90, 30, 30)]}, cfg)
    np.testing.assert_allclose(box.box_px(100, 50), [90, 45, 100, 50])


@pytest.mark.parametrize(
    "context, message",
    [
        ("a string", "context must be an object"),
        ({"result": "x"}, "must be a list"),
        ({"result": [1]}, "region object"),
        ({"result": [{"type": "polygonlabels", "to_name": "image", "value": {}}]}, "region type"),
        ({"result": [{**keypoint(1, 2), "value": {"x": "1", "y": 2}}]}, "finite number"),
        (
            {"result": [{**rectangle(1, 2, 3, 4), "value": {"x": 1, "y": 2, "width": 0, "height": 3}}]},
            "width or height",
        ),
    ],
)
def test_malformed_context_is_a_bad_request_with_a_message(context, message):
    cfg = parse_label_config(IMAGE_CONFIG)
    with pytest.raises(BadRequest, match=message):
        parse_context(context, cfg)


@pytest.mark.parametrize("xml", [None, "", "<View><Image", 5])
def test_bad_label_config(xml):
    with pytest.raises(BadRequest):
        parse_label_config(xml)


def test_config_without_a_mask_output_says_so():
    cfg = parse_label_config('<View><Image name="i" value="$i"/><KeyPointLabels name="k" toName="i"/></View>')
    with pytest.raises(BadRequest, match="BrushLabels or PolygonLabels"):
        cfg.output_control("i", None)


def test_task_without_the_configured_data_key_is_a_task_error():
    cfg = parse_label_config(IMAGE_CONFIG)
    with pytest.raises(TaskError, match="'image'"):
        task_data_url({"id": 1, "data": {"img": "x"}}, cfg, "image")


def test_latest_annotation_rectangles_become_boxes():
    cfg = parse_label_config(IMAGE_CONFIG)
    old = {"id": 1, "updated_at": "2026-01-01T00:00:00Z", "result": [rectangle(0, 0, 10, 10)]}
    new = {
        "id": 2,
        "updated_at": "2026-02-01T00:00:00Z",
        "result": [rectangle(10, 10, 20, 20), rectangle(50, 50, 5, 5, "car")],
    }
    cancelled = {
        "id": 3,
        "updated_at": "2026-03-01T00:00:00Z",
        "was_cancelled": True,
        "result": [rectangle(1, 1, 1, 1)],
    }
    objs = rectangles_of_annotation({"annotations": [old, new, cancelled]}, cfg)
    assert [o.label for o in objs] == ["object", "car"]
    assert objs[0].rect_pct == (10, 10, 20, 20)
