"""Brush RLE: our vectorised encoder against the Label Studio SDK's on a 12 MP object mask.

.venv/bin/python -m bench.rle    # prints a table, writes bench/results/rle.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle

from label_studio_sam2.labelstudio.rle import encode_mask

RESULTS = Path(__file__).parent / "results" / "rle.json"


def object_mask(height: int, width: int) -> np.ndarray:
    """A mask like a segmented object: smooth blobs, an ellipse with a hole, a thin bar.

    Returns:
      (height, width) bool.
    """
    y, x = np.ogrid[:height, :width]
    y = (y / height).astype(np.float32)
    x = (x / width).astype(np.float32)
    # A blob whose radius wobbles with the angle (low frequencies: a smooth outline).
    dy, dx = y - 0.45, x - 0.4
    angle = np.arctan2(dy, dx)
    radius = 0.22 * (1 + 0.12 * np.sin(3 * angle) + 0.06 * np.cos(5 * angle + 1.0))
    mask = dy**2 + dx**2 <= radius**2
    # An ellipse beside it, with an elliptic hole.
    mask |= ((y - 0.7) / 0.18) ** 2 + ((x - 0.75) / 0.12) ** 2 <= 1
    mask &= ((y - 0.72) / 0.05) ** 2 + ((x - 0.76) / 0.03) ** 2 > 1
    # A slanted bar (a convex polygon: the intersection of four half-planes).
    u, v = x + 0.3 * y, y - 0.2 * x
    mask |= (u > 0.25) & (u < 0.85) & (v > 0.08) & (v < 0.11)
    return mask


def _best_of(n: int, fn):
    best, out = float("inf"), None
    for _ in range(n):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def noise_mask(height: int, width: int) -> np.ndarray:
    """The encoder's worst case: (height, width) bool, each pixel on with probability 1/2."""
    return np.random.default_rng(0).random((height, width)) < 0.5


MASKS = {"object": object_mask, "noise": noise_mask}


def run(height: int = 4000, width: int = 3000, kind: str = "object") -> dict:
    """Time `encode_mask` (best of 3) against the SDK (once) on the same mask.

    The SDK is timed twice: `encode_rle` on the RGBA bytes (`sdk_s`), and `mask2rle` on the
    uint8 mask (`sdk_mask2rle_s`), which also pays for expanding the mask to RGBA, as a backend
    holding a mask would.

    Arguments:
      height, width: mask size in pixels.
      kind: "object" (smooth blobs, like a SAM mask) or "noise" (random pixels, worst case).

    Returns:
      {"kind", "height", "width", "ours_s", "sdk_s", "sdk_mask2rle_s", "speedup",
       "speedup_vs_mask2rle", "identical" (both decode to the mask's RGBA bytes),
       "same_rle" (the two RLE lists are equal), "rle_len_ours", "rle_len_sdk"}.
    """
    mask = MASKS[kind](height, width)
    rgba = np.repeat(np.where(mask.ravel(), 255, 0).astype(np.uint8), 4)

    ours_s, ours = _best_of(3, lambda: encode_mask(mask))
    sdk_s, sdk = _best_of(1, lambda: encode_rle(rgba))
    mask_u8 = mask.astype(np.uint8) * 255
    sdk_mask2rle_s, _ = _best_of(1, lambda: mask2rle(mask_u8))
    identical = bool(np.array_equal(decode_rle(ours), rgba) and np.array_equal(decode_rle(sdk), rgba))
    return {
        "kind": kind,
        "height": height,
        "width": width,
        "ours_s": ours_s,
        "sdk_s": sdk_s,
        "sdk_mask2rle_s": sdk_mask2rle_s,
        "speedup": sdk_s / ours_s,
        "speedup_vs_mask2rle": sdk_mask2rle_s / ours_s,
        "identical": identical,
        "same_rle": ours == sdk,
        "rle_len_ours": len(ours),
        "rle_len_sdk": len(sdk),
    }


def main() -> None:
    # The SDK needs about 2 s a megapixel on noise: keep that case at 1 MP.
    results = [run(), run(1000, 1000, kind="noise")]
    print(
        f"{'mask':<18}{'ours s':>9}{'sdk s':>9}{'mask2rle s':>12}{'speedup':>9}{'rle bytes':>11}  identical"
    )
    for r in results:
        print(
            f"{r['kind'] + ' ' + str(r['height']) + 'x' + str(r['width']):<18}"
            f"{r['ours_s']:>9.4f}{r['sdk_s']:>9.3f}{r['sdk_mask2rle_s']:>12.3f}{r['speedup']:>8.0f}x"
            f"{r['rle_len_ours']:>11}  {r['identical'] and r['same_rle']}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
