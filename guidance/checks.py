"""Input checks shared by the JEPA-SCORE functions and the weight loaders: bad input fails here, with a
message that teaches. Light to import: torch loads only when images are checked."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PIXEL_SLACK = 0.05  # images a little outside [0, 1] (resampling overshoot) pass; 0..255 or [-1, 1] do not


def check_images(images: torch.Tensor) -> None:
    """Images must be a non-empty, finite (B, 3, H, W) tensor with values in [0, 1]."""
    import torch

    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W) (RGB, batch first), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch: pass at least one image")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}; divide uint8 images by 255")
    values = images.detach()
    if not torch.isfinite(values).all():
        bad = (~torch.isfinite(values)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"images hold NaN or infinite pixels (batch indices {bad})")
    low, high = values.min().item(), values.max().item()
    if low < -PIXEL_SLACK or high > 1 + PIXEL_SLACK:
        raise ValueError(
            f"images must be in [0, 1], got values in [{low:.3g}, {high:.3g}]; "
            "divide [0, 255] images by 255, map [-1, 1] images with (x + 1) / 2"
        )


def check_sketch(k: int, oversample: int, power_iters: int) -> None:
    """The randomized-SVD settings: k >= 1, oversample >= 0, power_iters >= 0, all integers."""
    for label, value, least in (("k", k, 1), ("oversample", oversample, 0), ("power_iters", power_iters, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{label} must be an integer >= {least}, got {value!r}")


def check_rank(k: int, oversample: int, embed_dim: int, num_pixels: int) -> None:
    """The sketch width r = k + oversample cannot exceed the rank bound min(D, N) of the Jacobian."""
    limit = min(embed_dim, num_pixels)
    if k + oversample > limit:
        raise ValueError(
            f"k + oversample = {k} + {oversample} exceeds min(D, N) = min({embed_dim}, {num_pixels}) = {limit}, "
            "the most singular values the encoder Jacobian has; lower k or oversample"
        )


def check_weights_readable(path: Path, what: str) -> None:
    """A weights file exists and can be read; a ``.safetensors`` file's header parses and its data is whole.

    Cheap (the header only, never the tensors), so a job can run it before anything loads; the loaders
    run it too, so the check and the load agree on what is readable.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with path.open("rb") as stream:
            head = stream.read(8)
            if path.suffix != ".safetensors":
                if not head:
                    raise ValueError("the file is empty")
                return
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            length = int.from_bytes(head, "little")
            size = path.stat().st_size
            if length > size - 8:
                raise ValueError(f"its header claims {length} bytes of a {size}-byte file")
            header = json.loads(stream.read(length))
            described = 8 + length + max((int(entry["data_offsets"][1]) for key, entry in header.items()
                                          if key != "__metadata__"), default=0)
    except OSError as error:
        raise ValueError(f"could not read {what} {path}: {error.strerror or error}") from error
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise ValueError(f"could not read {what} {path} (truncated, corrupted or not safetensors?): {error}") from error
    if described != size:
        raise ValueError(f"could not read {what} {path}: truncated or corrupted (its header describes "
                         f"{described} bytes, the file holds {size})")


def check_finite_tensors(tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Every floating-point tensor of a loaded model is finite (torch files are checked here, once loaded)."""
    _refuse_nonfinite([name for name, tensor in tensors if tensor.is_floating_point() and not tensor.isfinite().all()],
                      what)


NONFINITE_EXPONENT = {"F64": (np.uint64, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000),
                      "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80)}  # IEEE: all exponent bits set


def check_finite_safetensors(path: Path, what: str) -> None:
    """Every floating-point tensor of a ``.safetensors`` file is finite, read from its raw bytes memory-mapped
    (no torch, never the whole file in memory): NaN and inf are the values whose exponent bits are all set."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    if Path(path).stat().st_size == 8 + length:
        return  # no tensor data at all
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length)
    bad = []
    for name, entry in header.items():
        if name == "__metadata__" or entry.get("dtype") not in NONFINITE_EXPONENT:
            continue
        kind, mask = NONFINITE_EXPONENT[entry["dtype"]]
        start, end = entry["data_offsets"]
        if ((data[start:end].view(kind) & kind(mask)) == kind(mask)).any():
            bad.append(name)
    _refuse_nonfinite(bad, what)


def _refuse_nonfinite(bad: list[str], what: str) -> None:
    """A checkpoint holding NaN or inf (saved after training diverged) would make every embedding, and so every
    score, NaN: refused, naming the first tensors."""
    if bad:
        raise ValueError(f"{what} hold NaN or infinite values in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): the checkpoint is broken; use another one")
