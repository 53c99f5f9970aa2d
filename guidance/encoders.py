"""World priors: image encoders as image -> embedding maps with preprocessing included.

The world prior of the paper is a JEPA encoder f. Here f maps images in [0, 1], shape (B, 3, H, W),
to one embedding per image, shape (B, D), not normalised (docs/method.md, 'The encoder'). Three families,
one row each in ``FAMILIES`` (guidance/encoder_specs.py), each built by its library's loader (``LOADERS``):
  - the DINOv2 table (guidance/encoder_specs.py, the paper's prior): timm names, 224 px unless asked otherwise;
  - ``timm:<architecture>``: any timm VisionTransformer, its input size, mean and std from its
    pretrained config (a folder's config.json, or timm's registry);
  - ``open_clip:<architecture>``: an open_clip ViT image tower (e.g. MetaCLIP's) from a local
    checkpoint; its embedding is ``encode_image``'s (pooled token, final norm, projection).
``output`` picks the embedding: "cls", the CLS token after the final norm, or "pool", the mean of
the patch tokens (timm's / open_clip's own average pooling). Resizing (bilinear) and the mean / std
normalisation are part of f, so Jacobians are taken with respect to the [0, 1] image a sampler
produces. Every family runs in fp32 on the math attention path (no fused kernels), scoped to it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import nn

from guidance.checks import check_finite_tensors
from guidance.encoder_specs import (ENCODERS, WEIGHT_FILE_SUFFIXES, EncoderFamily, check_encoder,
                                    check_encoder_weights, encoder_dims, family_of, is_hub, open_clip_name)

log = logging.getLogger(__name__)


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
    input_size: int | None = None,
    output: str = "cls",
    antialias: bool = False,
    model_args: Mapping[str, Any] | None = None,
) -> JepaEncoder:
    """Build a frozen, fp32, eval-mode encoder (``name``: see the module doc).

    weights:
      - a local ``.safetensors`` / ``.pth`` file (torch files are loaded weights-only);
      - a local folder in timm's layout (``config.json`` + ``model.safetensors``), for timm families;
      - ``"hub"`` or ``"hub:TAG"`` to fetch timm's pretrained weights (needs the internet), timm families only;
      - ``"random"`` for an untrained encoder, only when asked for explicitly.
    input_size: None for the encoder's own (a folder's config.json, else 224 for DINOv2; else the pretrained config's).
    output: "cls" (CLS token after the final norm) or "pool" (mean of the patch tokens).
    model_args: architecture overrides passed to timm (e.g. a smaller ``depth``), for checkpoints
      of a non-standard size; a folder's ``config.json`` supplies its own.
    """
    weights = str(weights)
    check_encoder(name, weights, output, input_size)
    check_encoder_weights(name, weights)  # the preflight's own check: the two agree on what is read
    family, architecture = family_of(name)
    backbone, mean, std, input_size = LOADERS[family.library](name, architecture, weights, family, output, input_size,
                                                              dict(model_args or {}))
    check_finite_tensors(backbone.state_dict().items(), f"encoder weights {weights}")
    backbone.float().eval().requires_grad_(False)
    encoder = JepaEncoder(backbone, name, input_size, mean, std, antialias)
    return encoder.eval().requires_grad_(False)


def _timm_backbone(name: str, architecture: str, weights: str, family: EncoderFamily, output: str,
                   input_size: int | None, model_args: dict[str, Any]) -> tuple[nn.Module, tuple, tuple, int]:
    """(ViT, mean, std, input size) of a timm family, its head at ``output``, on the math attention path."""
    kwargs = model_args | family.build_args | dict(num_classes=0)
    if family.input_size is not None:
        input_size = encoder_dims(name, weights, input_size)[1]  # a folder's own size, else the family's
    if input_size is not None:
        kwargs |= dict(img_size=input_size)
    backbone = _create_backbone(architecture, weights, kwargs, ENCODERS[name].hub_tag if name in ENCODERS else None)
    input_size = _timm_output(backbone, name, family.pools[output], output, input_size)
    _use_math_attention(backbone)
    config = resolve_model_data_config(backbone)
    return backbone, tuple(config["mean"]), tuple(config["std"]), input_size


def _open_clip_backbone(name: str, architecture: str, weights: str, family: EncoderFamily, output: str,
                        input_size: int | None, model_args: dict[str, Any]) -> tuple[nn.Module, tuple, tuple, int]:
    """(tower, mean, std, input size) of an open_clip family: its own input size, pooling at ``output``."""
    if model_args:
        raise ValueError("model_args apply to timm encoders; an open_clip architecture comes from its config")
    backbone, mean, std, native = _open_clip_tower(architecture, weights, family.pools[output])
    if input_size not in (None, native):
        raise ValueError(f"encoder {name!r} runs at its own input size {native}, got input_size {input_size}: "
                         "leave it unset")
    return backbone, mean, std, native


def _timm_output(backbone: nn.Module, name: str, pool: str, output: str, input_size: int | None) -> int:
    """Point the ViT's head at the requested output, timm's ``pool`` (its weights untouched); returns the input size
    it runs at."""
    if not isinstance(backbone, timm.models.VisionTransformer):
        raise ValueError(f"encoder {name!r} is a {type(backbone).__name__}, not a timm VisionTransformer")
    if output == "cls" and backbone.cls_token is None:
        raise ValueError(f"encoder {name!r} has no CLS token: use output 'pool'")
    backbone.reset_classifier(0, global_pool=pool)
    height, width = backbone.patch_embed.img_size
    patch = backbone.patch_embed.patch_size[0]
    if height != width or height % patch:
        raise ValueError(f"encoder {name!r} runs at {height}x{width}: input_size must be square and a multiple of "
                         f"its patch size {patch}")
    return input_size or height


def _create_backbone(name: str, weights: str, kwargs: dict[str, Any], hub_tag: str | None) -> nn.Module:
    if weights == "random":
        log.warning("encoder %s has RANDOM weights (asked for explicitly): scores mean nothing", name)
        return timm.create_model(name, pretrained=False, **kwargs)
    if is_hub(weights):
        tag = weights.partition(":")[2] or hub_tag
        model = f"{name}.{tag}" if tag else name
        try:
            return timm.create_model(model, pretrained=True, **kwargs)
        except Exception as error:  # offline, unknown tag, or hub failure: all mean "no weights"
            raise RuntimeError(
                f"could not fetch weights for {model} from the hub ({error}). Without the internet, "
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
        text = one_line(error)
        if "weights_only" in text:
            raise ValueError(
                f"{source} is a pickle checkpoint that is not weights-only; refusing to unpickle it. "
                "Save the state dict alone (torch.save(model.state_dict(), ...)) or as safetensors."
            ) from error
        if "state_dict" in text:
            raise ValueError(f"weights in {source} do not fit the encoder architecture: {text}") from error
        raise ValueError(f"could not read encoder weights {source}: {text}") from error
    except Exception as error:  # truncated / corrupted files surface as assorted decoder errors
        raise ValueError(f"could not read encoder weights {source} (truncated or corrupted?): {one_line(error)}") from error


def one_line(error: BaseException, limit: int = 600) -> str:
    """A library's error text on one line (state-dict mismatches list keys over many lines), shortened."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else f"{text[:limit]} ..."


