"""Video tracking, tool-neutral: a video file and box prompts per object in, tracks out.

A tool's adapter turns its regions into `label_studio_sam2.engine.tracks.ObjectPrompt`s (boxes in
pixels on decoded frame indices) once it knows the video's size and frame times, and turns the
tracks back into its own format (Label Studio's: `label_studio_sam2.labelstudio.video`). Here: the
video opened under the pixel limit (MAX_IMAGE_MP), the tracker run within the deadline, how far
each object is followed (VIDEO_MAX_FRAMES) and when it is given up, and the errors a user can act
on as `VideoError`, a per-task error. No torch here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from label_studio_sam2.engine.frames import FramesTooLarge, UnreadableVideo, VideoReader
from label_studio_sam2.engine.tracks import ObjectPrompt, TrackResult
from label_studio_sam2.service.errors import Kind, TaskError


class VideoError(TaskError):
    """This video task cannot be tracked; the message says why."""


class NothingToTrack(VideoError):
    """No video region yet: the usual state of a task just opened, not worth a warning."""

    log_level = logging.DEBUG


class Tracker(Protocol):
    """What `track_video` needs (label_studio_sam2.engine.tracker.VideoTracker)."""

    model_id: str

    def track(self, frames, objects, *, max_frames_each_way, deadline, lost_after) -> TrackResult: ...


@dataclass(frozen=True)
class VideoInfo:
    """What an adapter needs of the video to place its prompts and read the tracks back."""

    width: int
    height: int
    times_s: Any  # (N,) presentation time of each decoded frame, from the first
    duration_s: float


def track_video(
    video_path: str | os.PathLike | Callable[[], str],
    tracker: Tracker,
    prompts: Callable[[VideoInfo], list[ObjectPrompt]],
    *,
    deadline: float,
    max_frames: int,
    lost_after: int = 5,
    max_pixels: int | None = None,
) -> tuple[TrackResult, VideoInfo]:
    """Track the objects `prompts(video)` gives on the video.

    Arguments:
        video_path: the video, downloaded; or a function that downloads it and returns its path
            (the adapter checks there is something to track before the download).
        tracker: label_studio_sam2.engine.tracker.VideoTracker (anything with its `track`).
        prompts: the objects' box prompts, made once the video's size and frame times are known
            (may raise VideoError, e.g. for a prompt past the video's end).
        deadline: time.monotonic() by which tracking must have stopped (`TrackResult.partial`
            says it cut the work short).
        max_frames: frames to follow each object past its last prompt and before its first.
        lost_after: consecutive frames without an object before it is given up.
        max_pixels: frames of more pixels are refused (MAX_IMAGE_MP), before they are decoded.
    Raises:
        VideoError: an unreadable video, or frames over `max_pixels`.
    """
    if callable(video_path):
        video_path = video_path()
    try:
        reader = VideoReader(video_path, max_pixels=max_pixels)
    except FramesTooLarge as e:
        raise VideoError(f"{e} (MAX_IMAGE_MP)", Kind.TOO_LARGE) from None
    except UnreadableVideo as e:
        raise VideoError(f"cannot read the video: {e}") from None
    with reader:
        video = VideoInfo(reader.width, reader.height, reader.times_s, reader.duration_s)
        objects = prompts(video)
        try:
            result = tracker.track(
                reader,
                objects,
                max_frames_each_way=max_frames,
                deadline=deadline,
                lost_after=lost_after,
            )
        except FramesTooLarge as e:  # a frame larger than the stream declared
            raise VideoError(f"{e} (MAX_IMAGE_MP)", Kind.TOO_LARGE) from None
        except UnreadableVideo as e:  # a prompted frame that does not decode
            raise VideoError(f"cannot read the video: {e}") from None
    return result, video
