"""Decoded video frames by 0-based index, one at a time (PyAV), in either direction.

The tracker never holds a whole video: it asks for frames in order, forwards or backwards.

- Index. Opening a file demuxes it once (no decoding: packets only, a few milliseconds per
  thousand frames) and keeps every video frame's presentation timestamp, sorted. Frame `i` is the
  i-th frame in presentation order; `num_frames` is exact even when the container's own count is
  missing or wrong, and `times_s[i]` is its time in seconds from the first frame. Files whose
  packets carry no timestamps are indexed by decoding them once instead, and cannot seek.
- Forwards, `frames(range(a, b))` seeks to the keyframe at or before `a` and decodes on; it holds
  one decoded frame at a time (plus the codec's own reference frames).
- Backwards, `frames(range(b, a, -1))` works in chunks: seek to the keyframe before the chunk's
  first frame, decode forward to its last, keep the chunk's frames (still in the codec's YUV
  format: 1.5 bytes a pixel for 4:2:0) and hand them out in reverse, then the chunk before.
  Memory bound: `chunk_bytes` (default 128 MiB, e.g. about 380 frames of 640x360 or 43 of 1080p).
  Cost: every chunk re-decodes from its keyframe, so a keyframe interval longer than a chunk
  decodes about (interval / 2) extra frames per chunk.

Frames come out as (H, W, 3) uint8 RGB, turned upright when the stream carries a display
rotation (phone videos), as browsers show them. Non-square pixels are not stretched.

- Identity. `content_key` names what the frames are: the sha256 of the file's bytes with how
  they are decoded (this module's numbering and colour conversion, PyAV's version). The tracker
  keys stored frame features by it; it is computed on first use (1-2 s per GB on 2 cores).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import os
from collections.abc import Iterator
from fractions import Fraction
from typing import Protocol

import av
import numpy as np

log = logging.getLogger(__name__)


class UnreadableVideo(ValueError):
    """The file is missing, not a video, or holds no decodable video frame."""


class FramesTooLarge(UnreadableVideo):
    """The video's frames have more pixels than the reader was allowed (`max_pixels`): refused
    before any frame of that size is decoded when the stream declares its size, else at the
    first such frame."""


class FrameSource(Protocol):
    """What the tracker needs from a video: its size and its frames by 0-based index."""

    num_frames: int
    width: int
    height: int
    # what the frames are (the same key: the same frames), or None when unknown; the tracker
    # keeps frames' image features in its store only for a video that has one
    content_key: str | None

    def frames(self, indices: range) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(index, (H, W, 3) uint8 RGB)` for `indices`, a range with step 1 or -1."""
        ...

    def frame(self, index: int) -> np.ndarray: ...


class VideoReader:
    """One video file opened for reading. Not thread-safe; close it (or use `with`)."""

    def __init__(
        self, path: str | os.PathLike, *, chunk_bytes: int = 128 << 20, max_pixels: int | None = None
    ):
        """`max_pixels`: frames of more pixels raise FramesTooLarge (decompression bombs: a few
        MB of video can declare 16000 x 16000 frames)."""
        self.path = str(path)
        self.chunk_bytes = int(chunk_bytes)
        self.max_pixels = max_pixels
        self._content_key: str | None = None
        if not os.path.isfile(self.path):
            raise UnreadableVideo(f"video file {self.path} does not exist")
        if os.path.getsize(self.path) == 0:
            raise UnreadableVideo("the video file is empty (0 bytes)")
        try:
            self._container = av.open(self.path, mode="r")
        except (av.FFmpegError, OSError, ValueError) as e:
            raise UnreadableVideo(f"not a readable video: {_short(e)}") from e
        try:
            if not self._container.streams.video:
                raise UnreadableVideo("the file has no video stream")
            self._stream = self._container.streams.video[0]
            context = self._stream.codec_context
            self._check_size(int(context.width or 0), int(context.height or 0))  # before decoding
            self._build_index()
            first = self._first_frame()
        except UnreadableVideo:
            self._container.close()
            raise
        except (av.FFmpegError, OSError, ValueError) as e:
            self._container.close()
            raise UnreadableVideo(f"cannot decode the video: {_short(e)}") from e
        self._rotation = int(round((first.rotation or 0) / 90.0)) % 4  # quarter turns, counterclockwise
        h, w = first.height, first.width
        self.height, self.width = (w, h) if self._rotation % 2 else (h, w)
        self.fps = (
            float(self._stream.average_rate or self._stream.guessed_rate or 0) or self._fps_from_times()
        )

    # --- what callers read ---------------------------------------------------------------

    DECODING = "pts-order,rgb24,upright"  # what frame i is; change it when decoding changes

    @property
    def content_key(self) -> str:
        """sha256 of the file and of how it is decoded (computed once, on first use)."""
        if self._content_key is None:
            h = hashlib.sha256(f"{self.DECODING},av-{av.__version__}\n".encode())
            with open(self.path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            self._content_key = h.hexdigest()
        return self._content_key

    @property
    def duration_s(self) -> float:
        """From the first frame's start to the last frame's end."""
        if self.num_frames > 1:
            last_step = self.times_s[-1] - self.times_s[-2]
        else:
            last_step = 1.0 / self.fps if self.fps else 0.0
        return float(self.times_s[-1] + last_step)

    def frame(self, index: int) -> np.ndarray:
        """One frame by index (seeks; decodes from the keyframe before it)."""
        for _, rgb in self.frames(range(index, index + 1)):
            return rgb
        raise IndexError(index)

    def frames(self, indices: range) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(index, rgb)` for every index of `indices` (step 1 or -1), in that order."""
        if indices.step not in (1, -1):
            raise ValueError("frames() reads with step 1 or -1")
        if len(indices) == 0:
            return
        lo, hi = min(indices[0], indices[-1]), max(indices[0], indices[-1])
        if lo < 0 or hi >= self.num_frames:
            raise IndexError(f"frames {lo}..{hi} outside 0..{self.num_frames - 1}")
        if indices.step == 1:
            for index, frame in self._decode(lo, hi + 1):
                yield index, self._rgb(frame)
            return
        per_frame = max(1, self.width * self.height * 3 // 2)
        chunk = max(1, self.chunk_bytes // per_frame)
        stop = hi + 1
        while stop > lo:
            start = max(lo, stop - chunk)
            kept = list(self._decode(start, stop))
            for index, frame in reversed(kept):
                yield index, self._rgb(frame)
            del kept
            stop = start

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------

    def _build_index(self) -> None:
        pts: list[int] = []
        missing = False
        for packet in self._container.demux(self._stream):
            if packet.size == 0 or packet.is_discard:
                continue  # the demuxer's final flush packet; edit-list leaders the decoder drops
            if packet.pts is None:
                missing = True
                break
            pts.append(int(packet.pts))
        self._time_base = self._stream.time_base or Fraction(1, 90000)
        self.seekable = not missing
        if missing:
            # No timestamps in the packets: count by decoding, and read by decoding from the start.
            self._rewind()
            self.num_frames = sum(1 for _ in self._container.decode(self._stream))
            self._pts = []
            self.times_s = np.arange(self.num_frames, dtype=np.float64)
            rate = float(self._stream.average_rate or self._stream.guessed_rate or 0)
            if rate:
                self.times_s /= rate
        else:
            pts.sort()
            self._pts = pts
            self.num_frames = len(pts)
            self.times_s = (np.asarray(pts, dtype=np.float64) - (pts[0] if pts else 0)) * float(
                self._time_base
            )
        if self.num_frames == 0:
            raise UnreadableVideo("the video has no frames")
        declared = int(self._stream.frames or 0)
        if declared and declared != self.num_frames:
            log.info(
                "%s: container says %d frames, the stream holds %d", self.path, declared, self.num_frames
            )

    def _fps_from_times(self) -> float:
        if self.num_frames > 1 and self.times_s[-1] > 0:
            return (self.num_frames - 1) / float(self.times_s[-1])
        return 0.0

    def _first_frame(self) -> av.VideoFrame:
        for _, frame in self._decode(0, 1):
            return frame
        raise UnreadableVideo("no frame of the video could be decoded")

    def _rewind(self) -> None:
        if self.seekable:
            self._container.seek(0)
        else:  # no timestamps to seek by: open the file again
            self._container.close()
            self._container = av.open(self.path, mode="r")
            self._stream = self._container.streams.video[0]

    def _check_size(self, width: int, height: int) -> None:
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise FramesTooLarge(
                f"the video's frames are {width}x{height} = {width * height / 1e6:.0f} MP, over the "
                f"{self.max_pixels / 1e6:g} MP limit"
            )

    def _decode(self, start: int, stop: int) -> Iterator[tuple[int, av.VideoFrame]]:
        """Decoded frames with start <= index < stop, in presentation order."""
        index = -1
        for frame in self._frames_from(start):
            self._check_size(frame.width, frame.height)  # a stream may change size mid-way
            index = self._index_of(frame, index)
            if index >= stop:
                return
            if index >= start:
                yield index, frame
        if index < start:
            raise UnreadableVideo(f"the video ends before frame {start} (decoded up to {index})")

    def _frames_from(self, start: int) -> Iterator[av.VideoFrame]:
        """A decoding iterator whose first frame is at or before frame `start`."""
        if not self.seekable or start == 0:
            self._rewind()
            return self._container.decode(self._stream)
        self._container.seek(self._pts[start], stream=self._stream, backward=True, any_frame=False)
        frames = self._container.decode(self._stream)
        first = next(frames, None)
        if first is not None and self._index_of(first, self.num_frames) <= start:
            return itertools.chain([first], frames)
        # Some formats seek only approximately and land past `start`: decode from the beginning.
        log.debug("%s: seeking to frame %d landed past it; decoding from the start", self.path, start)
        self._rewind()
        return self._container.decode(self._stream)

    def _index_of(self, frame: av.VideoFrame, previous: int) -> int:
        """The 0-based index of a decoded frame: by its timestamp, else the one after `previous`."""
        if self.seekable and frame.pts is not None:
            found = bisect.bisect_left(self._pts, int(frame.pts))
            if found < self.num_frames and self._pts[found] == frame.pts:
                return found
        return previous + 1

    def _rgb(self, frame: av.VideoFrame) -> np.ndarray:
        rgb = frame.to_ndarray(format="rgb24")
        if self._rotation:
            rgb = np.ascontiguousarray(np.rot90(rgb, k=self._rotation))
        return rgb


def _short(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
