"""Image and coordinate transforms between original pixels and the model's square input.

SAM2 resizes every image (and video frame) to `image_size x image_size` without keeping the
aspect ratio, scales to [0, 1] and normalises with ImageNet mean/std. `transformers`' processors
do this with torchvision; these few lines of torch do it without.

Coordinate conventions (decided here, used everywhere):
- Original-image coordinates are *continuous* pixels: x in [0, W], y in [0, H]; (0, 0) is the
  top-left corner of the top-left pixel. Label Studio percentages map to them as pct/100 * W.
- The prompt encoder adds 0.5 to its inputs (pixel-centre convention of integer indices), so a
  continuous coordinate c maps to c * S / W - 0.5 in the model's input space.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(image: np.ndarray, image_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """RGB uint8 image -> normalised model input.

    Arguments:
        image: (H, W, 3) uint8 RGB.
        image_size: the model's square input side (`config.prompt_encoder_config.image_size`).
    Returns:
        (1, 3, image_size, image_size) float32 tensor on `device`.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    x = x.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_model_coords(xy: np.ndarray, original_hw: tuple[int, int], image_size: int) -> np.ndarray:
    """Continuous original-pixel XY -> the prompt encoder's input space.

    Arguments:
        xy: (..., 2) float, continuous pixels XY of the original image.
        original_hw: (H, W) of the original image.
    Returns:
        (..., 2) float32 in model input pixels (before the encoder's +0.5 shift).
    """
    h, w = original_hw
    scale = np.array([image_size / w, image_size / h], dtype=np.float64)
    return (np.asarray(xy, dtype=np.float64) * scale - 0.5).astype(np.float32)


def upscale_logits(low_res: torch.Tensor, original_hw: tuple[int, int]) -> torch.Tensor:
    """Low-res mask logits (N, h, w) -> (N, H, W) logits at the original size (bilinear).
    Threshold at 0 for the binary mask."""
    return F.interpolate(
        low_res[:, None].float(), size=tuple(original_hw), mode="bilinear", align_corners=False
    )[:, 0]


def mask_box(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool array -> (4,) float32 x1, y1, x2, y2 in pixel-edge units (`mask_boxes` of one
    mask); (0, 0, 0, 0) when empty."""
    return mask_boxes(torch.as_tensor(np.asarray(mask, bool))[None])[0].numpy()


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, h, w) bool -> (N, 4) float x1, y1, x2, y2 in pixel-edge units (x2 = last column + 1).
    An empty mask gives (0, 0, 0, 0)."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4))
    cols = masks.any(dim=1)  # (N, w)
    rows = masks.any(dim=2)  # (N, h)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x1 = torch.where(cols, xs, w).min(dim=1).values
    x2 = torch.where(cols, xs + 1, 0).max(dim=1).values
    y1 = torch.where(rows, ys, h).min(dim=1).values
    y2 = torch.where(rows, ys + 1, 0).max(dim=1).values
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    boxes[~cols.any(dim=1)] = 0
    return boxes
