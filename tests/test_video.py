"""Video tracking: frame reader, streaming tracker, Label Studio video tasks.

A random model cannot track, so most tracker tests check structure (which frames, both
directions, 1-based numbering), the deadline and memory; the model's presence score is pinned
(always there, or never) by setting the bias of its object-score head. Tracking quality (boxes on
the object, nothing after it leaves) is tested at the end with the trained fixture
(devkit/sam2-shapes) on clips of devkit/videos.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from devkit.videos import ClipFrames, Shape, crossing_clip, leaving_clip, moving_shapes, write_video
from label_studio_sam2.engine.frames import UnreadableVideo, VideoReader
from label_studio_sam2.engine.models import random_model, tiny_config
from label_studio_sam2.engine.store import EmbeddingStore
from label_studio_sam2.engine.tracker import VideoTracker
from label_studio_sam2.engine.tracks import ObjectPrompt, ObjectTrack, TrackResult
from label_studio_sam2.labelstudio.video import (
    SIGNATURE_KEY,
    FrameClock,
    VideoError,
    is_video_config,
    parse_video_config,
    predict_video_task,
)
from tests.conftest import BOTH_PRECISIONS

W, H, N, FPS = 96, 64, 40, 24
RED = Shape((230, 20, 20), (8, 10, 28, 30), (1.0, 0.5))
BLUE = Shape((20, 20, 230), (70, 30, 88, 50), (-1.0, 0.0), first_frame=8)

CONFIG = f"""<View>
  <Labels name="videoLabels" toName="video"><Label value="Car"/><Label value="Person"/></Labels>
  <Video name="video" value="$video" frameRate="{FPS}"/>
  <VideoRectangle name="box" toName="video" smart="true"/>
