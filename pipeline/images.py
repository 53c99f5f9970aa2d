"""Image files in, tensors out: finding PNG / JPEG files and decoding them to [0, 1] RGB tensors; PNG bytes out.
Finding files stays light (torch loads only to decode), so the filter's driver and read tasks can use it."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.settings import UserError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (searched recursively) into a sorted list of image files."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise UserError(f"folder {path} holds no {'/'.join(IMAGE_SUFFIXES)} files")
            found.extend(inside)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"{path} is not an image file; expected one of {', '.join(IMAGE_SUFFIXES)}")
            found.append(path)
        else:
            raise UserError(f"no such image file or folder: {path}")
    if not found:
        raise UserError("no images given: pass image files or folders")
    return found


def read_image(path: str | Path, max_pixels: int | None = None) -> torch.Tensor:
    """Decode one image file to a float32 RGB tensor (3, H, W) in [0, 1]; larger than ``max_pixels`` is refused
    from the header, before decoding."""
    import torch

    try:
        with Image.open(path) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise UserError(f"image {path} is {width} x {height} pixels, over the limit of {max_pixels}")
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise UserError(f"cannot decode image {path}: {error}") from error
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255


def png_bytes(pixels: np.ndarray) -> bytes:
    """A uint8 (H, W, 3) image encoded as PNG (lossless: what is stored is what was scored)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
