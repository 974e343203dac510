"""GPU memory figures for monitoring (the backend exports them on /metrics; it never imports torch)."""

from __future__ import annotations

import torch


def memory_gauges(device: torch.device | str) -> list[tuple[str, str, float]]:
    """[(metric name, help, bytes)] for a CUDA device; [] for CPU and MPS.

    allocated: tensors alive now (model weights, cached embeddings, a request's activations);
    reserved: what PyTorch's caching allocator holds from the driver (what nvidia-smi shows, less
    the CUDA context); peak: the most allocated since the process started; total: the card.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return []
    index = device.index if device.index is not None else torch.cuda.current_device()
    return [
        (
            "sam2_gpu_memory_allocated_bytes",
            "GPU memory held by live tensors",
            torch.cuda.memory_allocated(index),
        ),
        (
            "sam2_gpu_memory_reserved_bytes",
            "GPU memory reserved by the caching allocator",
            torch.cuda.memory_reserved(index),
        ),
        (
            "sam2_gpu_memory_peak_bytes",
            "Peak GPU memory held by tensors",
            torch.cuda.max_memory_allocated(index),
        ),
        (
            "sam2_gpu_memory_total_bytes",
            "GPU memory of the device",
            torch.cuda.get_device_properties(index).total_memory,
        ),
    ]