</View>"""


@pytest.fixture(scope="module")
def video_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("video") / "shapes.mp4"
    return write_video(path, moving_shapes(N, H, W, [RED, BLUE]), fps=FPS, gop=12)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: two threads can be slower than one
    yield
    torch.set_num_threads(before)


def make_tracker(presence: float) -> VideoTracker:
    """A tiny random model whose object-presence logit is always `presence`."""
    torch.manual_seed(0)
    loaded = random_model(tiny_config(128), "video")
    head = loaded.model.mask_decoder.pred_obj_score_head.proj_out
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(presence)
    return VideoTracker(loaded)


@pytest.fixture(scope="module")
def present_tracker() -> VideoTracker:
    return make_tracker(10.0)


def centroid(rgb: np.ndarray, color) -> tuple[float, float]:
    near = np.abs(rgb.astype(int) - np.array(color)).sum(axis=2) < 120
    ys, xs = np.nonzero(near)
    return float(xs.mean()), float(ys.mean())


def box_of(shape: Shape, index: int) -> tuple[float, float, float, float]:
    return tuple(float(v) for v in shape.box(index))


# --- frame reader -----------------------------------------------------------------------------


def test_reader_counts_frames_and_numbers_them_from_zero(video_path):
    with VideoReader(video_path) as reader:
        assert (reader.num_frames, reader.width, reader.height) == (N, W, H)
        assert reader.fps == pytest.approx(FPS)
        assert reader.times_s[:3] == pytest.approx([0, 1 / FPS, 2 / FPS])
        assert reader.duration_s == pytest.approx(N / FPS)
        for index, rgb in reader.frames(range(0, 20)):  # before the shapes meet
            assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
            x1, y1, x2, y2 = RED.box(index)
            assert centroid(rgb, RED.color) == pytest.approx(((x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2), abs=1.0)


def test_reader_goes_backwards_in_bounded_chunks_with_the_same_frames(video_path):
    # Chunks of 5 frames against keyframes every 12: every chunk re-decodes from a keyframe.
    with VideoReader(video_path, chunk_bytes=W * H * 3 // 2 * 5) as reader:
        forward = dict(reader.frames(range(3, 33)))
        backward = list(reader.frames(range(32, 2, -1)))
        assert [i for i, _ in backward] == list(range(32, 2, -1))
        assert all(np.array_equal(forward[i], rgb) for i, rgb in backward)
        assert np.array_equal(reader.frame(17), forward[17])


def test_reader_counts_frames_without_the_containers_count(tmp_path):
    # Matroska/WebM store no frame count: the reader counts from the packets.
    path = write_video(tmp_path / "v.webm", moving_shapes(23, H, W, [RED]), fps=FPS, codec="libvpx")
    with VideoReader(path) as reader:
        assert reader.num_frames == 23
        assert len(list(reader.frames(range(22, -1, -1)))) == 23


def test_reader_reads_streams_without_timestamps(tmp_path):
    # A raw H.264 stream has no timestamps: counted by decoding, read by decoding from the start.
    path = write_video(tmp_path / "v.h264", moving_shapes(17, H, W, [RED]), fps=FPS, gop=5)
    with VideoReader(path, chunk_bytes=W * H * 3 // 2 * 4) as reader:
        assert reader.num_frames == 17 and not reader.seekable
        forward = dict(reader.frames(range(17)))
        backward = list(reader.frames(range(16, -1, -1)))
        assert [i for i, _ in backward] == list(range(16, -1, -1))
        assert all(np.array_equal(forward[i], rgb) for i, rgb in backward)


def test_reader_turns_rotated_videos_upright(tmp_path):
    # Phones store portrait video as landscape frames plus a display rotation (here 90 deg clockwise).
    path = write_video(tmp_path / "r.mp4", moving_shapes(3, H, W, [RED]), fps=FPS, rotation=-90)
    with VideoReader(path) as reader:
        assert (reader.width, reader.height) == (H, W)
        rgb = reader.frame(0)
        assert rgb.shape == (W, H, 3)
        x, y = centroid(rgb, RED.color)
        assert (x, y) == pytest.approx((H - 1 - 19.5, 17.5), abs=1.0)  # (x, y) -> (H - 1 - y, x)


@pytest.mark.parametrize("content", [None, b"", b"this is not a video" * 100])
def test_reader_rejects_missing_empty_and_garbage_files(tmp_path, content):
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UnreadableVideo):
        VideoReader(path)


def test_reader_rejects_a_video_without_frames(tmp_path):
    path = write_video(tmp_path / "empty.mp4", [], fps=FPS)
    with pytest.raises(UnreadableVideo):
        VideoReader(path)


# --- tracker ----------------------------------------------------------------------------------


def test_tracks_two_objects_forwards_and_backwards_from_mid_video(video_path, present_tracker, one_thread):
    progress = []
    with VideoReader(video_path) as reader:
        result = present_tracker.track(
            reader,
            [ObjectPrompt(0, {10: box_of(RED, 10)}), ObjectPrompt(7, {20: box_of(BLUE, 20)})],
            max_frames_each_way=6,
            lost_after=None,
            on_progress=progress.append,
        )
    assert not result.partial
    red, blue = result.tracks[0], result.tracks[7]
    assert red.span == (4, 16) and set(red.scores) == set(range(4, 17))
    assert blue.span == (14, 26) and set(blue.scores) == set(range(14, 27))
    for track in (red, blue):
        assert set(track.boxes) <= set(track.scores)
        assert all(0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H for x1, y1, x2, y2 in track.boxes.values())
        assert track.lost_forward_at is None and track.lost_backward_at is None
    # Two prompted frames; forward 11..16 (red) and 21..26 (blue); backward 19..14 and 9..4.
    assert result.frames_processed == 2 + 12 + 12
    assert [p.frame for p in progress][:2] == [10, 20]
    assert progress[-1].frames_done == result.frames_processed <= progress[-1].frames_total


def test_gives_up_a_lost_object_and_resumes_at_its_next_prompt(video_path, one_thread):
    absent = make_tracker(-10.0)
    with VideoReader(video_path) as reader:
        result = absent.track(
            reader,
            [ObjectPrompt(0, {5: box_of(RED, 5), 20: box_of(RED, 20)})],
            max_frames_each_way=30,
            lost_after=3,
        )
    track = result.tracks[0]
    assert track.boxes == {}  # never there
    # forward: 6, 7, 8 absent -> wait for the prompt on 20; 21, 22, 23 absent -> lost at 21
    # backward: 4, 3, 2 absent -> lost at 4
    assert set(track.scores) == {2, 3, 4, 5, 6, 7, 8, 20, 21, 22, 23}
    assert (track.lost_forward_at, track.lost_backward_at) == (21, 4)
    assert track.span == (2, 23)


def test_stops_before_the_deadline_and_says_partial(video_path, present_tracker, one_thread):
    with VideoReader(video_path) as reader:
        started = time.monotonic()
        result = present_tracker.track(
            reader, [ObjectPrompt(0, {0: box_of(RED, 0)})], max_frames_each_way=N, deadline=started + 0.5
        )
        took = time.monotonic() - started
        assert result.partial and "partial" in result.message
        assert 1 <= result.frames_processed < N
        assert took < 0.5 + 0.3
        assert result.tracks[0].span[1] == result.frames_processed - 1

        late = present_tracker.track(
            reader, [ObjectPrompt(0, {0: box_of(RED, 0)})], deadline=time.monotonic() - 1
        )
        assert late.partial and late.frames_processed == 0 and late.tracks[0].span is None

        # The tracker remembers what a frame cost: with less time left than that, it starts none.
        slow = make_tracker(10.0)
        slow.frame_cost_s = 5.0
        short = slow.track(reader, [ObjectPrompt(0, {0: box_of(RED, 0)})], deadline=time.monotonic() + 2)
        assert short.partial and short.frames_processed == 0


def test_session_state_stays_flat_as_the_video_gets_longer(video_path, present_tracker, one_thread):
    progress = []
    with VideoReader(video_path) as reader:
        present_tracker.track(
            reader,
            [ObjectPrompt(0, {20: box_of(RED, 20)})],
            max_frames_each_way=N,
            lost_after=None,
            on_progress=progress.append,
        )
    forward = [p.state_bytes for p in progress if p.frame > 20]
    backward = [p.state_bytes for p in progress if p.frame < 20]
    assert len(forward) == 19 and len(backward) == 20
    # Pointers are kept for 15 frames, mask memories for 6: the state stops growing after that.
    for states in (forward, backward):
        assert max(states[15:]) <= states[14]
        assert states[14] < 2 * states[0]


def test_rejects_prompts_outside_the_video(video_path, present_tracker):
    with VideoReader(video_path) as reader, pytest.raises(ValueError, match="frame 40"):
        present_tracker.track(reader, [ObjectPrompt(0, {40: (1, 1, 5, 5)})])


# --- Label Studio side ------------------------------------------------------------------------


class FakeTracker:
    """Records the prompts; answers with `boxes_for(prompt) -> {frame: box}` and a span."""

    model_id = "fake-1"

    def __init__(self, boxes_for=None, span_for=None, lost_forward=None):
        self.calls = []
        self.boxes_for = boxes_for or (lambda p: dict(p.boxes))
        self.span_for = span_for or (lambda p: (min(p.boxes), max(p.boxes)))
        self.lost_forward = lost_forward or {}

    def track(self, frames, objects, *, max_frames_each_way, deadline, lost_after):
        self.calls.append((objects, max_frames_each_way, deadline))
        tracks = {}
        for p in objects:
            boxes = self.boxes_for(p)
            tracks[p.obj_id] = ObjectTrack(
                p.obj_id,
                boxes=boxes,
                scores=dict.fromkeys(boxes, 0.9),
                span=self.span_for(p),
                lost_forward_at=self.lost_forward.get(p.obj_id),
            )
        return TrackResult(tracks, 3, False, "fake")


def keyframe(frame: int, box_px, enabled=True) -> dict:
    x1, y1, x2, y2 = box_px
    return {
        "frame": frame,
        "enabled": enabled,
        "rotation": 0,
        "x": x1 / W * 100,
        "y": y1 / H * 100,
        "width": (x2 - x1) / W * 100,
        "height": (y2 - y1) / H * 100,
        "time": frame / FPS,
    }


def region(region_id: str, *keyframes: dict, labels=("Car",)) -> dict:
    return {
        "id": region_id,
        "type": "videorectangle",
        "from_name": "box",
        "to_name": "video",
        "origin": "manual",
        "value": {"framesCount": N, "duration": N / FPS, "sequence": list(keyframes), "labels": list(labels)},
    }


TASK = {"id": 1, "data": {"video": "/data/upload/1/shapes.mp4"}}


def test_parses_the_video_config_and_its_frame_rate():
    config = parse_video_config(CONFIG)
    assert (config.video_name, config.value_key, config.control_name, config.frame_rate) == (
        "video",
        "video",
        "box",
        FPS,
    )
    for attr, data, rate in [
        ("", {}, 24.0),
        ('framerate="29.97"', {}, 29.97),
        ('frameRate="$fps"', {"fps": 25}, 25.0),
        ('frameRate="0.5"', {}, 2.0),
        ('frameRate="abc"', {}, 24.0),
    ]:
        xml = f'<View><Video name="v" value="$v" {attr}/><VideoRectangle name="b" toName="v"/></View>'
        assert parse_video_config(xml, data).frame_rate == rate
    assert is_video_config(CONFIG)
    assert not is_video_config('<View><Image name="i" value="$i"/></View>')


def test_label_studio_frame_numbers_map_to_decoded_frames():
    times = np.arange(N) / FPS
    clock = FrameClock(FPS, times, N / FPS)
    assert [clock.index(f) for f in (1, 2, N)] == [0, 1, N - 1]
    assert [clock.ls_frame(i) for i in (0, 1, N - 1)] == [1, 2, N]
    assert clock.frames_count == N and clock.is_last(N) and not clock.is_last(N - 1)
    with pytest.raises(ValueError):
        clock.index(N + 1)
    with pytest.raises(ValueError):
        clock.index(0)
    # The config says 12 fps for a 24 fps video: Label Studio's frame F shows second (F-1)/12.
    slow = FrameClock(12.0, times, N / FPS)
    assert [slow.index(f) for f in (1, 2, 20)] == [0, 2, 38]
    assert [slow.ls_frame(i) for i in (0, 2, 3, 38)] == [1, 2, 3, 20]


def test_video_task_turns_regions_into_prompts_and_tracks_into_keyframes(video_path):
    # Frames 1-based in Label Studio: the user's box on frame 11 is decoded frame 10.
    red_user = keyframe(11, box_of(RED, 10))
    blue_user = keyframe(21, box_of(BLUE, 20))

    def boxes_for(p):
        lo, hi = min(p.boxes) - 3, max(p.boxes) + 4
        boxes = {i: (10.0 + i, 5.0, 30.0 + i, 25.0) for i in range(lo, hi + 1)}
        boxes.pop(hi - 1 if p.obj_id == 0 else lo + 1)  # a frame where the object is absent
        return boxes

    tracker = FakeTracker(
        boxes_for, span_for=lambda p: (min(p.boxes) - 3, max(p.boxes) + 4), lost_forward={0: 15}
    )
    context = [region("red1", red_user), region("blue2", blue_user, labels=("Person",))]
    out = predict_video_task(TASK, context, CONFIG, video_path, tracker, deadline_s=30, max_frames=50)

    ((objects, max_frames, deadline),) = tracker.calls
    assert max_frames == 50 and deadline == pytest.approx(time.monotonic() + 30, abs=5)
    assert [o.obj_id for o in objects] == [0, 1]
    assert list(objects[0].boxes) == [10] and objects[0].boxes[10] == pytest.approx(box_of(RED, 10))
    assert list(objects[1].boxes) == [20] and objects[1].boxes[20] == pytest.approx(box_of(BLUE, 20))

    assert out["model_version"] == "fake-1" and out["score"] == pytest.approx(0.9)
    red, blue = out["result"]
    assert (red["id"], red["from_name"], red["to_name"], red["type"]) == (
        "red1",
        "box",
        "video",
        "videorectangle",
    )
    assert red["value"]["labels"] == ["Car"] and blue["value"]["labels"] == ["Person"]
    assert red["value"]["framesCount"] == N and red["value"]["duration"] == pytest.approx(N / FPS)

    seq = red["value"]["sequence"]
    frames = [k["frame"] for k in seq]
    assert frames == [8, 9, 10, 11, 12, 13, 15]  # decoded 7..14, absent on 13 -> LS 14 missing
    assert seq[3] == red_user  # the user's keyframe, untouched
    k8 = seq[0]
    assert k8["x"] == pytest.approx((10 + 7) / W * 100, abs=1e-3) and k8["width"] == pytest.approx(
        20 / W * 100, abs=1e-3
    )
    assert k8["time"] == pytest.approx(8 / FPS) and k8["rotation"] == 0
    enabled = {k["frame"]: k["enabled"] for k in seq}
    assert enabled[13] is False  # the object is absent on the next frame
    assert enabled[15] is False  # lost after it (and not the video's end)
    assert enabled[12] is True

    blue_frames = [k["frame"] for k in blue["value"]["sequence"]]
    assert blue_frames == [18, 20, 21, 22, 23, 24, 25]  # decoded 17..24, absent on 18 -> LS 19 missing
    assert {k["frame"]: k["enabled"] for k in blue["value"]["sequence"]}[18] is False


def test_tracked_keyframes_are_not_prompts_on_the_next_run_unless_the_user_edits_them(video_path):
    def boxes_for(p):
        first = min(p.boxes)
        return {i: (10.0 + i, 5.0, 30.0 + i, 25.0) for i in range(first, first + 6)}

    tracker = FakeTracker(boxes_for, span_for=lambda p: (min(p.boxes), min(p.boxes) + 5))
    first = predict_video_task(
        TASK,
        [region("r", keyframe(3, box_of(RED, 2)))],
        CONFIG,
        video_path,
        tracker,
        deadline_s=30,
        max_frames=5,
    )
    tracked = first["result"][0]
    assert sum(SIGNATURE_KEY in k for k in tracked["value"]["sequence"]) == 5

    predict_video_task(TASK, [tracked], CONFIG, video_path, tracker, deadline_s=30, max_frames=5)
    assert list(tracker.calls[-1][0][0].boxes) == [2]  # only the user's keyframe

    edited = {
        **tracked,
        "value": {**tracked["value"], "sequence": [dict(k) for k in tracked["value"]["sequence"]]},
    }
    edited["value"]["sequence"][4]["x"] += 3.0  # the user moves the box on frame 7
    predict_video_task(TASK, [edited], CONFIG, video_path, tracker, deadline_s=30, max_frames=5)
    assert sorted(tracker.calls[-1][0][0].boxes) == [2, 6]

    # The user deleted their own keyframe: re-track from the ends of what was tracked.
    ours = [k for k in tracked["value"]["sequence"] if SIGNATURE_KEY in k]
    predict_video_task(
        TASK,
        [{**tracked, "value": {**tracked["value"], "sequence": ours}}],
        CONFIG,
        video_path,
        tracker,
        deadline_s=30,
        max_frames=5,
    )
    prompt = tracker.calls[-1][0][0]
    assert sorted(prompt.boxes) == [3, 7] and prompt.track_forward


def test_a_disabled_last_keyframe_ends_the_object(video_path):
    tracker = FakeTracker()
    predict_video_task(
        TASK,
        [region("r", keyframe(3, box_of(RED, 2)), keyframe(9, box_of(RED, 8), enabled=False))],
        CONFIG,
        video_path,
        tracker,
        deadline_s=30,
        max_frames=5,
    )
    (prompt,) = tracker.calls[0][0]
    assert sorted(prompt.boxes) == [2, 8] and not prompt.track_forward and prompt.track_backward


def test_frames_the_user_hid_get_no_tracked_keyframes(video_path):
    # The user ended the object's lifespan on frame 3 and brought it back on frame 8.
    tracker = FakeTracker(
        boxes_for=lambda p: {i: (10.0, 5.0, 30.0, 25.0) for i in range(0, 12)}, span_for=lambda p: (0, 11)
    )
    out = predict_video_task(
        TASK,
        [region("r", keyframe(3, box_of(RED, 2), enabled=False), keyframe(8, box_of(RED, 7)))],
        CONFIG,
        video_path,
        tracker,
        deadline_s=30,
        max_frames=5,
    )
    frames = [k["frame"] for k in out["result"][0]["value"]["sequence"]]
    assert frames == [1, 2, 3, 8, 9, 10, 11, 12]


def test_retrieve_predictions_tracks_the_latest_annotation(video_path):
    old = {
        "id": 1,
        "updated_at": "2026-01-01T00:00:00Z",
        "result": [region("old", keyframe(2, box_of(RED, 1)))],
    }
    new = {
        "id": 2,
        "updated_at": "2026-02-01T00:00:00Z",
        "result": [region("new", keyframe(5, box_of(RED, 4)))],
    }
    task = {**TASK, "annotations": [new, old]}
    tracker = FakeTracker()
    out = predict_video_task(task, None, CONFIG, video_path, tracker, deadline_s=30, max_frames=5)
    assert [r["id"] for r in out["result"]] == ["new"]
    assert list(tracker.calls[0][0][0].boxes) == [4]


@pytest.mark.parametrize(
    "regions, match",
    [
        ([], "no VideoRectangle region"),
        ([region("r")], "no keyframes"),
        ([region("r", keyframe(N + 1, (1, 1, 9, 9)))], "past the video's end"),
        ([region("r", {"frame": 3, "x": 10})], "lacks x, y, width or height"),
        ([region("r", keyframe(3, (1, 1, 9, 9)) | {"width": 0})], "empty"),
    ],
)
def test_bad_regions_are_task_errors(video_path, regions, match):
    with pytest.raises(VideoError, match=match):
        predict_video_task(TASK, regions, CONFIG, video_path, FakeTracker(), deadline_s=30, max_frames=5)


@pytest.mark.parametrize(
    "task, regions",
    [
        ({"id": 1, "data": [], "annotations": 7}, None),
        ({"id": 1, "data": {}, "annotations": [{"id": [1], "result": "text"}, "x"]}, None),
        (TASK, {"result": []}),
        (TASK, [{"type": "videorectangle", "value": [1, 2]}]),
        (TASK, [{"type": "videorectangle", "value": {"sequence": 5}}]),
        (TASK, [region("r", {"frame": "3", "x": 1, "y": 1, "width": 5, "height": 5})]),
        (TASK, [region("r", keyframe(3, (1, 1, 9, 9)) | {"x": "abc"})]),
        (TASK, [region("r", keyframe(3, (1, 1, 9, 9)) | {"frame": float("nan")})]),
        (TASK, [region("r", keyframe(-2, (1, 1, 9, 9)))]),
    ],
)
def test_malformed_tasks_and_regions_are_task_errors(video_path, task, regions):
    with pytest.raises(VideoError):
        predict_video_task(task, regions, CONFIG, video_path, FakeTracker(), deadline_s=30, max_frames=5)


@pytest.mark.parametrize("content", [None, b"", b"<html>404 Not Found</html>"])
def test_unreadable_videos_are_task_errors(tmp_path, content):
    path = tmp_path / "v.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VideoError, match="cannot read the video"):
        predict_video_task(
            TASK,
            [region("r", keyframe(3, (1, 1, 9, 9)))],
            CONFIG,
            path,
            FakeTracker(),
            deadline_s=30,
            max_frames=5,
        )


def test_video_task_end_to_end_with_a_tiny_model(video_path, present_tracker, one_thread):
    context = [region("red", keyframe(11, box_of(RED, 10))), region("blue", keyframe(21, box_of(BLUE, 20)))]
    out = predict_video_task(TASK, context, CONFIG, video_path, present_tracker, deadline_s=60, max_frames=4)
    red, blue = out["result"]
    assert out["model_version"] == present_tracker.model_id
    # The log line says what the labeler gets: regions, the frames they were found on, keyframes.
    new = sum("sam2" in k for r in (red, blue) for k in r["value"]["sequence"])
    assert out["message"].startswith("tracked 2 of 2 region(s) (red frames 7-15, 8 keyframe(s); blue frames")
    assert f"{new} new keyframe(s); the model ran on 18 frame(s)" in out["message"]
    for result, user_frame in ((red, 11), (blue, 21)):
        frames = [k["frame"] for k in result["value"]["sequence"]]
        assert frames == sorted(frames) and user_frame in frames
        assert min(frames) >= user_frame - 4 and max(frames) <= user_frame + 4
        assert any(f < user_frame for f in frames) and any(f > user_frame for f in frames)  # both directions
        for k in result["value"]["sequence"]:
            assert 0 <= k["x"] <= 100 and 0 <= k["y"] <= 100
            assert k["x"] + k["width"] <= 100 + 1e-6 and k["y"] + k["height"] <= 100 + 1e-6
            assert k["time"] == pytest.approx(k["frame"] / FPS)


# --- tracking quality, with the model trained on shapes ----------------------------------------

FIXTURE = "devkit/sam2-shapes"


@pytest.fixture(scope="module")
def trained_loaded():
    from label_studio_sam2.engine.models import load_video_model

    return load_video_model(FIXTURE, "cpu")


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union


@pytest.mark.slow
def test_pruning_the_session_changes_no_tracked_frame(trained_loaded, one_thread):
    # Past 15 frames each way both kinds of pruning (mask memories after 6, pointers after 15)
    # have dropped outputs; the tracks must be those of a session that keeps everything.
    clip = crossing_clip(0, num_frames=37)
    prompt = [ObjectPrompt(0, {18: clip.box(18)})]
    runs = {}
    for prune in (True, False):
        progress = []
        tracker = VideoTracker(trained_loaded, prune_memory=prune)
        result = tracker.track(
            ClipFrames(clip), prompt, max_frames_each_way=18, lost_after=None, on_progress=progress.append
        )
        runs[prune] = (result.tracks[0], max(p.state_bytes for p in progress))
    (pruned, pruned_bytes), (full, full_bytes) = runs[True], runs[False]
    assert pruned_bytes < 0.8 * full_bytes  # pruning did drop outputs
    assert pruned.span == full.span == (0, 36)
    assert pruned.boxes == full.boxes and len(pruned.boxes) > 30
    for f in range(37):
        assert pruned.scores[f] == pytest.approx(full.scores[f], abs=1e-6), f


@pytest.mark.slow
def test_tracked_boxes_stay_on_the_object_when_objects_cross(trained_loaded, one_thread):
    # The model's mask holds stray fragments on many frames (on the background's texture, near
    # the other shape); the tight box around the whole mask was off the ellipse (IoU < 0.5) on
    # 193 of 500 frames of crossing_clip(0..9). The box of the track's own components never is.
    tracker = VideoTracker(trained_loaded)
    ious, confidences = [], []
    for seed in range(3):
        clip = crossing_clip(seed, num_frames=50)
        result = tracker.track(
            ClipFrames(clip), [ObjectPrompt(0, {12: clip.box(12)})], max_frames_each_way=40, lost_after=5
        )
        track = result.tracks[0]
        assert set(track.boxes) == set(range(50)), f"clip {seed}: frames without the object"
        ious += [box_iou(box, clip.box(f)) for f, box in track.boxes.items()]
        confidences += list(track.scores.values())
    ious = np.array(ious)
    assert ious.size == 150 and ious.min() >= 0.5, f"{(ious < 0.5).sum()} of {ious.size} boxes off the object"
    # The confidence is lower where fragments were dropped: not a constant 1.
    assert all(0 < c <= 1 for c in confidences) and min(confidences) < 0.9 < np.mean(confidences)


@pytest.mark.slow
def test_no_keyframe_after_the_object_has_left(trained_loaded, one_thread):
    clip = leaving_clip(num_frames=40, exit_frame=24)
    tracker = VideoTracker(trained_loaded)
    result = tracker.track(
        ClipFrames(clip), [ObjectPrompt(0, {8: clip.box(8)})], max_frames_each_way=31, lost_after=5
    )
    track = result.tracks[0]
    assert set(range(8, 22)) <= set(track.boxes)  # followed while in the picture
    assert max(track.boxes) < 24, f"boxes after the ellipse left: {sorted(f for f in track.boxes if f >= 24)}"
    assert track.lost_forward_at is not None and 20 <= track.lost_forward_at <= 24


@pytest.mark.slow
def test_an_object_that_comes_back_starts_a_new_span(trained_loaded, one_thread):
    # The ellipse vanishes on frames 14-16 and comes back: no box while it is gone, and the frames
    # after it come back (seen on 3 frames in a row, at a plausible size) form a new visible span.
    clip = leaving_clip(num_frames=30, exit_frame=40, hidden=range(14, 17))
    tracker = VideoTracker(trained_loaded)
    track = tracker.track(
        ClipFrames(clip), [ObjectPrompt(0, {4: clip.box(4)})], max_frames_each_way=25, lost_after=5
    ).tracks[0]
    assert not set(track.boxes) & {14, 15, 16}
    assert set(range(4, 14)) <= set(track.boxes) and set(range(20, 30)) <= set(track.boxes)
    assert track.lost_forward_at is None
    assert all(box_iou(box, clip.box(f)) >= 0.5 for f, box in track.boxes.items())


@pytest.mark.slow
@pytest.mark.parametrize("hw", [(96, 128), (240, 320)])
def test_a_track_does_not_jump_to_another_object_after_its_object_left(trained_loaded, one_thread, hw):
    # The ellipse drives out through the right edge (gone from frame 25) while the blue
    # rectangle, of its size, stays in view. SAM2's mask then lies on the rectangle (a corner of
    # it, about the size of the ellipse's last sliver), and SAM2's presence score says "present":
    # that was taken as the ellipse found again, 13-15 frames of boxes on the rectangle. An object
    # that left through an edge is found again only across that edge.
    clip = leaving_clip(num_frames=40, exit_frame=24, hw=hw)
    tracker = VideoTracker(trained_loaded)
    for prompt_frame in (0, 4):
        for lost_after in (5, None):
            track = tracker.track(
                ClipFrames(clip),
                [ObjectPrompt(0, {prompt_frame: clip.box(prompt_frame)})],
                max_frames_each_way=40,
                lost_after=lost_after,
            ).tracks[0]
            case = f"prompt on frame {prompt_frame}, lost_after={lost_after}"
            assert set(range(prompt_frame, 22)) <= set(track.boxes), case  # followed while in view
            gone = [f for f in range(40) if clip.truth[f] is None]
            assert gone == list(range(25, 40))
            assert not set(track.boxes) & set(gone), f"{case}: boxes after the ellipse left"
            if lost_after is None:  # every frame examined: SAM2 itself says "present" after it left
                assert min(track.scores[f] for f in gone) > 0.5, case
            else:
                assert 20 <= track.lost_forward_at <= 25, case


@pytest.mark.slow
def test_after_an_occlusion_a_track_does_not_jump_to_another_object(trained_loaded, one_thread):
    # The ellipse vanishes inside the frame (from frame 10, 14 or 18: not drawn) and never comes
    # back; the blue rectangle stays. Found again only near where it was last seen, within the
    # motion it had: never on the rectangle, however long the tracker keeps looking.
    tracker = VideoTracker(trained_loaded)
    for start in (10, 14, 18):
        clip = leaving_clip(num_frames=40, exit_frame=60, hw=(240, 320), hidden=range(start, 40))
        for lost_after in (5, None):
            track = tracker.track(
                ClipFrames(clip),
                [ObjectPrompt(0, {4: clip.box(4)})],
                max_frames_each_way=40,
                lost_after=lost_after,
            ).tracks[0]
            case = f"hidden from frame {start}, lost_after={lost_after}"
            assert set(range(4, start)) <= set(track.boxes), case
            assert max(track.boxes) < start, (
                f"{case}: boxes on {sorted(f for f in track.boxes if f >= start)}"
            )


@pytest.mark.slow
@pytest.mark.parametrize("hw", [(96, 128), (240, 320)])
def test_an_object_that_comes_back_across_the_edge_it_left_by_is_found_again(trained_loaded, one_thread, hw):
    # The ellipse drives out through the right edge (frame 20 its last sliver), stays out `away`
    # frames and drives back in across the same edge, the rectangle in view all along. With the
    # tracker's default patience (lost_after=5) it must be back within a few frames; with
    # lost_after=None it is looked for until the end.
    tracker = VideoTracker(trained_loaded)
    for away, lost_after in ((2, 5), (8, None)):
        clip = leaving_clip(num_frames=40, exit_frame=20, hw=hw, away=away)
        gone = [f for f in range(40) if clip.truth[f] is None]
        assert gone == list(range(21, 21 + away))
        track = tracker.track(
            ClipFrames(clip),
            [ObjectPrompt(0, {4: clip.box(4)})],
            max_frames_each_way=40,
            lost_after=lost_after,
        ).tracks[0]
        case = f"away {away} frames, lost_after={lost_after}"
        assert not set(track.boxes) & set(gone), case
        back = range(gone[-1] + 3, 40)  # from its third frame back in (3 in a row make a return)
        assert set(back) <= set(track.boxes), (
            f"{case}: not found again on {sorted(set(back) - set(track.boxes))}"
        )
        assert track.lost_forward_at is None, case
        assert all(box_iou(box, clip.box(f)) >= 0.5 for f, box in track.boxes.items()), case


@pytest.mark.slow
def test_a_video_task_gets_no_keyframe_on_another_object_after_its_object_left(
    trained_loaded, one_thread, tmp_path
):
    # Issue 25: the leaving clip at 320x240 in a 25 fps file, a box on Label Studio's frame 1:
    # keyframes came back enabled on a corner of the rectangle, still labelled as the ellipse.
    clip = leaving_clip(num_frames=40, exit_frame=24, hw=(240, 320))
    path = write_video(tmp_path / "leaving.mp4", clip.frames, fps=25)
    config = CONFIG.replace(f'frameRate="{FPS}"', 'frameRate="25"')
    x1, y1, x2, y2 = clip.box(0)
    box = {"x": x1 / 3.2, "y": y1 / 2.4, "width": (x2 - x1) / 3.2, "height": (y2 - y1) / 2.4}
    user = {"frame": 1, "enabled": True, "rotation": 0, "time": 0.0, **box}
    ellipse = {
        "id": "ellipse",
        "type": "videorectangle",
        "from_name": "box",
        "to_name": "video",
        "origin": "manual",
        "value": {"framesCount": 40, "duration": 1.6, "sequence": [user], "labels": ["Car"]},
    }
    out = predict_video_task(
        TASK, [ellipse], config, path, VideoTracker(trained_loaded), deadline_s=120, max_frames=300
    )
    seq = out["result"][0]["value"]["sequence"]
    gone = [f + 1 for f in range(40) if clip.truth[f] is None]  # Label Studio's frame numbers
    assert gone == list(range(26, 41))
    assert [k["frame"] for k in seq if k["enabled"] and k["frame"] >= gone[0]] == []
    assert max(k["frame"] for k in seq) < gone[0] and seq[-1]["enabled"] is False  # the lifespan ends


class EncoderCalls:
    """Counts the vision encoder's forward passes while in use."""

    def __init__(self, model):
        self.model, self.count = model, 0

    def __enter__(self):
        self.hook = self.model.vision_encoder.register_forward_hook(lambda *a: self._add())
        return self

    def _add(self):
        self.count += 1

    def __exit__(self, *exc):
        self.hook.remove()


