"""Inference: the pixel-level anomaly map of Eq. (17) and the image score."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def anomaly_map(encoded: list[torch.Tensor], decoded: list[torch.Tensor], grid: tuple[int, int],
                output_size: tuple[int, int]) -> torch.Tensor:
    r"""Eq. (17): S = sum_i sigma_i(1 - d(f_i*, \hat f_i*)), d the per-patch cosine similarity and
    sigma_i bilinear up-sampling to the input resolution.

    Args:
        encoded, decoded: f_i*, \hat f_i* patch tokens (B, h*w, C) per tapped layer.
    Returns: (B, H, W) float32.
    """
    h, w = grid
    total = None
    # float32 under any autocast too: in bf16 (~3 digits) neighbouring scores would tie and blunt the pixel metrics.
    with torch.autocast(device_type=encoded[0].device.type, enabled=False):
        for f, f_hat in zip(encoded, decoded):
            distance = 1.0 - F.cosine_similarity(f.float(), f_hat.float(), dim=-1)  # (B, h*w)
            distance = distance.reshape(-1, 1, h, w)
            total = distance if total is None else total + distance
        # Upsampling is linear, so summing first and upsampling once equals the paper's sum of
        # upsampled maps at a third of the cost.
        return F.interpolate(total, size=tuple(output_size), mode="bilinear", align_corners=False)[:, 0]


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps (kernel truncated at 4 sigma, reflect padding)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(4 * sigma)))
    radius = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    if radius < 1:
        return maps
    x = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    out = maps.unsqueeze(1)
    with torch.autocast(device_type=maps.device.type, enabled=False):  # keep the maps' dtype (autocast: bf16 conv)
        out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
        out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out[:, 0]


def image_score(maps: torch.Tensor, reduction: str = "max") -> torch.Tensor:
    """The image-level anomaly score from (B, H, W) maps: the maximum (paper), or the mean of the top 1%."""
    flat = maps.flatten(1)
    if reduction == "max":
        return flat.amax(dim=1)
    if reduction == "mean_top1pct":
        k = max(1, flat.shape[1] // 100)
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"unknown image_score_reduction {reduction!r}")
