"""What the online service accepts: request limits, image uploads and generate requests, checked.

Every refusal is a ``RequestError`` carrying the HTTP status it deserves (400 malformed, 413 too
large, 422 well-formed but not allowed) and a message naming the fix; nothing here can answer 500.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from guidance import WorkItem
from guidance.methods import SamplingConfig
from pipeline.configs import parse
from pipeline.serve.config import ServeLimits
from pipeline.settings import ConfigError, to_dict

GENERATE_KEYS = ("class_label", "prompt", "n", "seed", "sampling")


class RequestError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(body: bytes, limits: ServeLimits) -> torch.Tensor:
    """A PNG / JPEG upload -> float32 RGB (3, H, W) in [0, 1]; the pixel count is checked before decoding."""
    if not body:
        raise RequestError(400, "empty body: send the image file's bytes (PNG or JPEG) as the request body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body)) as image:
                if image.format not in ("PNG", "JPEG"):
                    raise RequestError(415, f"a {image.format} image: send a PNG or JPEG file")
                width, height = image.size
                if width * height > limits.max_pixels:
                    raise RequestError(413, f"image is {width}x{height} = {width * height} pixels; "
                                            f"this service takes at most {limits.max_pixels}")
                rgb = np.asarray(image.convert("RGB"))
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RequestError(413, f"image refused as a decompression bomb: {error}") from error
    except UnidentifiedImageError as error:
        raise RequestError(400, "cannot decode the body as a PNG or JPEG image: its format is not recognised") from error
    except Exception as error:  # PIL raises many types for undecodable or truncated bytes
        raise RequestError(400, f"cannot decode the body as a PNG or JPEG image: {error}") from error
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255


@dataclass(frozen=True)
class GenerateRequest:
    items: tuple[WorkItem, ...]  # seeds seed, seed + 1, ..., one per image
    sampling: SamplingConfig


def parse_generate(payload: Any, base: SamplingConfig, limits: ServeLimits) -> GenerateRequest:
    """A JSON generate request -> work items and the sampling config (the service's, with overrides)."""
    if not isinstance(payload, dict):
        raise RequestError(400, 'the body must be a JSON object such as {"class_label": 3, "n": 2, "seed": 0}')
    unknown = sorted(set(payload) - set(GENERATE_KEYS))
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r}; valid fields: {', '.join(GENERATE_KEYS)}")
    n = _integer(payload, "n", 1, 1, limits.max_n)
    seed = _integer(payload, "seed", 0, 0, 2**63 - n)  # seeds seed .. seed + n - 1 are torch seeds
    label = payload.get("class_label")
    if label is not None:
        label = _integer(payload, "class_label", None, 0, 2**62, "a class of the model, an integer >= 0")
    prompt = payload.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(422, "prompt must be a non-empty string")
        if len(prompt) > limits.max_prompt_chars:
            raise RequestError(422, f"prompt has {len(prompt)} characters; at most {limits.max_prompt_chars}")
    overrides = payload.get("sampling", {})
    if not isinstance(overrides, dict):
        raise RequestError(422, 'sampling must be an object of sampling settings, e.g. {"method": "jepa", '
                                '"guidance": {"eta": 0.05}}')
    try:
        sampling = parse(SamplingConfig, _merge(to_dict(base), overrides), "sampling")
    except ConfigError as error:
        raise RequestError(422, str(error)) from error
    if sampling.steps > limits.max_steps:
        raise RequestError(422, f"sampling.steps is {sampling.steps}; this service runs at most {limits.max_steps}")
    items = tuple(WorkItem(seed + i, label, prompt) for i in range(n))
    return GenerateRequest(items, sampling)


def _integer(payload: dict, key: str, default: int | None, least: int, most: int, expected: str | None = None) -> int:
    """The integer ``key`` in [least, most]; ``expected`` says what is wanted where the bound means nothing to people."""
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        raise RequestError(422, f"{key} must be {expected or f'an integer in [{least}, {most}]'}, got {value!r}")
    return value


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged
