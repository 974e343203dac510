"""Synthetic videos for tests and benchmarks: shapes moving across a textured background.

`write_video` encodes with PyAV (H.264 in MP4 by default: what Label Studio recommends), and
`moving_shapes` says where every shape is on every frame, so tests can check frame numbering
and coordinates against ground truth.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from fractions import Fraction

import av
import numpy as np


@dataclass(frozen=True)
class Shape:
    """A filled rectangle moving at constant speed: box on frame i is `box0 + i * velocity`."""

    color: tuple[int, int, int]
    box0: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels on frame 0
    velocity: tuple[float, float]  # pixels per frame, x and y
    first_frame: int = 0  # absent before this frame
    last_frame: int | None = None  # absent after this frame

    def box(self, i: int) -> tuple[float, float, float, float] | None:
        if i < self.first_frame or (self.last_frame is not None and i > self.last_frame):
            return None
        dx, dy = self.velocity[0] * i, self.velocity[1] * i
        x1, y1, x2, y2 = self.box0
        return (x1 + dx, y1 + dy, x2 + dx, y2 + dy)


def background(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A textured (H, W, 3) uint8 background: soft stripes plus noise, no flat areas."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 110 + 40 * np.sin(x / 7.0) * np.cos(y / 11.0)
    noise = rng.normal(0, 12, size=(height, width, 3))
    img = base[..., None] + noise + np.array([10, 0, -10])
    return np.clip(img, 0, 255).astype(np.uint8)


def moving_shapes(
    num_frames: int, height: int, width: int, shapes: list[Shape], seed: int = 0
) -> Iterator[np.ndarray]:
    """Yield (H, W, 3) uint8 RGB frames, one at a time (a long video never sits in memory)."""
    bg = background(height, width, seed)
    for i in range(num_frames):
        frame = bg.copy()
        for shape in shapes:
            box = shape.box(i)
            if box is None:
                continue
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            x1, x2 = max(0, x1), min(width, x2)
            y1, y2 = max(0, y1), min(height, y2)
            if x2 > x1 and y2 > y1:
                frame[y1:y2, x1:x2] = shape.color
        yield frame


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    fps: int | Fraction = 24,
    *,
    codec: str = "libx264",
    gop: int | None = None,
    rotation: int | None = None,
) -> str:
    """Encode RGB frames to a file (container from the suffix). Sides must be even for 4:2:0.

    `gop`: keyframe interval (None: the encoder's default); `rotation`: display rotation
    metadata in degrees counterclockwise, as phones write it.
    """
    path = str(path)
    with av.open(path, mode="w") as container:
        stream = None
        for rgb in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=fps)
                stream.width, stream.height = rgb.shape[1], rgb.shape[0]
                stream.pix_fmt = "yuv420p"
                options = {"preset": "veryfast"} if "264" in codec else {}  # veryfast keeps B-frames
                if gop is not None:
                    stream.codec_context.gop_size = gop
                    if "264" in codec:
                        options["keyint"] = str(gop)
                        options["min-keyint"] = str(gop)
                        options["scenecut"] = "0"
                stream.codec_context.options = options
                if rotation:
                    stream.set_display_rotation(rotation)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return path


# --- clips for the trained fixture (devkit/sam2-shapes) ---------------------------------


@dataclass
class Clip:
    """frames: (H, W, 3) uint8 RGB frames in memory; truth: per frame, the visible mask of the
    tracked shape, (H, W) bool (None where it is out of the picture)."""

    frames: list[np.ndarray]
    truth: list[np.ndarray | None]

    def box(self, index: int) -> tuple[float, float, float, float]:
        """Tight box of the tracked shape's visible part, continuous pixels."""
        ys, xs = np.nonzero(self.truth[index])
        return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


class ClipFrames:
    """A `Clip` as the tracker's FrameSource; its content key hashes the decoded frames."""

    def __init__(self, clip: Clip):
        self.clip = clip
        self.num_frames = len(clip.frames)
        self.height, self.width = clip.frames[0].shape[:2]
        h = hashlib.sha256(f"{self.num_frames}x{self.height}x{self.width}".encode())
        for frame in clip.frames:
            h.update(np.ascontiguousarray(frame).tobytes())
        self.content_key = h.hexdigest()

    def frame(self, index: int) -> np.ndarray:
        return self.clip.frames[index]

    def frames(self, indices: range) -> Iterator[tuple[int, np.ndarray]]:
        return ((i, self.clip.frames[i]) for i in indices)


def crossing_clip(seed: int, num_frames: int = 50, hw: tuple[int, int] = (96, 128)) -> Clip:
    """A red ellipse (the tracked shape, in front) and a blue rectangle crossing paths over a
    textured background of the fixture's training kind (devkit/scenes.py, split "test")."""
    from devkit import scenes

    rng = np.random.default_rng(np.random.SeedSequence([scenes.SPLITS["test"], 1000 + seed]))
    h, w = hw
    bg = scenes.background(rng, hw)
    ellipse = scenes.Shape("ellipse", 0.15 * w, 0.35 * h, 0.13 * h, 0.7, rng.uniform(0, 0.5), (220, 40, 40))
    rect = scenes.Shape("rectangle", 0.85 * w, 0.65 * h, 0.16 * h, 0.8, rng.uniform(0, 0.5), (40, 40, 220))
    ve = (0.7 * w / num_frames, 0.3 * h / num_frames)  # crossing near the middle of the clip
    vr = (-0.7 * w / num_frames, -0.3 * h / num_frames)
    frames, truth = [], []
    for i in range(num_frames):
        e = replace(ellipse, cx=ellipse.cx + ve[0] * i, cy=ellipse.cy + ve[1] * i)
        r = replace(rect, cx=rect.cx + vr[0] * i, cy=rect.cy + vr[1] * i)
        image, masks = scenes.render(bg, [r, e], rng, noise=4)
        frames.append(image)
        truth.append(masks[1])
    return Clip(frames, truth)


def leaving_clip(
    num_frames: int = 40,
    exit_frame: int = 24,
    hw: tuple[int, int] = (96, 128),
    hidden: range = range(0),
    away: int | None = None,
) -> Clip:
    """A red ellipse crossing to the right edge and out of the picture (gone from `exit_frame`
    on), passing a blue rectangle that stays; on the `hidden` frames the ellipse is not drawn.
    `away`: after that many frames out of the picture the ellipse turns round and comes back in
    across the right edge, at the same speed (None: it never comes back)."""
    from devkit import scenes

    rng = np.random.default_rng(np.random.SeedSequence([scenes.SPLITS["test"], 2000]))
    h, w = hw
    bg = scenes.background(rng, hw)
    radius = 0.13 * h
    start, speed = 0.2 * w, (w + radius - 0.2 * w) / exit_frame  # its left edge reaches w at exit_frame
    ellipse = scenes.Shape("ellipse", start, 0.35 * h, radius, 0.7, 0.0, (220, 40, 40))
    rect = scenes.Shape("rectangle", 0.75 * w, 0.72 * h, 0.16 * h, 0.8, 0.3, (40, 40, 220))
    frames, truth = [], []
    for i in range(num_frames):
        steps = i  # how far it has driven to the right, in frames
        if away is not None and i > exit_frame:  # out (a frame's drive past the edge), then back
            steps = exit_frame + 1 - max(0, i - exit_frame - away)
        e = replace(ellipse, cx=start + speed * steps)
        image, masks = scenes.render(bg, [rect] if i in hidden else [rect, e], rng, noise=4)
        frames.append(image)
        truth.append(masks[1] if len(masks) > 1 and masks[1].any() else None)
    return Clip(frames, truth)
