"""Small synthetic images and videos with clear objects, for the E2E tests and the `make run` demo.

Each scene knows where its objects are, so a test can click on one and a demo user sees
something a real SAM2 segments well (flat shapes on a soft gradient).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Scene:
    """An image file and the pixel boxes (x0, y0, x1, y1) of its main object and of the
    distractor square."""

    path: Path
    width: int
    height: int
    object_box_px: tuple[int, int, int, int]
    distractor_box_px: tuple[int, int, int, int] | None = None

    def center_pct(self) -> tuple[float, float]:
        """Centre of the main object in percent of the image size (Label Studio's units)."""
        x0, y0, x1, y1 = self.object_box_px
        return 100.0 * (x0 + x1) / 2 / self.width, 100.0 * (y0 + y1) / 2 / self.height

    def box_pct(
        self, margin_px: int = 2, box_px: tuple[int, int, int, int] | None = None
    ) -> dict[str, float]:
        """The object's box (or `box_px`), a little enlarged, as a Label Studio rectangle value
        (percent)."""
        x0, y0, x1, y1 = box_px or self.object_box_px
        x0, y0 = max(0, x0 - margin_px), max(0, y0 - margin_px)
        x1, y1 = min(self.width, x1 + margin_px), min(self.height, y1 + margin_px)
        return {
            "x": 100.0 * x0 / self.width,
            "y": 100.0 * y0 / self.height,
            "width": 100.0 * (x1 - x0) / self.width,
            "height": 100.0 * (y1 - y0) / self.height,
            "rotation": 0,
        }


def _background(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.uniform(40, 90, size=3)
    tilt = rng.uniform(-30, 30, size=3)
    rgb = base[None, None, :] + tilt[None, None, :] * (xx / width + yy / height)[..., None] / 2
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def make_scene(path: Path, width: int = 96, height: int = 72, seed: int = 0) -> Scene:
    """Write a PNG or JPEG with one bright ellipse (the main object) and a distractor square."""
    rng = np.random.default_rng(seed)
    image = _background(width, height, seed)
    draw = ImageDraw.Draw(image)
    w, h = int(width * rng.uniform(0.3, 0.4)), int(height * rng.uniform(0.3, 0.4))
    x0 = int(rng.uniform(0.1, 0.5) * width)
    y0 = int(rng.uniform(0.1, 0.5) * height)
    box = (x0, y0, x0 + w, y0 + h)
    draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(180, 255, size=3)))
    s = max(4, min(width, height) // 6)
    sx, sy = width - s - 3, height - s - 3
    draw.rectangle((sx, sy, sx + s, sy + s), fill=tuple(int(c) for c in rng.integers(0, 60, size=3)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return Scene(
        path=path, width=width, height=height, object_box_px=box, distractor_box_px=(sx, sy, sx + s, sy + s)
    )


@dataclass(frozen=True)
class VideoScene:
    """A video file; `boxes_px[i]` is the object's box on frame i+1 (Label Studio counts from 1)."""

    path: Path
    width: int
    height: int
    fps: int
    boxes_px: list[tuple[int, int, int, int]]

    def rect_pct(self, frame: int) -> dict[str, float]:
        x0, y0, x1, y1 = self.boxes_px[frame - 1]
        return {
            "x": 100.0 * x0 / self.width,
            "y": 100.0 * y0 / self.height,
            "width": 100.0 * (x1 - x0) / self.width,
            "height": 100.0 * (y1 - y0) / self.height,
        }


def make_video(path: Path, width: int = 64, height: int = 48, frames: int = 12, fps: int = 25) -> VideoScene:
    """Write an H.264 MP4 of a bright square moving right over a dark gradient."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    background = np.asarray(_background(width, height, 7))
    size = height // 3
    boxes = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for i in range(frames):
            x0 = 4 + i * (width - size - 8) // max(1, frames - 1)
            y0 = height // 3
            frame = background.copy()
            frame[y0 : y0 + size, x0 : x0 + size] = (230, 220, 40)
            boxes.append((x0, y0, x0 + size, y0 + size))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return VideoScene(path=path, width=width, height=height, fps=fps, boxes_px=boxes)


# --- regions on a scene, in the shapes Label Studio 1.23.2 sends and stores -------------------


def region_id() -> str:
    return uuid.uuid4().hex[:10]


def keypoint(scene, positive: bool = True) -> dict:
    """A smart keypoint on the scene's object, in the shape the 1.23.2 UI sends."""
    x, y = scene.center_pct()
    return {
        "id": region_id(),
        "type": "keypointlabels",
        "from_name": "kp",
        "to_name": "image",
        "original_width": scene.width,
        "original_height": scene.height,
        "image_rotation": 0,
        "origin": "manual",
        "is_positive": positive,
        "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": ["object"], "labels": ["object"]},
    }


def rectangle(scene, label: str = "object", box_px=None, from_name: str = "box") -> dict:
    """A rectangle around the scene's object (or `box_px`), as the UI sends or stores it."""
    return {
        "id": region_id(),
        "type": "rectanglelabels",
        "from_name": from_name,
        "to_name": "image",
        "original_width": scene.width,
        "original_height": scene.height,
        "image_rotation": 0,
        "origin": "manual",
        "value": {**scene.box_pct(box_px=box_px), "rectanglelabels": [label]},
    }
