"""Pixel spaces by name, where rarity can be measured without any model: ``pixels-N`` (RGB) or ``pixels-N-grey``,
images resized to N x N with values in [0, 1] (numpy and Pillow only). The evaluation measures in them
(pipeline/evaluate/features.py) and the filter's fidelity gate does (pipeline/curate/gate.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

PIXEL_SIZES = range(2, 257)  # pixels-N: N x N, small enough for k-NN on raw values


@dataclass(frozen=True)
class PixelSpace:
    name: str
    size: int
    mode: str  # "RGB" or "L" (greyscale)

    @classmethod
    def parse(cls, name: str) -> PixelSpace | None:
        """The space a ``pixels-N[-grey]`` name means, None for any other name."""
        parts = name.split("-")
        if (parts[0] == "pixels" and len(parts) in (2, 3) and parts[1].isdigit() and int(parts[1]) in PIXEL_SIZES
                and parts[2:] in ([], ["grey"])):
            return cls(name, int(parts[1]), "L" if parts[2:] else "RGB")
        return None

    def vector(self, image: Image.Image) -> np.ndarray:
        """An image as this space's flat vector in [0, 1] (Pillow's bilinear filter, antialiased when shrinking)."""
        small = image.convert(self.mode).resize((self.size, self.size), Image.Resampling.BILINEAR)
        return np.asarray(small, dtype=np.float32).reshape(-1) / 255
