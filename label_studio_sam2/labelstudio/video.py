"""Label Studio video tasks: VideoRectangle regions -> tracker prompts -> tracked regions.

The adapter's side of video: Label Studio's label config, regions, keyframes and frame numbers.
The tracking itself (opening the video, the tracker's limits and deadline) is the service's
(`label_studio_sam2.service.video.track_video`), which knows nothing of Label Studio.

Every videorectangle region of the interactive context (or, for "Retrieve predictions", of the
task's latest annotation) is one object; its keyframes are box prompts. Each object comes back as
one videorectangle result with the user's region id, labels and keyframes, plus a keyframe on
every frame where the tracker found it (the tight box of its mask), so Label Studio merges it
with the user's region.

Frame numbers, as Label Studio 1.23 plays a video (its "video frame seek precision" behaviour,
on by default since 1.23):
- Frames are numbered from 1. Frame F is shown at time (F - 1) / frameRate (plus 2 ms); the
  picture is the decoded frame whose presentation interval holds that time. When the config's
  frameRate is the video's rate, that is decoded frame F - 1 (0-based); when it is not, the
  mapping goes through time, both ways, so keyframes land where Label Studio shows them.
- `framesCount` = round(duration * frameRate); `duration` is the video's length in seconds.
- Label Studio writes `time = frame / frameRate` into keyframes (VideoRegion.serialize) and reads
  only `frame` back; we write the same.
- Lifespans: a keyframe with `enabled: false` shows its box on its own frame and hides the region
  until the next keyframe. Tracked keyframes are disabled where the object disappears (lost, or
  absent for a few frames), and at the end of the tracked range unless that is the video's end,
  so Label Studio does not stretch the last box over frames nobody looked at.

Which keyframes are prompts: the user's. Keyframes this module writes carry `"sam2": <signature
of their box and lifespan>`; one that comes back unchanged is ours and not a prompt (else a second
run would take hundreds of tracked keyframes for prompts), one the user moved, resized or
toggled no longer matches its signature and is a prompt again. A user keyframe with
`enabled: false` is a prompt too; if it is the object's last, the object is not tracked past it,
and tracked keyframes inside a span the user hid are dropped.

Errors a user can act on (no regions, a region without keyframes, a keyframe past the video's
end, an unreadable video) raise `VideoError` (label_studio_sam2.service.video), a per-task error.
A task without any video region (Label Studio asks on every open, several times) raises
`NothingToTrack`, logged at debug level, before the video is downloaded. No torch here.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from label_studio_sam2.engine.tracks import Box, ObjectPrompt, ObjectTrack, TrackResult
from label_studio_sam2.labelstudio.protocol import parse_label_config
from label_studio_sam2.labelstudio.regions import box_to_rect_pct, latest, rect_to_box_px
from label_studio_sam2.service.video import NothingToTrack, Tracker, VideoError, VideoInfo, track_video

log = logging.getLogger(__name__)

DEFAULT_FRAME_RATE = 24.0  # Label Studio's default for <Video frameRate>
SEEK_OFFSET_S = 0.002  # Label Studio seeks 2 ms past a frame's start
SIGNATURE_KEY = "sam2"


@dataclass(frozen=True)
class VideoConfig:
    """The Video object and its VideoRectangle control, from the label config."""

    video_name: str  # <Video name>: the results' to_name
    value_key: str  # task data key of the video URL ("$video" -> "video")
    control_name: str  # <VideoRectangle name>: the results' from_name
    frame_rate: float  # frames per second Label Studio numbers frames with


def is_video_config(label_config_xml: str | None) -> bool:
    """Whether the label config has a Video tag with a VideoRectangle control."""
    try:
        parse_video_config(label_config_xml, {})
    except Exception:
        return False
    return True


def parse_video_config(label_config_xml: str | None, task_data: dict | None = None) -> VideoConfig:
    """The first Video tag that a VideoRectangle points at. `frameRate` may name task data
    (`frameRate="$fps"`); like Label Studio, a missing or invalid rate means 24 and a rate
    below 1 is read as seconds per frame."""
    config = parse_label_config(label_config_xml)
    for video in config.videos():
        controls = config.controls_of("videorectangle", video.name)
        if controls:
            rate = _frame_rate(video.attrs.get("framerate"), task_data or {})
            return VideoConfig(video.name, video.value_key, controls[0].name, rate)
    raise VideoError("the label config has no <Video> with a <VideoRectangle> pointing at it")


def predict_video_task(
    task: dict,
    context_regions: list[dict] | None,
    label_config_xml: str,
    video_path: str | os.PathLike | Callable[[], str],
    tracker: Tracker,
    *,
    deadline_s: float,
    max_frames: int,
    lost_after: int = 5,
    model_version: str | None = None,
    max_pixels: int | None = None,
    max_regions: int | None = None,
) -> dict:
    """Track the task's video rectangles; one Label Studio results entry.

    Arguments:
        task: the Label Studio task (its `data`, and `annotations` for Retrieve predictions).
        context_regions: `params.context.result` of an interactive request; None when there is
            no context (Retrieve predictions): then the task's latest annotation is used.
        video_path: the task's video, downloaded; or a function that downloads it and returns its
            path, called only when there is something to track.
        tracker: label_studio_sam2.engine.tracker.VideoTracker (anything with its `track` and `model_id`).
        deadline_s: seconds from this call until tracking must have stopped (the caller
            subtracts what it has already spent of Label Studio's 100 s).
        max_frames: frames to follow each object past its last keyframe and before its first.
        lost_after: consecutive frames without an object before it is given up.
        model_version: what the entry reports (default: the tracker's model id).
        max_pixels: frames of more pixels are refused (MAX_IMAGE_MP), before they are decoded.
        max_regions: more regions to track is a VideoError (MAX_REGIONS_PER_TASK).
    Returns:
        `{"result": [videorectangle, ...], "score": float, "model_version": str,
        "message": str, "partial": bool}`; `message` says how many regions were tracked on how
        many frames and whether the deadline cut it (`partial`), for the log: Label Studio reads
        only the first three keys. `score`: the mean of the regions' scores, each the mean tracking confidence
        over its tracked frames (label_studio_sam2.engine.tracks.ObjectTrack.scores).
    Raises:
        NothingToTrack: no video region in the context (or the latest annotation).
        VideoError: a region without keyframes, a keyframe past the video's end, an unreadable
        video.
    """
    started = time.monotonic()
    data = task.get("data")
    config = parse_video_config(label_config_xml, data if isinstance(data, dict) else {})
    regions = regions_to_track(task, context_regions, config)
    if max_regions is not None and len(regions) > max_regions:
        raise VideoError(
            f"the task has {len(regions)} video regions, over the limit of {max_regions} (MAX_REGIONS_PER_TASK)"
        )
    objects: list[_Object] = []

    def prompts(video: VideoInfo) -> list[ObjectPrompt]:
        clock = FrameClock(config.frame_rate, video.times_s, video.duration_s)
        objects[:] = [_Object(i, region, config, clock, video) for i, region in enumerate(regions)]
        return [o.prompt for o in objects]

    result, video = track_video(
        video_path,
        tracker,
        prompts,
        deadline=started + deadline_s,
        max_frames=max_frames,
        lost_after=lost_after,
        max_pixels=max_pixels,
    )
    clock = FrameClock(config.frame_rate, video.times_s, video.duration_s)
    results = [o.to_result(result.tracks[o.obj_id], clock) for o in objects]
    scores = [r["score"] for r in results if "score" in r]
    message = _summary(results, result, time.monotonic() - started)
    (log.warning if result.partial else log.info)("video task %r: %s", task.get("id"), message)
    return {
        "result": results,
        "score": float(sum(scores) / len(scores)) if scores else 0.0,
        "model_version": model_version or tracker.model_id,
        "message": message,
        "partial": result.partial,
    }


def regions_to_track(task: dict, context_regions: list[dict] | None, config: VideoConfig) -> list[dict]:
    """The videorectangle regions of the context, else of the task's latest annotation."""
    if context_regions is not None:
        source, items = "the request's context", context_regions
    else:
        newest = latest(task.get("annotations"))
        source, items = "the task's latest annotation", (newest or {}).get("result")
    regions = [
        r
        for r in _list(items)
        if isinstance(r, dict)
        and r.get("type") == "videorectangle"
        and r.get("from_name", config.control_name) == config.control_name
        and r.get("to_name", config.video_name) == config.video_name
    ]
    if not regions:
        raise NothingToTrack(
            f"no VideoRectangle region to track in {source}: draw a box around the object "
            f"on any frame with the {config.control_name!r} tool"
        )
    return regions


def _summary(results: list[dict], result: TrackResult, took_s: float) -> str:
    """One log line: what the labeler gets back (regions, the frames each was found on, new
    keyframes), then what it cost, then the tracker's notes (partial, unreadable)."""
    parts, new = [], 0
    for r in results:
        ours = [k["frame"] for k in r["value"]["sequence"] if SIGNATURE_KEY in k]
        new += len(ours)
        where = f"frames {min(ours)}-{max(ours)}, {len(ours)} keyframe(s)" if ours else "not found"
        parts.append(f"{r.get('id') or 'region'} {where}")
    tracked = sum(1 for p in parts if not p.endswith("not found"))
    line = f"tracked {tracked} of {len(results)} region(s) ({'; '.join(parts)}), {new} new keyframe(s)"
    line += f"; the model ran on {result.frames_processed} frame(s)"
    if result.frames_from_store:
        line += f" ({result.frames_from_store} with stored image features)"
    line += f" in {took_s:.1f} s"
    return "; ".join([line, *result.notes])


# --- frame numbers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameClock:
    """Label Studio frame numbers (1-based, at the config's rate) <-> decoded frame indices."""

    frame_rate: float
    times_s: Any  # (N,) presentation time of each decoded frame, from the first
    duration_s: float

    def index(self, ls_frame: int) -> int:
        """The decoded frame Label Studio shows as frame `ls_frame`. Raises ValueError past the end."""
        t = (ls_frame - 1) / self.frame_rate
        if ls_frame < 1 or t >= self.duration_s - 1e-3:
            raise ValueError(ls_frame)
        return max(0, bisect.bisect_right(self.times_s, t + SEEK_OFFSET_S) - 1)

    def ls_frame(self, index: int) -> int:
        """The Label Studio frame number closest to the start of decoded frame `index`."""
        return int(round(float(self.times_s[index]) * self.frame_rate)) + 1

    @property
    def frames_count(self) -> int:
        return max(1, int(round(self.duration_s * self.frame_rate)))

    def is_last(self, ls_frame: int) -> bool:
        return ls_frame / self.frame_rate >= self.duration_s - 1e-3


# --- one region <-> one tracked object -------------------------------------------------------


class _Object:
    """A user's region: its prompts going in, its keyframes coming out."""

    def __init__(self, obj_id: int, region: dict, config: VideoConfig, clock: FrameClock, video: VideoInfo):
        self.obj_id = obj_id
        self.region = region
        self.config = config
        self.size = (video.width, video.height)
        value = region.get("value") if isinstance(region.get("value"), dict) else {}
        self.value = value
        name = region.get("id") or f"#{obj_id + 1}"
        sequence = [k for k in _list(value.get("sequence")) if isinstance(k, dict)]
        if not sequence:
            raise VideoError(f"region {name} has no keyframes: draw its box on at least one frame")
        sequence.sort(key=lambda k: _frame_of(k, name))
        user = [k for k in sequence if not _is_ours(k)]
        # A region made only of our keyframes (its user keyframes deleted): re-track from its ends.
        self.user_keyframes = user or [sequence[0], sequence[-1]]
        boxes: dict[int, Box] = {}
        for k in self.user_keyframes:
            frame = _frame_of(k, name)
            try:
                index = clock.index(frame)
            except ValueError:
                raise VideoError(
                    f"region {name}: keyframe on frame {frame} is past the video's end "
                    f"({clock.frames_count} frames at {config.frame_rate:g} fps)"
                ) from None
            boxes[index] = _box_px(k, name, frame, self.size)
        self.user_frames = {_frame_of(k, name) for k in self.user_keyframes}
        # Spans the user hid: after a disabled keyframe until the next keyframe (our own
        # disabled keyframes, in the fallback, only say where tracking stopped).
        self.hidden: list[tuple[int, float]] = []
        for i, k in enumerate(user):
            if k.get("enabled", True) is False:
                end = _frame_of(user[i + 1], name) if i + 1 < len(user) else math.inf
                self.hidden.append((_frame_of(k, name), end))
        ends_disabled = bool(user) and user[-1].get("enabled", True) is False
        self.prompt = ObjectPrompt(obj_id, boxes, track_forward=not ends_disabled)

    def to_result(self, track: ObjectTrack, clock: FrameClock) -> dict:
        name = self.region.get("id")
        keyframes = {_frame_of(k, name): _with_time(k, clock.frame_rate) for k in self.user_keyframes}
        if track.span is not None:
            first, last = clock.ls_frame(track.span[0]), clock.ls_frame(track.span[1])
            for frame in range(first, last + 1):
                if frame in keyframes or self._hidden(frame):
                    continue
                index = self._index(clock, frame)
                if index is None or index not in track.boxes:
                    continue
                enabled = self._continues(track, clock, frame, last)
                keyframes[frame] = _keyframe(frame, track.boxes[index], enabled, self.size, clock.frame_rate)
        seen = [track.scores[i] for i in track.boxes if i in track.scores]
        value = {k: v for k, v in self.value.items() if k not in ("sequence", "framesCount", "duration")}
        value["framesCount"] = _positive_int(self.value.get("framesCount")) or clock.frames_count
        value["duration"] = _positive_float(self.value.get("duration")) or clock.duration_s
        value["sequence"] = [keyframes[f] for f in sorted(keyframes)]
        result = {
            "type": "videorectangle",
            "from_name": self.config.control_name,
            "to_name": self.config.video_name,
            "value": value,
        }
        if seen:
            result["score"] = float(
                sum(seen) / len(seen)
            )  # mean tracking confidence (label_studio_sam2.engine.tracks)
        for key in ("id", "origin"):  # the user's region id: Label Studio merges the track into it
            if self.region.get(key):
                result[key] = self.region[key]
        return result

    def _continues(self, track: ObjectTrack, clock: FrameClock, frame: int, last: int) -> bool:
        """A tracked keyframe's lifespan flag: on while the object is there on the next frame."""
        nxt = frame + 1
        if nxt in self.user_frames:
            return True
        if nxt > last:  # the end of what was tracked
            return clock.is_last(frame)
        index = self._index(clock, nxt)
        return index is not None and index in track.boxes

    def _hidden(self, frame: int) -> bool:
        return any(start < frame < end for start, end in self.hidden)

    @staticmethod
    def _index(clock: FrameClock, frame: int) -> int | None:
        try:
            return clock.index(frame)
        except ValueError:
            return None


def _keyframe(frame: int, box: Box, enabled: bool, size: tuple[int, int], frame_rate: float) -> dict:
    keyframe = {
        "frame": frame,
        "enabled": bool(enabled),
        **box_to_rect_pct(box, *size),
        "rotation": 0,
        "time": frame / frame_rate,
    }
    keyframe[SIGNATURE_KEY] = _signature(keyframe)
    return keyframe


def _signature(keyframe: dict) -> str:
    """What a keyframe we wrote looked like: box and lifespan flag."""
    try:
        parts = [f"{float(keyframe[k]):.4f}" for k in ("x", "y", "width", "height")]
    except (KeyError, TypeError, ValueError):
        return ""
    return ",".join(parts + ["1" if keyframe.get("enabled", True) else "0"])


def _is_ours(keyframe: dict) -> bool:
    mark = keyframe.get(SIGNATURE_KEY)
    return isinstance(mark, str) and mark == _signature(keyframe)


def _box_px(keyframe: dict, name: str, frame: int, size: tuple[int, int]) -> Box:
    try:
        rect = tuple(float(keyframe[k]) for k in ("x", "y", "width", "height"))
        rotation = float(keyframe.get("rotation") or 0.0)
    except (KeyError, TypeError, ValueError):
        raise VideoError(f"region {name}: keyframe on frame {frame} lacks x, y, width or height") from None
    if not all(math.isfinite(v) for v in (*rect, rotation)):
        raise VideoError(f"region {name}: keyframe on frame {frame} has a non-finite coordinate")
    x1, y1, x2, y2 = (float(v) for v in rect_to_box_px(rect, rotation, *size))
    if not (x2 > x1 and y2 > y1):
        raise VideoError(f"region {name}: the box on frame {frame} is empty or outside the video")
    return (x1, y1, x2, y2)


def _frame_of(keyframe: dict, name: str) -> int:
    frame = keyframe.get("frame")
    if isinstance(frame, bool) or not isinstance(frame, (int, float)) or not math.isfinite(frame):
        raise VideoError(f"region {name}: a keyframe has no frame number")
    return int(frame)


def _with_time(keyframe: dict, frame_rate: float) -> dict:
    if "time" in keyframe:
        return keyframe
    return {**keyframe, "time": int(keyframe["frame"]) / frame_rate}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _frame_rate(raw: str | None, task_data: dict) -> float:
    value: Any = raw
    if isinstance(raw, str) and raw.startswith("$"):
        value = task_data.get(raw[1:])
    try:
        rate = float(value)
    except (TypeError, ValueError):
        return DEFAULT_FRAME_RATE
    if not math.isfinite(rate) or rate <= 0:
        return DEFAULT_FRAME_RATE
    return 1.0 / rate if rate < 1 else rate


def _positive_int(value: Any) -> int | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return int(value)
    return None


def _positive_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None