def _use_math_attention(backbone: nn.Module) -> None:
    """Switch this encoder's attention to the math path (forward-mode AD and double backward need it).

    Per instance, so other models in the process keep their fused kernels (docs/method.md, 'The encoder').
    """
    attentions = [m for m in backbone.modules() if hasattr(m, "fused_attn")]
    if not attentions:
        raise RuntimeError(f"{type(backbone).__name__} has no timm attention modules to put on the math path")
    for module in attentions:
        module.fused_attn = False


class MathMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` on the explicit math path: softmax(q k^T / sqrt(d)) v by bmm, same weights.

    The stock module's fast path and its fused SDPA kernels have no forward-mode AD and no double
    backward; asking ``multi_head_attention_forward`` for the weights selects its bmm path instead.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        output, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=True, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (output.transpose(0, 1) if self.batch_first else output), (weights if need_weights else None)

    @classmethod
    def like(cls, attention: nn.MultiheadAttention) -> MathMultiheadAttention:
        if attention.kdim != attention.embed_dim or attention.vdim != attention.embed_dim:
            raise ValueError("attention with separate key / value sizes is not supported on the math path")
        math = cls(attention.embed_dim, attention.num_heads, dropout=attention.dropout,
                   bias=attention.in_proj_bias is not None, add_bias_kv=attention.bias_k is not None,
                   add_zero_attn=attention.add_zero_attn, batch_first=attention.batch_first)
        math.load_state_dict(attention.state_dict())
        return math


class OpenClipTower(nn.Module):
    """open_clip's ViT image tower as a backbone: ``encode_image`` (unnormalised), its attention on the math path.

    Per instance, like timm's ``fused_attn = False``: other models in the process keep their kernels.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        for parent in list(visual.modules()):
            for child_name, child in parent.named_children():
                if type(child) is nn.MultiheadAttention:
                    setattr(parent, child_name, MathMultiheadAttention.like(child))
                elif hasattr(child, "use_fsdpa"):  # open_clip's own Attention
                    child.use_fsdpa = False
        self.visual = visual
        self.num_features: int = visual.output_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


def load_open_clip(architecture: str, weights: str, device: str = "cpu"):
    """(model, preprocess, model name) of an open_clip architecture from a local checkpoint file, weights-only.

    The one loader of open_clip models: the CLIP score (pipeline/evaluate/features.py) and the open_clip
    world prior both use it. ``weights="random"`` builds an untrained model, only when asked for.
    """
    import open_clip

    name = open_clip_name(architecture)
    if weights == "random":
        log.warning("open_clip model %s has RANDOM weights (asked for explicitly): scores mean nothing", name)
        pretrained = None
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"open_clip weights not found: {path}; pass a local checkpoint file "
                                    f"({', '.join(WEIGHT_FILE_SUFFIXES)}), nothing is downloaded")
        if path.suffix not in WEIGHT_FILE_SUFFIXES:
            raise ValueError(f"open_clip weights {path} must end in one of {', '.join(WEIGHT_FILE_SUFFIXES)}")
        pretrained = str(path)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, weights_only=True)
    except Exception as error:  # mismatched, pickled or unreadable checkpoints surface as assorted errors
        raise ValueError(f"could not load open_clip weights {weights} into {name}: {one_line(error)}") from error
    return model.eval(), preprocess, name


def _open_clip_tower(architecture: str, weights: str, pool: str) -> tuple[nn.Module, tuple, tuple, int]:
    """(tower, mean, std, input size) of an open_clip ViT image tower, its pooling set to open_clip's ``pool``."""
    import open_clip
    from open_clip.transformer import VisionTransformer

    model, _, name = load_open_clip(architecture, weights)
    visual = model.visual
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        raise ValueError(f"open_clip {name}'s image tower is a {type(visual).__name__}"
                         f"{' with attentional pooling' if isinstance(visual, VisionTransformer) else ''}: "
                         "only plain ViT towers (CLS or mean-pooled token) are supported")
    visual.pool_type = pool
    config = open_clip.get_model_preprocess_cfg(model)
    height, width = visual.image_size
    if height != width:
        raise ValueError(f"open_clip {name} runs at {height}x{width}: only square inputs are supported")
    return OpenClipTower(visual), tuple(config["mean"]), tuple(config["std"]), height


LOADERS = {"timm": _timm_backbone, "open_clip": _open_clip_backbone}  # EncoderFamily.library -> its loader
