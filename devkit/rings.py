"""A domain the shapes fixture was never trained on: rings (annuli) whose hole shows the background.

The fixture (`devkit/sam2-shapes`) learned filled shapes, so a click on a ring gives the
filled disc: the hole is wrongly included. Fine-tuning its decoder on ring masks should teach it
to leave the hole out. Used by the fine-tuning tests and `bench/finetune.py`.

Every ring scene is a pure function of `(seed, split)` (the splits of `tests/scenes.py`), 128 x 128
by default: one ring on a textured background (`scenes.background`), the hole showing that
background; some scenes add a filled distractor shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devkit.scenes import _pick_color, _rng, background


@dataclass
class RingScene:
    """image: (H, W, 3) uint8 RGB; mask: (H, W) bool, the ring without its hole."""

    image: np.ndarray
    mask: np.ndarray

    @property
    def hw(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]


def make_ring(seed: int, split: str = "test", hw: tuple[int, int] = (128, 128)) -> RingScene:
    rng = _rng(seed + 1_000_000, split)  # apart from the shapes scenes of the same seed
    h, w = hw
    bg = background(rng, hw)
    outer = rng.uniform(0.26, 0.36) * min(h, w)
    inner = outer * rng.uniform(0.5, 0.65)
    aspect = rng.uniform(0.75, 1.0)
    angle = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(outer + 2, w - outer - 2), rng.uniform(outer + 2, h - outer - 2)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / aspect
    r = np.hypot(u, v)
    mask = (r <= outer) & (r >= inner)
    img = bg.copy()
    img[mask] = np.asarray(_pick_color(rng, bg, mask), np.float32)
    img += rng.uniform(2, 10) * rng.standard_normal(img.shape, dtype=np.float32)
    return RingScene(np.clip(img, 0, 255).round().astype(np.uint8), mask)


def ring_examples(predictor, seeds, split: str) -> list:
    """`label_studio_sam2.engine.finetune.Example`s of ring scenes, embedded by `predictor` (an ImagePredictor)."""
    from label_studio_sam2.engine.finetune import Example

    out = []
    for s in seeds:
        r = make_ring(s, split)
        emb = predictor.embedding(f"ring-{split}-{s}", r.image)
        out.append(Example([f.cpu() for f in emb.features], r.mask, f"{split}-{s}"))
    return out