def test_retrack_after_a_corrected_keyframe_encodes_only_frames_not_seen_before(
    trained_loaded, one_thread, tmp_path
):
    clip = crossing_clip(1, num_frames=30)
    tracker = VideoTracker(trained_loaded, store=EmbeddingStore(tmp_path))
    with EncoderCalls(trained_loaded.model) as first:
        result = tracker.track(
            ClipFrames(clip), [ObjectPrompt(0, {12: clip.box(12)})], max_frames_each_way=10
        )
    assert first.count == result.frames_processed == 21 and result.frames_from_store == 0  # frames 2-22

    # The labeler corrects the box on frame 20; the re-track also runs 5 frames further (23-27).
    corrected = [ObjectPrompt(0, {12: clip.box(12), 20: clip.box(20)})]
    retrack_progress, plain_progress = [], []
    with EncoderCalls(trained_loaded.model) as again:
        retrack = tracker.track(
            ClipFrames(clip), corrected, max_frames_each_way=7, on_progress=retrack_progress.append
        )
    assert retrack.frames_processed == 23 and again.count == 5  # frames 5-27: only 23-27 are new
    assert retrack.frames_from_store == 18 and "18 with stored image features" in retrack.message

    plain = VideoTracker(trained_loaded).track(
        ClipFrames(clip), corrected, max_frames_each_way=7, on_progress=plain_progress.append
    )
    track, reference = retrack.tracks[0], plain.tracks[0]
    assert track.boxes == reference.boxes and len(track.boxes) == 23  # the same box on every frame
    assert track.scores == reference.scores and track.span == reference.span == (5, 27)
    # Stored features are read one frame at a time: the session holds no more than without them.
    assert max(p.state_bytes for p in retrack_progress) <= max(p.state_bytes for p in plain_progress)


