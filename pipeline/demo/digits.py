"""scikit-learn's bundled 8x8 digits as diffusion / encoder training data, the held-out split that no
demo model sees (the real reference of the demo's evidence), a digit classifier, and the augmentations
the demo encoder learns invariance to. Nothing is downloaded: the data ships inside scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

from pipeline.nuisance import blur, dilate, erode

DIGIT_LEVELS = 16.0  # load_digits pixels are integers 0..16
HELD_OUT = 400  # digits no demo model trains on: the real reference of the demo's evidence and prior check
SPLIT_SEED = 0
PARTS = ("all", "train", "held_out")


def split_indices(held_out: int = HELD_OUT, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of the 1797 digits: a class-stratified split, the same for every caller."""
    labels = load_digits().target
    train, test = train_test_split(np.arange(len(labels)), test_size=held_out, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(test)


def digits(size: int = 16, part: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """The digits of ``part`` (all 1797, the training split or the held-out split) as (N, 1, size, size)
    images in [0, 1] (bilinear upsampling) and their labels."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / DIGIT_LEVELS)[:, None]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.from_numpy(data.target.astype(np.int64))
    if part != "all":
        index = torch.from_numpy(split_indices()[0 if part == "train" else 1])
        images, labels = images[index], labels[index]
    return images, labels


def to_8x8(images: torch.Tensor) -> np.ndarray:
    """Map (N, C, H, W) images in [0, 1] back to the 8x8, 0..16 grey format of load_digits (flattened)."""
    grey = images.float().mean(dim=1, keepdim=True)
    small = F.interpolate(grey, size=(8, 8), mode="area")
    return (small.flatten(1) * DIGIT_LEVELS).numpy()


def augment(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """A random view: shift (+-12%), rotation (+-12 deg), scale (0.85..1.15), contrast (0.7..1) and
    noise (std 0.05); ``strength`` scales every range (0.5: half of each)."""
    batch = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, generator=generator)

    angle, scale = uniform(-12, 12) * strength * math.pi / 180, 1 + uniform(-0.15, 0.15) * strength
    shift_x, shift_y = uniform(-0.12, 0.12) * strength, uniform(-0.12, 0.12) * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = (1 - uniform(0, 0.3) * strength).view(-1, 1, 1, 1)
    noise = 0.05 * strength * torch.randn(views.shape, generator=generator)
    return (views * contrast + noise).clamp(0, 1)


def nuisance_view(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """The changes a world prior of digit *shapes* should ignore, drawn per image (pipeline/nuisance.py):
    stroke width (grey dilation or erosion, each with probability strength / 3), brightness (+-0.15),
    contrast (0.6..1.2), blur (a random mix with the 3x3 Gaussian blur) and a small elastic warp
    (a smooth displacement of up to about 4% of the image); ``strength`` scales every range."""
    batch = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(batch, generator=generator)).view(-1, 1, 1, 1)

    stroke = torch.rand(batch, generator=generator).view(-1, 1, 1, 1)
    views = torch.where(stroke < strength / 3, dilate(images),
                        torch.where(stroke < 2 * strength / 3, erode(images), images))
    mix = uniform(0, strength)
    views = (1 - mix) * views + mix * blur(views)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    views = mean + (1 + uniform(-0.4, 0.2) * strength) * (views - mean) + uniform(-0.15, 0.15) * strength
    coarse = 0.04 * strength * torch.randn((batch, 2, 4, 4), generator=generator)
    identity = torch.eye(2, 3).expand(batch, 2, 3)
    grid = F.affine_grid(identity, list(views.shape), align_corners=False)
    grid = grid + F.interpolate(coarse, size=views.shape[-2:], mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    return F.grid_sample(views, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


def held_out_images(size: int = 16) -> tuple[list[Image.Image], np.ndarray]:
    """The held-out digits as grey PNG-like images (uint8) and their labels: the demo's real reference."""
    images, labels = digits(size, "held_out")
    grey = (images[:, 0] * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(g, mode="L") for g in grey], labels.numpy()


def fit_digit_svm(features: np.ndarray, labels: np.ndarray) -> SVC:
    """The demo's digit classifier recipe: an RBF SVM on flat 8x8 grey digits in [0, 1] (``to_8x8``)."""
    return SVC(gamma=0.001).fit(features, labels)


def digit_classifier():
    """An SVM fitted on the training split's 8x8 digits; returns images -> predicted digits (images
    mapped back to 8x8 as ``to_8x8`` does). About 99% right on the held-out real digits."""
    images, labels = digits(8, "train")
    svm = fit_digit_svm(to_8x8(images), labels.numpy())

    def classify(batch: list[Image.Image]) -> np.ndarray:
        pixels = np.stack([np.asarray(image.convert("L"), np.float32) / 255 for image in batch])
        return svm.predict(to_8x8(torch.from_numpy(pixels)[:, None]))

    return classify
