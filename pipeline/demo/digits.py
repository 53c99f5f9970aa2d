"""scikit-learn's bundled 8x8 digits as diffusion / encoder training data, and the augmentations
the demo encoder learns invariance to. Nothing is downloaded: the data ships inside scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

DIGIT_LEVELS = 16.0  # load_digits pixels are integers 0..16


def digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, size, size) images in [0, 1] (bilinear upsampling) and their labels."""
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / DIGIT_LEVELS)[:, None]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return images, torch.from_numpy(data.target.astype(np.int64))


def to_8x8(images: torch.Tensor) -> np.ndarray:
    """Map (N, C, H, W) images in [0, 1] back to the 8x8, 0..16 grey format of load_digits (flattened)."""
    grey = images.float().mean(dim=1, keepdim=True)
    small = F.interpolate(grey, size=(8, 8), mode="area")
    return (small.flatten(1) * DIGIT_LEVELS).numpy()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random view: shift (+-12%), rotation (+-12 deg), scale (0.85..1.15), contrast, noise."""
    batch = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, generator=generator)

    angle, scale = uniform(-12, 12) * math.pi / 180, uniform(0.85, 1.15)
    shift_x, shift_y = uniform(-0.12, 0.12), uniform(-0.12, 0.12)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = uniform(0.7, 1.0).view(-1, 1, 1, 1)
    noise = 0.05 * torch.randn(views.shape, generator=generator)
    return (views * contrast + noise).clamp(0, 1)