def test_frame_features_stay_within_the_store_bound(trained_loaded, one_thread, tmp_path):
    clip = crossing_clip(2, num_frames=12)
    prompt = [ObjectPrompt(0, {0: clip.box(0)})]
    probe = EmbeddingStore(tmp_path / "probe")
    VideoTracker(trained_loaded, store=probe).track(ClipFrames(clip), prompt, max_frames_each_way=0)
    store = EmbeddingStore(tmp_path / "small", max_bytes=int(3.5 * probe.bytes))  # room for 3 frames
    tracker = VideoTracker(trained_loaded, store=store)
    first = tracker.track(ClipFrames(clip), prompt, max_frames_each_way=11)
    assert first.frames_processed == 12 and store.bytes <= store.max_bytes
    assert len(list((tmp_path / "small").rglob("*.emb"))) == 3  # the least recently used went
    with EncoderCalls(trained_loaded.model) as again:
        retrack = tracker.track(ClipFrames(clip), prompt, max_frames_each_way=11)
    assert again.count >= 9 and again.count + retrack.frames_from_store == 12  # evicted: encoded again
    assert retrack.tracks[0].boxes == first.tracks[0].boxes and store.bytes <= store.max_bytes


@BOTH_PRECISIONS  # the server's image encoder in either precision; video frames are fp32 on CPU
def test_a_video_task_tracked_again_after_a_correction_runs_no_encoder(
    app_factory, media_server, video_path, tmp_path, one_thread
):
    from pathlib import Path

    from tests.conftest import predict_body

    url = media_server.add("shapes.mp4", Path(video_path).read_bytes())
    task = {"id": 5, "data": {"video": url}}
    app = app_factory(store_dir=str(tmp_path / "store"), video_max_frames=4)
    client = app.test_client()
    first = client.post(
        "/predict", json=predict_body([task], [region("red", keyframe(11, box_of(RED, 10)))], CONFIG)
    )
    (entry,) = first.get_json()["results"]
    assert first.status_code == 200 and "the model ran on 9 frame(s) in" in entry["message"]

    moved = tuple(v + 2 for v in box_of(RED, 10))  # the labeler nudges the box
    encoder = app.extensions["sam2"].video_tracker().loaded.model
    with EncoderCalls(encoder) as calls:
        again = client.post(
            "/predict", json=predict_body([task], [region("red", keyframe(11, moved))], CONFIG)
        )
    (entry,) = again.get_json()["results"]
    assert again.status_code == 200 and entry["result"][0]["value"]["sequence"]
    assert (
        calls.count == 0 and "the model ran on 9 frame(s) (9 with stored image features)" in entry["message"]
    )


