"""Our vectorised brush RLE encoder against the Label Studio SDK's reference decoder and encoder."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import decode_rle, encode_rle

from label_studio_sam2.labelstudio.rle import decode_mask, encode_mask

# The SDK decoder walks the bitstream one Python string slice at a time: keep masks modest.
PROPERTY = settings(max_examples=200, deadline=None)

# Run lengths in pixels around the field-size limits: 4 bytes a pixel, so 2/4/64 pixels fill
# the 3/4/8-bit fields and 16384 pixels one 65536-byte chunk.
EDGE_RUNS_PX = [1, 2, 3, 4, 5, 63, 64, 65, 16383, 16384, 16385, 32768, 32769]


def assert_round_trip(mask: np.ndarray) -> list[int]:
    """Encode `mask` (H, W), decode with the SDK and check every RGBA channel is mask * 255."""
    h, w = mask.shape
    rle = encode_mask(mask)
    assert all(type(b) is int and 0 <= b <= 255 for b in rle)
    data = decode_rle(rle)
    assert data.size == h * w * 4
    expected = np.where(mask != 0, 255, 0).astype(np.uint8)
    np.testing.assert_array_equal(data.reshape(h, w, 4), np.repeat(expected[:, :, None], 4, axis=2))
    return rle


def sdk_encode(mask: np.ndarray) -> list[int]:
    return encode_rle(np.repeat(np.where(mask.ravel() != 0, 255, 0), 4))


@st.composite
def random_masks(draw, max_side: int = 64) -> np.ndarray:
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    density = draw(st.sampled_from([0.0, 0.001, 0.05, 0.3, 0.5, 0.7, 0.95, 0.999, 1.0]) | st.floats(0, 1))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).random((h, w)) < density


@st.composite
def masks_from_runs(draw) -> np.ndarray:
    """A 1 x N mask made of alternating runs whose lengths sit on the chunk size limits."""
    lengths = draw(st.lists(st.sampled_from(EDGE_RUNS_PX) | st.integers(1, 300), min_size=1, max_size=8))
    first = draw(st.booleans())
    values = np.arange(len(lengths)) % 2 == (0 if first else 1)
    return np.repeat(values, lengths)[None, :]


@PROPERTY
@given(random_masks())
def test_random_masks_round_trip(mask):
    assert_round_trip(mask)


@PROPERTY
@given(st.one_of(random_masks(max_side=32), masks_from_runs()))
def test_same_bytes_as_sdk_encoder(mask):
    assert encode_mask(mask) == sdk_encode(mask)


@PROPERTY
@given(masks_from_runs())
def test_runs_on_chunk_size_limits_round_trip(mask):
    assert_round_trip(mask)


@PROPERTY
@given(random_masks(max_side=200))
def test_header_holds_byte_count_and_field_sizes(mask):
    h, w = mask.shape
    header = int.from_bytes(bytes(encode_mask(mask)[:7]), "big") >> 3  # the first 53 bits
    assert header >> 21 == h * w * 4
    # wordSize - 1 = 7 in 5 bits, then rleSize - 1 for fields of 3, 4, 8 and 16 bits.
    assert header & (2**21 - 1) == 0b00111_0010_0011_0111_1111


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (1, 97), (97, 1), (2, 3), (89, 97), (101, 7)])
@pytest.mark.parametrize("fill", ["empty", "full", "noise", "checkerboard", "random"])
def test_odd_sizes(shape, fill):
    rng = np.random.default_rng(sum(shape))
    mask = {
        "empty": np.zeros(shape, bool),
        "full": np.ones(shape, bool),
        "noise": rng.random(shape) < 0.02,
        "checkerboard": np.indices(shape).sum(axis=0) % 2 == 1,
        "random": rng.random(shape) < 0.5,
    }[fill]
    assert_round_trip(mask)


def test_single_pixel_noise():
    # An odd-width checkerboard flattens to one run a pixel: the worst case, 14 bits a pixel.
    mask = np.indices((63, 63)).sum(axis=0) % 2 == 0
    rle = assert_round_trip(mask)
    assert len(rle) == (53 + 63 * 63 * 14) // 8 + 1


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int64, np.float32])
def test_any_nonzero_dtype_is_on(dtype):
    mask = np.array([[0, 1, 7], [0, 0, 255]]).astype(dtype)
    assert encode_mask(mask) == encode_mask(mask != 0)


def test_views_encode_like_copies():
    mask = np.random.default_rng(1).random((30, 40)) < 0.3
    for view in (mask.T, mask[::2, ::3], mask[:, 5:-5]):
        assert_round_trip(view)
        assert encode_mask(view) == encode_mask(np.ascontiguousarray(view))


def test_full_mask_runs_longer_than_one_chunk():
    # 300 * 300 * 4 = 360000 bytes: five full 65536-byte chunks and the rest.
    rle = assert_round_trip(np.ones((300, 300), bool))
    assert rle == sdk_encode(np.ones((300, 300), bool))


def test_large_mask_with_a_small_hole():
    mask = np.ones((1000, 1000), bool)
    mask[500:503, 400:404] = False
    rle = assert_round_trip(mask)
    assert rle == sdk_encode(mask)
    np.testing.assert_array_equal(decode_mask(rle, 1000, 1000), mask)


def test_empty_image():
    rle = encode_mask(np.zeros((0, 5), bool))
    assert decode_rle(rle).size == 0


def test_decode_mask_checks_size():
    mask = np.random.default_rng(0).random((13, 17)) < 0.4
    rle = encode_mask(mask)
    np.testing.assert_array_equal(decode_mask(rle, 13, 17), mask)
    with pytest.raises(ValueError, match="expected"):
        decode_mask(rle, 17, 17)


def test_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        encode_mask(np.zeros((2, 3, 4), bool))


# 16 bytes: a 1x1 image (4 bytes), then a literal run of 65536 bytes. The SDK's decoder writes
# past its array (IndexError, which escaped the training run's `except ValueError`).
MALFORMED_16 = [0, 0, 0, 4, 57, 27, 251, 255, 255, 255, 255, 255, 255, 255, 255, 255]


def test_malformed_rle_is_a_value_error_never_an_index_error():
    with pytest.raises(ValueError, match="past the image"):
        decode_mask(MALFORMED_16, 1, 1)
    truncated = encode_mask(np.ones((8, 8), bool))[:-3]
    with pytest.raises(ValueError, match="ends early"):
        decode_mask(truncated[:6], 8, 8)
    for junk in ([256, 1], [-1], ["a"], None, [1.5]):
        with pytest.raises(ValueError):
            decode_mask(junk, 8, 8)


def test_rle_output_is_bounded_by_the_declared_image_before_anything_is_allocated():
    # a header claiming 4 GB for a 2x2 image: refused from the header alone
    huge = [255, 255, 255, 252, 57, 27, 0, 0]
    with pytest.raises(ValueError, match="expected 2\\*2\\*4"):
        decode_mask(huge, 2, 2)
    with pytest.raises(ValueError, match="positive image size"):
        decode_mask(encode_mask(np.ones((2, 2), bool)), 0, 2)


def test_decode_agrees_with_the_sdk_on_noisy_masks():
    rng = np.random.default_rng(5)
    for shape in ((1, 1), (7, 3), (31, 45)):
        mask = rng.random(shape) < 0.5
        rle = encode_mask(mask)
        np.testing.assert_array_equal(
            decode_mask(rle, *shape), decode_rle(rle).reshape(*shape, 4)[:, :, 3] != 0
        )
