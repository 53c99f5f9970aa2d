"""JEPA encoders: DINOv2 ViTs through timm, as image -> embedding maps with preprocessing included.

The world prior of the paper is a JEPA encoder f. Here f maps images in [0, 1], shape (B, 3, H, W),
to the CLS token after the final LayerNorm, shape (B, D), not normalised (METHOD.md section 1).
Resizing (bilinear) and the mean / std normalisation are part of f, so Jacobians are taken with
respect to the [0, 1] image a sampler produces.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from guidance.checks import check_weights_readable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderSpec:
    """One row of the encoder table: what a name means."""

    embed_dim: int  # D, the length of the CLS embedding
    hub_tag: str  # timm's pretrained tag for the official DINOv2 weights


ENCODERS: dict[str, EncoderSpec] = {
    "vit_small_patch14_dinov2": EncoderSpec(384, "lvd142m"),
    "vit_small_patch14_reg4_dinov2": EncoderSpec(384, "lvd142m"),
    "vit_base_patch14_dinov2": EncoderSpec(768, "lvd142m"),
    "vit_base_patch14_reg4_dinov2": EncoderSpec(768, "lvd142m"),
    "vit_large_patch14_dinov2": EncoderSpec(1024, "lvd142m"),
    "vit_large_patch14_reg4_dinov2": EncoderSpec(1024, "lvd142m"),
    "vit_giant_patch14_dinov2": EncoderSpec(1536, "lvd142m"),
    "vit_giant_patch14_reg4_dinov2": EncoderSpec(1536, "lvd142m"),
}
DEFAULT_INPUT_SIZE = 224  # METHOD.md: images are resized to 224 x 224 before the encoder
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class JepaEncoder(nn.Module):
    """f: images in [0, 1] (B, 3, H, W) -> CLS embedding after the final norm (B, D).

    Computes in the module's own dtype (fp32 as loaded) whatever the input dtype, so the encoder
    branch stays fp32 while a sampler runs in bf16 / fp16; ``.double()`` gives a float64 reference.
    """

    def __init__(
        self,
        backbone: nn.Module,
        name: str,
        input_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        antialias: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.input_size = input_size
        self.antialias = antialias
        self.embed_dim: int = backbone.num_features
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Bilinear resize to the encoder's input size (a no-op when already there)."""
        size = (self.input_size, self.input_size)
        if tuple(images.shape[-2:]) == size:
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=self.antialias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.resize(images.to(self.mean.dtype))
        return self.backbone((x - self.mean) / self.std)