def test_a_task_opened_without_regions_is_not_downloaded_nor_warned_about(app_factory, media_server, caplog):
    # Label Studio asks for predictions every time a labeler opens a task, several times. The URL
    # points at nothing: downloading it would be a logged media error.
    from tests.conftest import predict_body

    task = {"id": 9, "data": {"video": f"{media_server.url}/not-there.mp4"}}
    client = app_factory().test_client()
    caplog.set_level("DEBUG")
    for context in (None, []):
        resp = client.post("/predict", json=predict_body([task], context, CONFIG))
        assert resp.status_code == 200 and resp.get_json()["results"] == [[]]
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []
    assert any("no VideoRectangle region" in r.getMessage() for r in caplog.records if r.levelname == "DEBUG")


def test_concurrent_identical_retrieves_of_a_video_task_store_one_track(
    app_factory, media_server, video_path, one_thread
):
    """Label Studio 1.23.2 reloads a submitted video task and asks /predict for it twice at once:
    one of the two answers holds the track, the other nothing (so Label Studio stores one
    prediction), and the video is tracked once."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from tests.conftest import predict_body

    url = media_server.add("shapes.mp4", Path(video_path).read_bytes())
    annotation = {
        "id": 1,
        "updated_at": "2026-02-01T00:00:00Z",
        "result": [region("red", keyframe(11, box_of(RED, 10)))],
    }
    body = predict_body([{"id": 7, "data": {"video": url}, "annotations": [annotation]}], None, CONFIG)
    app = app_factory()
    runtime = app.extensions["sam2"]
    tracker = runtime.video_tracker()
    real_track, tracked = tracker.track, []

    def track(*args, **kwargs):
        tracked.append(1)
        # the first track waits until the second request waits for it (or tracks too)
        calls = getattr(runtime, "video_calls", None)
        deadline = time.monotonic() + 60
        while len(tracked) < 2 and not (calls and calls.waiting()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_track(*args, **kwargs)

    tracker.track = track
    with ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(
                lambda _: app.test_client().post("/predict", json=body).get_json()["results"][0], range(2)
            )
        )
    stored = [a for a in answers if a]  # Label Studio stores nothing for an empty answer
    assert len(stored) == 1, answers
    assert [r["id"] for r in stored[0]["result"]] == ["red"] and len(tracked) == 1
    # the same request once the first is answered: tracked again (nothing is cached)
    again = app.test_client().post("/predict", json=body).get_json()["results"][0]
    assert [r["id"] for r in again["result"]] == ["red"] and len(tracked) == 2
