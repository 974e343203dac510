"""label_studio_sam2.engine.automask: grid prompts, IoU and stability filters, our own NMS, ROIs.

Most tests run the generator on a stand-in for the SAM2 model that "segments" by colour (the
encoder keeps the resized image, the decoder returns the region of the clicked colour), on images
of flat-coloured shapes with known boxes: the expected masks are known exactly, so filtering,
suppression and the mapping back to image pixels are checked against ground truth. One test runs
the real (tiny, random) SAM2 decoder through the same code.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from devkit.scenes import iou
from label_studio_sam2.engine.automask import (
    AutoMask,
    AutoMaskConfig,
    AutoMaskGenerator,
    box_iou,
    box_nms,
    mask_nms,
    point_grid,
    stability_scores,
)
from label_studio_sam2.engine.image import ImagePredictor
from label_studio_sam2.engine.models import LoadedModel
from label_studio_sam2.engine.transforms import IMAGENET_MEAN, IMAGENET_STD, mask_boxes

# --- a colour-segmenting stand-in for Sam2Model ------------------------------------------------

SHAPE_IOU, UNSTABLE_IOU, BACKGROUND_IOU, WHOLE_IOU = 0.95, 0.97, 0.6, 0.3
BLACK = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)  # normalised black


class ColourSam(torch.nn.Module):
    """Three candidates per click: the clicked colour's region (stable; predicted IoU 0.95, or
    0.6 on the black background), the same region with logits near 0 (unstable, 0.97) and the
    whole image (0.3)."""

    def get_image_embeddings(self, pixel_values):
        return [pixel_values]

    def forward(self, image_embeddings, input_points, input_labels, multimask_output=True, **_):
        img = image_embeddings[0][0]  # (3, S, S), normalised
        s = img.shape[-1]
        low = F.interpolate(img[None], size=(s // 4, s // 4), mode="nearest")[0]
        h, w = low.shape[1:]
        pts = input_points[0, :, 0]  # (B, 2) model input pixels
        px = ((pts[:, 0] + 0.5) / 4).long().clamp(0, w - 1)
        py = ((pts[:, 1] + 0.5) / 4).long().clamp(0, h - 1)
        colours = low[:, py, px].T  # (B, 3)
        same = (low[None] - colours[:, :, None, None]).abs().amax(1) < 0.05  # (B, h, w)
        background = (colours - BLACK).abs().amax(1) < 0.05
        logits = torch.stack(
            [
                torch.where(same, 10.0, -10.0),
                torch.where(same, 0.5, -0.5),
                torch.full_like(same, 10.0, dtype=torch.float32),
            ],
            dim=1,
        )[None]
        iou = torch.stack(
            [
                torch.where(background, BACKGROUND_IOU, SHAPE_IOU),
                torch.full_like(background, UNSTABLE_IOU, dtype=torch.float32),
                torch.full_like(background, WHOLE_IOU, dtype=torch.float32),
            ],
            dim=1,
        )[None]
        # the fields Sam2Model's output has (object presence: always present here)
        presence = torch.full((1, logits.shape[1], 1), 10.0)
        return SimpleNamespace(pred_masks=logits, iou_scores=iou, object_score_logits=presence)


@pytest.fixture
def colour_predictor():
    return ImagePredictor(LoadedModel(ColourSam(), "fake", "colour", torch.device("cpu"), 1024))


COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 240), (240, 220, 30), (200, 60, 220)]


def shapes_image(hw=(160, 240), boxes=((20, 20, 90, 70), (130, 30, 220, 120), (40, 100, 100, 150))):
    """Black image with flat-coloured rectangles at `boxes` (x1, y1, x2, y2 int pixels, exclusive)."""
    img = np.zeros((*hw, 3), np.uint8)
    masks = []
    for (x1, y1, x2, y2), colour in zip(boxes, COLOURS, strict=False):
        img[y1:y2, x1:x2] = colour
        m = np.zeros(hw, bool)
        m[y1:y2, x1:x2] = True
        masks.append(m)
    return img, masks


def cfg(**kw) -> AutoMaskConfig:
    return AutoMaskConfig(**{"points_per_side": 16, "mask_nms_thresh": None, **kw})


# --- helpers -----------------------------------------------------------------------------------


def test_point_grid_holds_cell_centres_row_by_row():
    g = point_grid(4)
    assert g.shape == (16, 2)
    assert np.allclose(g[:4, 0], [0.125, 0.375, 0.625, 0.875]) and np.allclose(g[:4, 1], 0.125)
    assert g.min() > 0 and g.max() < 1


def test_box_nms_matches_a_brute_force_reference():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (60, 2))], 1)
    scores = rng.uniform(0, 1, 60)
    keep = box_nms(boxes, scores, 0.5)
    expected = []
    for i in np.argsort(-scores):
        if all(box_iou(boxes[i], boxes[j])[0, 0] <= 0.5 for j in expected):
            expected.append(i)
    assert keep.tolist() == expected


def test_box_nms_keeps_the_best_of_overlapping_boxes_and_distinct_ones():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]], float)
    assert box_nms(boxes, np.array([0.5, 0.9, 0.7, 0.1]), 0.5).tolist() == [1, 2]
    assert box_nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0])[0, 0] == 0.0  # empty boxes never suppress


def test_stability_and_mask_boxes():
    logits = torch.full((3, 8, 10), -5.0)
    logits[0, 2:4, 3:7] = 5.0  # crisp: stability 1
    logits[1, 2:4, 3:7] = 0.5  # barely above 0: stability 0
    s = stability_scores(logits, 1.0)
    assert s.tolist() == [1.0, 0.0, 0.0]  # the empty third one scores 0
    assert mask_boxes(logits > 0).tolist() == [[3, 2, 7, 4], [3, 2, 7, 4], [0, 0, 0, 0]]


def test_mask_nms_drops_a_mask_inside_a_better_one_with_the_same_pixels():
    a = AutoMask(np.ones((10, 10), bool), (0, 0, 10, 10), (20, 20), 0.9, 1.0, np.zeros(2))
    b = AutoMask(np.ones((10, 9), bool), (0, 0, 9, 10), (20, 20), 0.8, 1.0, np.zeros(2))
    c = AutoMask(np.ones((5, 5), bool), (15, 15, 20, 20), (20, 20), 0.7, 1.0, np.zeros(2))
    assert [m.score for m in mask_nms([b, c, a], 0.8)] == [0.9, 0.7]


# --- the generator on known shapes -------------------------------------------------------------


def test_every_shape_is_found_once_with_its_box(colour_predictor):
    img, truth = shapes_image()
    gen = AutoMaskGenerator(colour_predictor, cfg())
    masks = gen.generate("shapes", img)
    assert len(masks) == len(truth)
    for m in masks:
        assert m.full().shape == img.shape[:2]
        best = max(iou(m.full(), t) for t in truth)
        assert best > 0.9
        assert m.score == pytest.approx(SHAPE_IOU)  # the unstable, higher-scored twin was filtered
        assert m.stability == 1.0
    found = sorted(m.box for m in masks)
    expected = sorted([(20, 20, 90, 70), (130, 30, 220, 120), (40, 100, 100, 150)])
    assert np.abs(np.array(found) - np.array(expected)).max() <= 2
    # one encoder pass, the 256 grid points in batches of 64
    assert colour_predictor.encoder_calls == 1
    assert colour_predictor.decoder_calls == math.ceil(16 * 16 / 64)


def test_filters_decide_what_survives(colour_predictor):
    img, truth = shapes_image()  # an 8x8 grid puts points on shape edges: thin slivers, < 100 px
    loose = AutoMaskGenerator(
        colour_predictor, cfg(points_per_side=8, min_area_px=100, stability_thresh=0.0)
    ).generate("s", img)
    assert {round(m.score, 2) for m in loose} >= {UNSTABLE_IOU}  # unstable twins now win NMS
    low_iou = AutoMaskGenerator(
        colour_predictor, cfg(points_per_side=8, min_area_px=100, pred_iou_thresh=0.5)
    ).generate("s", img)
    assert len(low_iou) == len(truth) + 1  # the background joins
    (big,) = AutoMaskGenerator(colour_predictor, cfg(points_per_side=8, min_area_px=5000)).generate("s", img)
    assert iou(big.full(), truth[1]) > 0.9  # 90x90 px; the others are 70x50 and 60x50
    capped = AutoMaskGenerator(
        colour_predictor, cfg(points_per_side=8, min_area_px=100, max_masks=1)
    ).generate("s", img)
    assert len(capped) == 1


def test_rois_crop_and_encode_their_window(colour_predictor):
    img, truth = shapes_image()
    gen = AutoMaskGenerator(colour_predictor, cfg(points_per_side=8))
    loads = []

    def loader():
        loads.append(1)
        return img

    masks = gen.generate("shapes", loader, rois_xyxy=np.array([[120, 20, 230, 130]]))
    assert len(masks) == 1 and iou(masks[0].full(), truth[1]) > 0.9
    assert colour_predictor.encoder_calls == 1  # the crop only, never the whole image
    assert len(loads) == 1
    # a ROI that cuts a shape: its mask stays inside the ROI
    (cut,) = gen.generate("shapes", img, rois_xyxy=np.array([[10.4, 10, 55.6, 80]]), image_hw=img.shape[:2])
    assert cut.box[2] == 56  # clipped at the ROI's right edge
    assert np.abs(np.array(cut.box) - [20, 20, 56, 70]).max() <= 1
    assert iou(cut.full(), truth[0] & (np.arange(240) < 56)[None, :]) > 0.9


def test_rois_on_the_whole_image_embedding_share_one_encoder_pass(colour_predictor):
    img, truth = shapes_image()
    gen = AutoMaskGenerator(colour_predictor, cfg(points_per_side=8, crop_rois=False))
    rois = np.array([[120, 20, 230, 130], [30, 90, 110, 160], [0, 0, 2.5, 1]])  # the last: too small
    masks = gen.generate("shapes", img, rois_xyxy=rois)
    assert colour_predictor.encoder_calls == 1
    assert len(masks) == 2
    assert sorted(max(iou(m.full(), t) for t in truth) > 0.9 for m in masks) == [True, True]
    assert gen.generate("shapes", img, rois_xyxy=np.zeros((0, 4))) == []


def test_overlapping_rois_do_not_report_an_object_twice(colour_predictor):
    img, truth = shapes_image()
    gen = AutoMaskGenerator(colour_predictor, cfg(points_per_side=8))
    masks = gen.generate("shapes", img, rois_xyxy=np.array([[120, 20, 230, 130], [125, 25, 235, 135]]))
    assert len(masks) == 1 and iou(masks[0].full(), truth[1]) > 0.9


def test_the_real_decoder_runs_through_the_same_code(tiny_model):
    predictor = ImagePredictor(tiny_model)
    gen = AutoMaskGenerator(
        predictor,
        AutoMaskConfig(points_per_side=5, points_per_batch=10, pred_iou_thresh=0, stability_thresh=0),
    )
    img = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    masks = gen.generate("noise", img)
    assert predictor.encoder_calls == 1 and predictor.decoder_calls == 3
    for m in masks:
        assert m.full().shape == (50, 70) and 0 <= m.score <= 1 and m.area > 0
    assert [m.score for m in masks] == sorted((m.score for m in masks), reverse=True)


def test_skip_covered_finds_the_same_shapes_from_fewer_points(colour_predictor):
    """The fast mode decodes the coarse grid, then only points outside masks already kept."""
    img, truth = shapes_image()
    decoded = {}
    for fast in (False, True):
        gen = AutoMaskGenerator(colour_predictor, cfg(skip_covered=fast))
        seen = []
        decode = gen._decode_points
        gen._decode_points = lambda emb, pts, seen=seen, decode=decode: (
            seen.append(len(pts)),
            decode(emb, pts),
        )[1]
        masks = gen.generate("shapes", img)
        decoded[fast] = sum(seen)
        assert len(masks) == len(truth)
        for t in truth:
            assert max(iou(m.full(), t) for m in masks) > 0.9
    assert decoded[False] == 16 * 16
    covered_share = sum(t.mean() for t in truth)  # points inside a shape, found by a coarse point
    assert decoded[True] <= 16 * 16 * (1 - 0.75 * covered_share) + 16


def test_fast_mode_recovers_the_full_runs_masks_from_fewer_points():
    """AUTO_FAST on the trained fixture: the full run's masks come back (IoU >= 0.9) while far
    fewer grid points are decoded (bench.auto measures this on more image kinds)."""
    from devkit.scenes import make_scene
    from label_studio_sam2.engine.automask import mask_iou
    from label_studio_sam2.engine.models import load_image_model
    from tests.test_behaviour import FIXTURE

    pred = ImagePredictor(load_image_model(str(FIXTURE), "cpu", cpu_precision="fp32"))
    full_gen = AutoMaskGenerator(pred, AutoMaskConfig(points_per_side=16))
    fast_gen = AutoMaskGenerator(pred, AutoMaskConfig(points_per_side=16, skip_covered=True))
    found = []
    for seed in range(8):
        img = make_scene(seed).image
        full = full_gen.generate(f"scene{seed}", img)
        fast = fast_gen.generate(f"scene{seed}", img)
        found += [max((mask_iou(r, m) for m in fast), default=0.0) >= 0.9 for r in full]
    assert len(found) >= 8, "too few reference masks for a recall"
    assert np.mean(found) >= 0.9, found
    assert full_gen.points_decoded == 8 * 256
    assert fast_gen.points_decoded <= 0.6 * full_gen.points_decoded