def load_encoder(
    name: str,
    weights: str | os.PathLike = "hub",
    *,
    input_size: int = DEFAULT_INPUT_SIZE,
    antialias: bool = False,
    model_args: Mapping[str, Any] | None = None,
) -> JepaEncoder:
    """Build a frozen, fp32, eval-mode JEPA encoder.

    weights:
      - a local ``.safetensors`` / ``.pth`` file (torch files are loaded weights-only);
      - a local folder in timm's layout (``config.json`` + ``model.safetensors``);
      - ``"hub"`` or ``"hub:TAG"`` to fetch timm's pretrained weights (needs the internet);
      - ``"random"`` for an untrained encoder, only when asked for explicitly.
    model_args: architecture overrides passed to timm (e.g. a smaller ``depth``), for checkpoints
      of a non-standard size; a folder's ``config.json`` supplies its own.
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; valid names: {', '.join(sorted(ENCODERS))}")
    if input_size % 14 != 0 or input_size <= 0:
        raise ValueError(f"input_size must be a positive multiple of the patch size 14, got {input_size}")
    kwargs = dict(model_args or {}) | dict(img_size=input_size, num_classes=0, global_pool="token")
    backbone = _create_backbone(name, str(weights), kwargs)
    _use_math_attention(backbone)
    backbone.float().eval().requires_grad_(False)
    cfg = backbone.pretrained_cfg
    encoder = JepaEncoder(backbone, name, input_size, tuple(cfg["mean"]), tuple(cfg["std"]), antialias)
    return encoder.eval().requires_grad_(False)


FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what timm's local-dir loader reads, in its order


def check_encoder_weights(name: str, weights: str | os.PathLike) -> None:
    """What ``load_encoder`` will read exists and is readable, without building the model: a file's
    suffix and header, a folder's config.json (its architecture) and weights file. Hub and random weights
    have nothing local to check."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; valid names: {', '.join(sorted(ENCODERS))}")
    weights = str(weights)
    if weights == "random" or weights == "hub" or weights.startswith("hub:"):
        return
    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"encoder weights not found: {path}. Pass a .safetensors / .pth file, a timm model folder "
            "(config.json + model.safetensors), 'hub' to download, or 'random' for an untrained encoder."
        )
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"encoder folder {path} has no config.json "
                                    "(timm's layout: config.json + model.safetensors)")
        try:
            architecture = json.loads(config.read_text()).get("architecture")
        except (OSError, ValueError, AttributeError) as error:
            raise ValueError(f"encoder folder {path}: config.json is not a readable JSON object: {error}") from error
        if architecture != name:
            raise ValueError(f"encoder folder {path} holds a {architecture!r}, not the requested {name!r}")
        found = [path / file for file in FOLDER_WEIGHTS if (path / file).is_file()]
        if not found:
            raise FileNotFoundError(f"encoder folder {path} has no weights file ({' or '.join(FOLDER_WEIGHTS)})")
        check_weights_readable(found[0], "encoder weights")
        return
    if path.suffix not in WEIGHT_FILE_SUFFIXES:
        raise ValueError(f"encoder weights {path} must end in one of {', '.join(WEIGHT_FILE_SUFFIXES)}")
    check_weights_readable(path, "encoder weights")


def _create_backbone(name: str, weights: str, kwargs: dict[str, Any]) -> nn.Module:
    check_encoder_weights(name, weights)
    if weights == "random":
        log.warning("encoder %s has RANDOM weights (asked for explicitly): scores mean nothing", name)
        return timm.create_model(name, pretrained=False, **kwargs)
    if weights == "hub" or weights.startswith("hub:"):
        tag = weights.partition(":")[2] or ENCODERS[name].hub_tag
        try:
            return timm.create_model(f"{name}.{tag}", pretrained=True, **kwargs)
        except Exception as error:  # offline, unknown tag, or hub failure: all mean "no weights"
            raise RuntimeError(
                f"could not fetch weights for {name}.{tag} from the hub ({error}). Without the internet, "
                "download them elsewhere and pass weights=<file or folder>."
            ) from error
    path = Path(weights).expanduser()
    if path.is_dir():
        return _load_checked(path, lambda: timm.create_model(f"local-dir:{path}", pretrained=True, **kwargs))
    return _load_checked(path, lambda: timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs))


def _load_checked(source: Path, create) -> nn.Module:
    """Run timm's loader; turn its low-level failures into errors that say what to do."""
    try:
        return create()
    except RuntimeError as error:
        text = str(error)
        if "weights_only" in text:
            raise ValueError(
                f"{source} is a pickle checkpoint that is not weights-only; refusing to unpickle it. "
                "Save the state dict alone (torch.save(model.state_dict(), ...)) or as safetensors."
            ) from error
        if "state_dict" in text:
            raise ValueError(f"weights in {source} do not fit the encoder architecture: {text}") from error
        raise ValueError(f"could not read encoder weights {source}: {text}") from error
    except Exception as error:  # truncated / corrupted files surface as assorted decoder errors
        raise ValueError(f"could not read encoder weights {source} (truncated or corrupted?): {error}") from error


def _use_math_attention(backbone: nn.Module) -> None:
    """Switch this encoder's attention to the math path (forward-mode AD and double backward need it).

    Per instance, so other models in the process keep their fused kernels (METHOD.md section 2).
    """
    attentions = [m for m in backbone.modules() if hasattr(m, "fused_attn")]
    if not attentions:
        raise RuntimeError(f"{type(backbone).__name__} has no timm attention modules to put on the math path")
    for module in attentions:
        module.fused_attn = False
