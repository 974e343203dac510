"""Synthetic scenes for training and testing the tiny SAM2 fixture (`devkit/sam2-shapes`).

Several filled shapes (ellipses, rotated rectangles, triangles, regular polygons, stars) of random
colours on textured, noisy backgrounds, at non-square sizes. Some scenes hold a *touching pair*:
two shapes of the same colour that overlap, so only a negative click tells them apart. `make_clip`
moves the shapes of a scene over frames (for tracking).

One generator serves `tools/train_tiny.py` and the behavioural tests. Every scene is a pure
function of `(seed, split)`: the training draws only from `split="train"`, the held-out
evaluation from `"val"`, and the tests from `"test"`, so the tests' scenes were never trained on.

Conventions: images are (H, W, 3) uint8 RGB; masks are (H, W) bool of the *visible* part of a
shape (later shapes cover earlier ones); points are continuous pixels XY (see label_studio_sam2/engine/transforms.py).
Depends on numpy and Pillow only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from label_studio_sam2.engine.finetune import mask_iou
from label_studio_sam2.engine.image import Prompt
from label_studio_sam2.engine.transforms import mask_box

SPLITS = {"train": 1, "val": 2, "test": 3}
KINDS = ("ellipse", "rectangle", "triangle", "polygon", "star")
MIN_VISIBLE = 0.6  # a shape must keep this fraction of its area visible
MIN_COLOR_DIST = 70.0  # RGB distance between a shape's colour and the background under it


@dataclass(frozen=True)
class Shape:
    """One filled shape. Centre and radius in continuous pixels; angle in radians."""

    kind: str
    cx: float
    cy: float
    radius: float
    aspect: float  # minor/major axis ratio (ellipse, rectangle)
    angle: float
    color: tuple[int, int, int]
    sides: int = 5  # polygon sides / star points
    texture: float = 0.0  # amplitude of a gradient across the shape, in grey levels

    def polygon(self) -> np.ndarray:
        """(K, 2) float vertices XY."""
        if self.kind == "ellipse":
            t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
            pts = np.stack([np.cos(t), self.aspect * np.sin(t)], 1)
        elif self.kind == "rectangle":
            a = self.aspect
            pts = np.array([[-1, -a], [1, -a], [1, a], [-1, a]], float) / np.hypot(1, a) * 1.25
        elif self.kind == "triangle":
            t = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + np.pi / 2
            pts = np.stack([np.cos(t), np.sin(t)], 1) * 1.15
        elif self.kind == "polygon":
            t = np.linspace(0, 2 * np.pi, self.sides, endpoint=False)
            pts = np.stack([np.cos(t), np.sin(t)], 1)
        elif self.kind == "star":
            t = np.linspace(0, 2 * np.pi, 2 * self.sides, endpoint=False)
            r = np.where(np.arange(2 * self.sides) % 2 == 0, 1.15, 0.6)
            pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        else:
            raise ValueError(f"unknown shape kind {self.kind!r}")
        c, s = np.cos(self.angle), np.sin(self.angle)
        rot = np.array([[c, -s], [s, c]])
        return pts @ rot.T * self.radius + np.array([self.cx, self.cy])

    def mask(self, hw: tuple[int, int]) -> np.ndarray:
        """(H, W) bool: the pixels whose centres fall inside the shape."""
        img = Image.new("L", (hw[1], hw[0]), 0)
        # PIL fills pixel (i, j) when its integer coordinate is inside: shift by half a pixel so
        # continuous coordinates (pixel centres at +0.5) are what the polygon is tested against.
        ImageDraw.Draw(img).polygon([(x - 0.5, y - 0.5) for x, y in self.polygon()], fill=1)
        return np.asarray(img, dtype=bool)


@dataclass
class Scene:
    """A rendered scene.

    image: (H, W, 3) uint8 RGB.
    masks: (N, H, W) bool, the visible part of each shape, in drawing order.
    shapes: the N shapes.
    pairs: (i, j) index pairs of touching same-colour shapes (j drawn over i).
    """

    image: np.ndarray
    masks: np.ndarray
    shapes: list[Shape]
    pairs: list[tuple[int, int]]

    @property
    def hw(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    def isolated(self, i: int, margin: int = 3) -> bool:
        """True when shape i is fully visible and no other shape comes within `margin` px."""
        full = self.shapes[i].mask(self.hw)
        if (full & ~self.masks[i]).any():
            return False
        near = _dilate(full, margin)
        return not any((near & m).any() for j, m in enumerate(self.masks) if j != i)


def _rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([SPLITS[split], int(seed)]))


def _smooth_noise(rng: np.random.Generator, hw: tuple[int, int], cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    h, w = hw
    gh, gw = max(2, round(cells * h / max(h, w))), max(2, round(cells * w / max(h, w)))
    out = []
    for _ in range(channels):
        grid = rng.uniform(0, 255, (gh, gw)).astype(np.uint8)
        out.append(np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), np.float32))
    return np.stack(out, -1) / 127.5 - 1.0


def background(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) float32 textured background: colour gradient + blotches + a periodic pattern."""
    h, w = hw
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    theta = rng.uniform(0, 2 * np.pi)
    t = (xx * np.cos(theta) + yy * np.sin(theta)) / max(h, w)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = (c0 + (c1 - c0) * t[..., None]).astype(np.float32)
    img += rng.uniform(10, 45) * _smooth_noise(rng, hw, int(rng.integers(3, 9)), 3)
    pattern = rng.choice(["stripes", "checker", "dots", "none"])
    amp = rng.uniform(8, 35)
    color = rng.uniform(-1, 1, 3)
    period = rng.uniform(6, 24)
    phi = rng.uniform(0, np.pi)
    u = xx * np.cos(phi) + yy * np.sin(phi)
    v = -xx * np.sin(phi) + yy * np.cos(phi)
    if pattern == "stripes":
        img += amp * color * np.sin(2 * np.pi * u / period)[..., None]
    elif pattern == "checker":
        img += amp * color * (((u // period) + (v // period)) % 2 * 2 - 1)[..., None]
    elif pattern == "dots":
        d = np.hypot((u % period) - period / 2, (v % period) - period / 2)
        img += amp * color * (d < period / 4)[..., None]
    return img.astype(np.float32, copy=False)


def _random_shape(rng: np.random.Generator, hw: tuple[int, int]) -> Shape:
    h, w = hw
    # The model sees 128 x 128 and its masks are 32 x 32: shapes span at least a few mask cells
    # along the image's long side too.
    radius = rng.uniform(0.12, 0.24) * min(h, w)
    return Shape(
        kind=str(rng.choice(KINDS)),
        cx=rng.uniform(radius, w - radius),
        cy=rng.uniform(radius, h - radius),
        radius=radius,
        aspect=rng.uniform(0.45, 1.0),
        angle=rng.uniform(0, 2 * np.pi),
        color=(0, 0, 0),
        sides=int(rng.integers(5, 8)),
        texture=rng.uniform(0, 25),
    )


def _pick_color(rng: np.random.Generator, bg: np.ndarray, mask: np.ndarray) -> tuple[int, int, int]:
    under = bg[mask].mean(0) if mask.any() else bg.reshape(-1, 3).mean(0)
    best, best_d = None, -1.0
    for _ in range(12):
        c = rng.uniform(0, 255, 3)
        d = float(np.linalg.norm(c - under))
        if d >= MIN_COLOR_DIST:
            return tuple(int(v) for v in c)
        if d > best_d:
            best, best_d = c, d
    return tuple(int(v) for v in best)


def _neighbour(rng: np.random.Generator, a: Shape, hw: tuple[int, int]) -> Shape:
    """A shape of a's colour overlapping a's rim (the two read as one blob)."""
    b = _random_shape(rng, hw)
    radius = a.radius * rng.uniform(0.7, 1.1)
    phi = rng.uniform(0, 2 * np.pi)
    dist = (a.radius + radius) * rng.uniform(0.6, 0.8)
    return replace(
        b, cx=a.cx + dist * np.cos(phi), cy=a.cy + dist * np.sin(phi), radius=radius, color=a.color
    )


def render(
    bg: np.ndarray, shapes: list[Shape], rng: np.random.Generator, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """Draw shapes over a background in order; add pixel noise.

    Returns (image (H, W, 3) uint8, visible masks (N, H, W) bool).
    """
    hw = bg.shape[:2]
    img = bg.copy()
    full = [s.mask(hw) for s in shapes]
    for s, m in zip(shapes, full, strict=True):
        ys, xs = np.nonzero(m)
        g = ((xs + 0.5 - s.cx) * np.cos(s.angle) + (ys + 0.5 - s.cy) * np.sin(s.angle)) / max(s.radius, 1.0)
        img[ys, xs] = np.asarray(s.color, np.float32) + s.texture * g[:, None].astype(np.float32)
    visible, covered = [], np.zeros(hw, bool)
    for m in reversed(full):  # what later shapes leave of each one
        visible.append(m & ~covered)
        covered |= m
    img += noise * rng.standard_normal(img.shape, dtype=np.float32)
    masks = np.array(visible[::-1], dtype=bool).reshape(len(shapes), *hw)
    return np.clip(img, 0, 255).round().astype(np.uint8), masks


def scene_size(rng: np.random.Generator) -> tuple[int, int]:
    """Random (H, W): 128-288 px a side, either orientation, aspect up to 2."""
    long = int(rng.integers(144, 289))
    short = int(max(128, long / rng.uniform(1.0, 2.0)))
    return (long, short) if rng.random() < 0.5 else (short, long)


def make_scene(
    seed: int,
    split: str = "test",
    hw: tuple[int, int] | None = None,
    n_shapes: int | None = None,
    pair: bool | None = None,
) -> Scene:
    """A random scene, a pure function of its arguments.

    Arguments:
        seed, split: which scene (see the module docstring for the splits).
        hw: (H, W); random (`scene_size`) when None.
        n_shapes: number of independent shapes (2-5 when None); a touching pair adds one more.
        pair: whether to add a touching same-colour pair (random, 40 %, when None).
    """
    rng = _rng(seed, split)
    hw = hw or scene_size(rng)
    bg = background(rng, hw)
    n = int(rng.integers(2, 6)) if n_shapes is None else n_shapes
    want_pair = rng.random() < 0.4 if pair is None else pair
    placed = _Placed(hw)
    total = n + (1 if want_pair else 0)
    for _ in range(200):
        if len(placed.shapes) >= total:
            break
        s = _random_shape(rng, hw)
        m = s.mask(hw)
        s = replace(s, color=_pick_color(rng, bg, m))
        if want_pair and not placed.pairs:  # the pair goes first, while there is room
            b = _neighbour(rng, s, hw)
            placed.add([(s, m), (b, b.mask(hw))])
        else:
            placed.add([(s, m)])
    image, masks = render(bg, placed.shapes, rng, noise=rng.uniform(2, 14))
    return Scene(image, masks, placed.shapes, placed.pairs)


class _Placed:
    """Shapes accepted so far. A new shape must lie inside the image and stay 2 px away from
    every other one; a pair (added together) may overlap, its first member keeping
    MIN_VISIBLE of its area. So all shapes but a pair's are isolated."""

    def __init__(self, hw: tuple[int, int]):
        self.hw = hw
        self.shapes: list[Shape] = []
        self.pairs: list[tuple[int, int]] = []
        self.taken = np.zeros(hw, bool)  # every accepted shape, grown by 2 px

    def add(self, group: list[tuple[Shape, np.ndarray]]) -> bool:
        for s, m in group:
            if m.sum() < 80 or _outside(s, self.hw) or (self.taken & m).any():
                return False
        if len(group) == 2:
            (_, ma), (_, mb) = group
            if (ma & ~mb).sum() < MIN_VISIBLE * ma.sum():
                return False
            self.pairs.append((len(self.shapes), len(self.shapes) + 1))
        for s, m in group:
            self.shapes.append(s)
            self.taken |= _dilate(m, 2)
        return True


def _outside(s: Shape, hw: tuple[int, int]) -> bool:
    p = s.polygon()
    return bool(
        p[:, 0].min() < 1 or p[:, 1].min() < 1 or p[:, 0].max() > hw[1] - 1 or p[:, 1].max() > hw[0] - 1
    )


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def interior_point(mask: np.ndarray) -> np.ndarray:
    """The centre of the pixel deepest inside `mask` (where a person would click): (2,) float XY.

    Depth is the 4-connected erosion count; ties go to the pixel nearest the mask's centroid.
    """
    depth = np.zeros(mask.shape, np.int32)
    cur = mask.copy()
    while cur.any():
        depth += cur
        inner = cur.copy()
        inner[1:] &= cur[:-1]
        inner[:-1] &= cur[1:]
        inner[:, 1:] &= cur[:, :-1]
        inner[:, :-1] &= cur[:, 1:]
        inner[0, :] = inner[-1, :] = False
        inner[:, 0] = inner[:, -1] = False
        cur = inner
    ys, xs = np.nonzero(depth == depth.max())
    cy, cx = np.nonzero(mask)
    k = np.argmin((ys - cy.mean()) ** 2 + (xs - cx.mean()) ** 2)
    return np.array([xs[k] + 0.5, ys[k] + 0.5])


def box_of(mask: np.ndarray) -> np.ndarray:
    """Tight box of a mask in continuous pixels: (4,) float x1, y1, x2, y2."""
    return mask_box(mask).astype(np.float64)


iou = mask_iou  # the tests' name for sam2's mask IoU


def scene_prompts(seed: int) -> tuple[Scene, list[Prompt]]:
    """A test scene and, for each of its shapes larger than 50 pixels, one click (its interior
    point) and one box (its tight box), as predictor prompts."""
    scene = make_scene(seed)
    prompts = []
    for m in scene.masks:
        if m.sum() > 50:
            prompts.append(Prompt(np.asarray([interior_point(m)], np.float32), np.asarray([1])))
            prompts.append(
                Prompt(np.zeros((0, 2), np.float32), np.zeros(0, np.int64), box_of(m).astype(np.float32))
            )
    return scene, prompts


# --- moving shapes (tracking) ----------------------------------------------------------------


@dataclass
class Clip:
    """frames: (T, H, W, 3) uint8; masks: (T, N, H, W) bool visible masks; shapes at frame 0."""

    frames: np.ndarray
    masks: np.ndarray
    shapes: list[Shape]


def make_clip(
    seed: int, split: str = "test", n_frames: int = 24, hw: tuple[int, int] | None = None, n_shapes: int = 3
) -> Clip:
    """Shapes drifting and turning over a fixed background, bouncing off the borders.

    Speeds are 1-4 px a frame; shapes may pass over one another (masks stay the visible parts).
    """
    rng = _rng(seed, split)
    hw = hw or scene_size(rng)
    bg = background(rng, hw)
    placed = _Placed(hw)
    for _ in range(100):
        if len(placed.shapes) == n_shapes:
            break
        s = _random_shape(rng, hw)
        m = s.mask(hw)
        placed.add([(replace(s, color=_pick_color(rng, bg, m)), m)])
    shapes = placed.shapes
    speed = rng.uniform(1, 4, len(shapes))
    heading = rng.uniform(0, 2 * np.pi, len(shapes))
    vel = np.stack([speed * np.cos(heading), speed * np.sin(heading)], 1)
    spin = rng.uniform(-0.05, 0.05, len(shapes))
    noise = rng.uniform(2, 10)
    frames, masks, cur = [], [], list(shapes)
    for _ in range(n_frames):
        img, vis = render(bg, cur, rng, noise)
        frames.append(img)
        masks.append(vis)
        nxt = []
        for k, s in enumerate(cur):
            s = replace(s, cx=s.cx + vel[k, 0], cy=s.cy + vel[k, 1], angle=s.angle + spin[k])
            if _outside(s, hw):  # bounce
                vel[k] *= -1
                s = replace(s, cx=s.cx + 2 * vel[k, 0], cy=s.cy + 2 * vel[k, 1])
            nxt.append(s)
        cur = nxt
    return Clip(np.stack(frames), np.stack(masks), shapes)
