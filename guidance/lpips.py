"""LPIPS with AlexNet (Zhang et al., CVPR 2018), the minority score's distance in self-guided minority sampling
(docs/method.md, 'Self-guided minority sampling'), from local weights only (guidance/lpips_weights.py: the folder).

    d(x, y) = sum_l mean_hw( sum_c w_lc (u_l(x) - u_l(y))_c^2 ),   u_l = f_l / (|f_l|_c + 1e-10)

f_l is AlexNet's l-th ReLU output of the image mapped to [-1, 1] and then by LPIPS's fixed shift and scale,
|.|_c the norm over channels at each position, w_l the learned 1x1 head. The network is frozen; the distance is
differentiable in both images. No resizing: images must be at least ``MIN_SIDE`` pixels on each side.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import alexnet

from guidance.checks import check_finite_tensors
from guidance.lpips_weights import (BACKBONE_FILE, BACKBONE_SHAPES, CHANNELS, HEAD_SHAPES, HEADS_FILE,
                                    check_lpips_weights)

FEATURE_LAYERS = (1, 4, 7, 9, 11)  # the five ReLUs of torchvision's ``alexnet().features`` LPIPS compares
SHIFT, SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)  # LPIPS v0.1's input scaling, per RGB channel
NORM_EPS = 1e-10
MIN_SIDE = 31  # the smallest side AlexNet's first two pooling layers accept


class Lpips(nn.Module):
    """AlexNet LPIPS: ``(image, other)`` in [0, 1], (B, 3, H, W) each -> (B,) distances. Built random, frozen;
    ``load_lpips`` fills it."""

    def __init__(self):
        super().__init__()
        self.features = alexnet().features[: FEATURE_LAYERS[-1] + 1]
        self.heads = nn.ParameterList(nn.Parameter(torch.zeros(1, width, 1, 1)) for width in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, image: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if min(height, width) < MIN_SIDE:
            raise ValueError(f"sgms.distance lpips needs images of at least {MIN_SIDE} x {MIN_SIDE} pixels (AlexNet), "
                             f"this model makes {height} x {width}: use sgms.distance pixels")
        h = (2 * torch.cat([image, other]) - 1 - self.shift) / self.scale
        total = torch.zeros(len(image), dtype=h.dtype, device=h.device)
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in FEATURE_LAYERS:
                unit = h / (h.square().sum(1, keepdim=True).sqrt() + NORM_EPS)
                ours, theirs = unit.chunk(2)
                head = self.heads[FEATURE_LAYERS.index(index)]
                total = total + ((ours - theirs).square() * head).sum(1).mean((1, 2))
        return total


def load_lpips(folder: str | os.PathLike, device: str | torch.device = "cpu") -> Lpips:
    """AlexNet LPIPS from a local weights folder (guidance/lpips_weights.py ``LAYOUT``), checked first; nothing is
    downloaded and nothing falls back to random weights (every tensor is loaded strictly)."""
    check_lpips_weights(folder)
    path = Path(folder).expanduser()
    backbone = torch.load(path / BACKBONE_FILE, map_location="cpu", weights_only=True)
    heads = torch.load(path / HEADS_FILE, map_location="cpu", weights_only=True)
    model = Lpips()
    model.features.load_state_dict({name.removeprefix("features."): backbone[name] for name in BACKBONE_SHAPES})
    model.heads.load_state_dict({str(layer): heads[name] for layer, name in enumerate(HEAD_SHAPES)})
    check_finite_tensors(model.named_parameters(), f"LPIPS weights {path}")
    return model.to(device)


@functools.cache
def shared_lpips(folder: str, device: torch.device) -> Lpips:
    """``load_lpips`` once per process, folder and device: a sampler loads it with its models and every batch's
    method reuses it."""
    return load_lpips(folder, device)
