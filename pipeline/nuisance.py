"""Small nuisance changes of an image: what a world prior's score should ignore, and the prior check
measures whether it does (docs/method.md, 'Nuisance sensitivity').

Pure torch on (B, C, H, W) images in [0, 1], at the image's own resolution (before the encoder's
resize), each result clipped to [0, 1]. The magnitudes are fixed and small; ``CHANGES`` states them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

BRIGHTNESS = 0.1  # added to every pixel
CONTRAST = 0.8  # each image's deviations from its own mean are scaled by this
BLUR_SIGMA = 0.5  # Gaussian blur, in pixels, on a 3 x 3 window
NOISE_STD = 0.03  # additive Gaussian noise, from the image's own generator
WINDOW = 3  # grey dilation / erosion: the max / min over a WINDOW x WINDOW neighbourhood


def brightness(images: torch.Tensor) -> torch.Tensor:
    return images + BRIGHTNESS


def contrast(images: torch.Tensor) -> torch.Tensor:
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return mean + CONTRAST * (images - mean)


def blur(images: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, edges replicated (a constant image stays constant)."""
    taps = torch.tensor([math.exp(-(d * d) / (2 * BLUR_SIGMA**2)) for d in (-1, 0, 1)], dtype=images.dtype,
                        device=images.device)
    taps = taps / taps.sum()
    channels = images.shape[1]
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    rows = F.conv2d(padded, taps.view(1, 1, 1, 3).expand(channels, 1, 1, 3), groups=channels)
    return F.conv2d(rows, taps.view(1, 1, 3, 1).expand(channels, 1, 3, 1), groups=channels)


def noise(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (CPU), so it is the same on any device."""
    draw = torch.randn(images.shape, generator=generator, dtype=torch.float32, device=generator.device)
    return images + NOISE_STD * draw.to(images)


def dilate(images: torch.Tensor) -> torch.Tensor:
    """Grey dilation: bright strokes on a dark ground grow thicker."""
    return F.max_pool2d(images, WINDOW, stride=1, padding=WINDOW // 2)


def erode(images: torch.Tensor) -> torch.Tensor:
    """Grey erosion: bright strokes on a dark ground grow thinner."""
    return -F.max_pool2d(-images, WINDOW, stride=1, padding=WINDOW // 2)


TRANSFORMS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "brightness": lambda images, generator: brightness(images),
    "contrast": lambda images, generator: contrast(images),
    "blur": lambda images, generator: blur(images),
    "noise": noise,
    "dilation": lambda images, generator: dilate(images),
    "erosion": lambda images, generator: erode(images),
}
CHANGES = {  # each nuisance's change, as the output states it
    "brightness": f"+{BRIGHTNESS} on every pixel",
    "contrast": f"deviations from the mean x{CONTRAST}",
    "blur": f"Gaussian, sigma {BLUR_SIGMA} px",
    "noise": f"Gaussian, std {NOISE_STD}, seeded per image",
    "dilation": f"max over {WINDOW}x{WINDOW}: bright strokes thicker",
    "erosion": f"min over {WINDOW}x{WINDOW}: bright strokes thinner",
}


def perturb(name: str, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``images`` under the named nuisance, clipped to [0, 1]; ``generator`` feeds the noise only."""
    return TRANSFORMS[name](images, generator).clamp(0, 1)
