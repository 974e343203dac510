"""The tool-neutral segmentation service (label_studio_sam2.service.segment) as a second
annotation tool would call it: an image, boxes and clicks in pixels, its own opaque memory keys;
masks and scores back. Nothing of Label Studio here (tests/test_app.py checks the same through
Label Studio's requests)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from label_studio_sam2.engine.image import ImagePredictor
from label_studio_sam2.service.media import MediaClient
from label_studio_sam2.service.segment import ImageSegmenter, ObjectPrompt
from tests.conftest import encode_image, noise_image


@pytest.fixture
def service(tiny_model):
    predictor = ImagePredictor(tiny_model)
    seen = []
    original = predictor.predict

    def spy(key, image, prompts, **kw):
        seen.append(prompts)
        return original(key, image, prompts, **kw)

    predictor.predict = spy
    segmenter = ImageSegmenter(predictor, MediaClient(), "test")
    uri = "data:image/png;base64," + base64.b64encode(encode_image(noise_image(50, 100))).decode()
    return segmenter, segmenter.load_image(uri), seen


def click(x: float, y: float, positive: bool = True) -> tuple:
    return (x, y), 1 if positive else 0


def points(*clicks) -> dict:
    return {
        "points_xy": np.array([c[0] for c in clicks], dtype=np.float64),
        "point_labels": np.array([c[1] for c in clicks], dtype=np.int64),
    }


def test_a_box_then_clicks_under_the_tool_s_own_key_refine_one_object(service):
    segmenter, image, seen = service
    car = ("cvat", "job-7", "frame-3", "car")  # whatever the tool names its objects with
    (box_mask,) = segmenter.segment(
        image, [ObjectPrompt(box_xyxy=np.array([10, 10, 60, 30]), memory_key=car)]
    )
    assert box_mask.mask.shape == (50, 100) and 0.0 <= box_mask.score <= 1.0
    segmenter.segment(image, [ObjectPrompt(**points(click(30, 20)), memory_key=car)])
    segmenter.segment(image, [ObjectPrompt(**points(click(30, 20), click(50, 25, False)), memory_key=car)])
    segmenter.segment(
        image, [ObjectPrompt(**points(click(30, 20)), memory_key=("cvat", "job-7", "frame-3", "bus"))]
    )
    segmenter.segment(image, [ObjectPrompt(**points(click(30, 20)))])  # no key: nothing remembered
    (box,), (click1,), (click2,), (other,), (unkeyed,) = seen
    np.testing.assert_allclose(box.box_xyxy, [10, 10, 60, 30])
    np.testing.assert_allclose(click1.box_xyxy, [10, 10, 60, 30])  # the box came from memory
    assert click1.mask_logits is not None  # the box's mask, refined by the click
    assert click2.point_labels.tolist() == [1, 0] and click2.mask_logits is not None
    np.testing.assert_allclose(click2.box_xyxy, [10, 10, 60, 30])
    assert other.box_xyxy is None and other.mask_logits is None  # another object inherits nothing
    assert unkeyed.box_xyxy is None and unkeyed.mask_logits is None


def test_an_undone_click_starts_from_the_prompts_alone(service):
    segmenter, image, seen = service
    key = ("any", 1)
    segmenter.segment(image, [ObjectPrompt(**points(click(30, 20), click(50, 25, False)), memory_key=key)])
    segmenter.segment(image, [ObjectPrompt(**points(click(30, 20)), memory_key=key)])  # one click removed
    assert seen[-1][0].mask_logits is None
