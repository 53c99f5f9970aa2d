"""One denoiser contract, one thin adapter per diffusers model family.

A ``DiffusionModel`` turns a batch of work items into a ``Denoiser`` (x_t, t) -> network output,
with the conditioning (class labels, prompts, classifier-free guidance) bound inside, and decodes
a clean sample to an image in [0, 1] (differentiably: guidance flows back through it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class WorkItem:
    """One sample to generate: its seed and its condition (a class label, a prompt, or neither)."""

    seed: int
    class_label: int | None = None
    prompt: str | None = None


class DiffusionModel(ABC):
    """The contract every family adapter fulfils."""

    family: str
    network: nn.Module  # the denoising network (UNet or transformer)
    scheduler_config: dict[str, Any]  # the model's own diffusers scheduler config
    sample_shape: tuple[int, int, int]  # (C, H, W) of x_t: pixels, or latents for latent models
    guidance_vae: nn.Module | None = None  # a cheap decoder (AutoencoderTiny) for the guidance branch only

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    @property
    def device(self) -> torch.device:
        return self.network.device

    @abstractmethod
    def check(self, items: Sequence[WorkItem], cfg_scale: float) -> None:
        """Refuse conditions this model cannot take, naming the fix."""

    @abstractmethod
    def denoiser(self, items: Sequence[WorkItem], cfg_scale: float) -> Denoiser:
        """(x_t, t) -> network output for this batch of items, conditioning and CFG bound inside."""

    @abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Clean sample -> image in [0, 1] (before clamping), differentiable."""

    def guidance_decode(self, x0: torch.Tensor) -> torch.Tensor:
        """The decode inside the guidance branch: the cheap decoder when one is loaded, else ``decode``.

        The final image is always decoded by ``decode`` (docs/method.md, 'Cheaper guidance').
        """
        return self.decode(x0) if self.guidance_vae is None else _vae_decode(self.guidance_vae, x0)


def _refuse_prompts(items: Sequence[WorkItem], family: str) -> None:
    if any(item.prompt is not None for item in items):
        raise ValueError(f"a {family} model takes no prompts; drop them or choose a text-to-image preset")


def _class_labels(items: Sequence[WorkItem], num_classes: int, family: str) -> None:
    for item in items:
        if item.class_label is None:
            raise ValueError(f"a class-conditional {family} model needs a class_label for every item (seed {item.seed})")
        if isinstance(item.class_label, bool) or not 0 <= item.class_label < num_classes:
            raise ValueError(f"class_label {item.class_label!r} is out of range: this model has classes 0..{num_classes - 1}")


def applies_cfg(cfg_scale: float) -> bool:
    """The one rule of every family: classifier-free guidance runs iff scale > 1 (1 = off; below 1 is refused)."""
    return cfg_scale > 1


def _guided(conditional: torch.Tensor, unconditional: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022): eps_u + s (eps_c - eps_u)."""
    return unconditional + cfg_scale * (conditional - unconditional)


class PixelUNet(DiffusionModel):
    """DDPM-style pixel UNet (``UNet2DModel``), unconditional or with class embeddings; x in [-1, 1].

    One-channel (grey) models decode to RGB by repeating the channel.
    """

    family = "pixel-unet"

    def __init__(self, unet: nn.Module, scheduler_config: dict[str, Any]):
        self.network = unet
        self.scheduler_config = scheduler_config
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (unet.config.in_channels, *size)
        self.num_classes = unet.config.num_class_embeds

    def check(self, items: Sequence[WorkItem], cfg_scale: float) -> None:
        _refuse_prompts(items, self.family)
        if applies_cfg(cfg_scale):
            raise ValueError(f"a pixel UNet has no null class for classifier-free guidance; set cfg_scale=1, got {cfg_scale}")
        if self.num_classes is None:
            if any(item.class_label is not None for item in items):
                raise ValueError("this pixel UNet is unconditional: drop class labels or load a class-conditional UNet")
        else:
            _class_labels(items, self.num_classes, "pixel UNet")

    def denoiser(self, items: Sequence[WorkItem], cfg_scale: float) -> Denoiser:
        self.check(items, cfg_scale)
        labels = None
        if self.num_classes is not None:
            labels = torch.tensor([item.class_label for item in items], device=self.device)
        return lambda x, t: self.network(x, t, class_labels=labels).sample

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        image = (x0 + 1) / 2
        return image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image  # grey models give RGB images


class DiT(DiffusionModel):
    """Class-conditional latent transformer (``DiTTransformer2DModel`` + ``AutoencoderKL``) with CFG.

    The null class of classifier-free guidance is the extra label-embedding row ``num_classes``.
    """

    family = "dit"

    def __init__(self, transformer: nn.Module, vae: nn.Module, scheduler_config: dict[str, Any]):
        self.network = transformer
        self.vae = vae
        self.scheduler_config = scheduler_config
        size = transformer.config.sample_size
        self.sample_shape = (transformer.config.in_channels, size, size)
        self.num_classes = transformer.config.num_embeds_ada_norm
        table = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        self.has_null_class = table.num_embeddings > self.num_classes

    def check(self, items: Sequence[WorkItem], cfg_scale: float) -> None:
        _refuse_prompts(items, self.family)
        _class_labels(items, self.num_classes, "DiT")
        if applies_cfg(cfg_scale) and not self.has_null_class:
            raise ValueError("this DiT has no null-class embedding for classifier-free guidance; set cfg_scale=1")

    def denoiser(self, items: Sequence[WorkItem], cfg_scale: float) -> Denoiser:
        self.check(items, cfg_scale)
        labels = torch.tensor([item.class_label for item in items], device=self.device)
        channels = self.sample_shape[0]

        def eps(x: torch.Tensor, t: int) -> torch.Tensor:
            if not applies_cfg(cfg_scale):
                out = self.network(x, timestep=torch.full((len(x),), t, device=x.device), class_labels=labels).sample
                return out[:, :channels]
            both = torch.cat([x, x])
            null = torch.full_like(labels, self.num_classes)
            out = self.network(both, timestep=torch.full((len(both),), t, device=x.device),
                               class_labels=torch.cat([labels, null])).sample[:, :channels]
            conditional, unconditional = out.chunk(2)
            return _guided(conditional, unconditional, cfg_scale)

        return eps

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return _vae_decode(self.vae, x0)


def _vae_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).to(latents.dtype)


def sdxl_time_ids(unet: nn.Module, size: int, projection_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's size and crop micro-conditioning (Podell et al., 2023) for uncropped square images, (1, 6).

    (original height, width, crop top, left, target height, width) = (size, size, 0, 0, size, size), the
    values the diffusers pipeline passes by default, built here from the UNet's public config because
    the pipeline builds them in a private method. The UNet embeds each id in
    ``addition_time_embed_dim`` numbers beside the pooled text embedding; the lengths must add up.
    """
    time_ids = [size, size, 0, 0, size, size]
    built = unet.config.addition_time_embed_dim * len(time_ids) + projection_dim
    expected = unet.config.projection_class_embeddings_input_dim
    if built != expected:
        raise ValueError(
            f"this SDXL UNet expects added conditions of length {expected}, but {len(time_ids)} time ids x "
            f"addition_time_embed_dim {unet.config.addition_time_embed_dim} + text_encoder_2 projection_dim "
            f"{projection_dim} = {built}: the UNet and the second text encoder come from different models"
        )
    return torch.tensor([time_ids], dtype=dtype)


@dataclass(frozen=True)
class PromptEmbeds:
    """A batch's encoded prompts as the text-to-image UNet takes them: per-token embeddings, SDXL's pooled
    ones (None for SD 1.x / 2.x), and the negative (empty) prompts' (None without CFG)."""

    embeds: torch.Tensor
    negative: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


class StableDiffusion(DiffusionModel):
    """Text-to-image latent UNet with CFG: Stable Diffusion 1.x / 2.x, and SDXL (``xl=True``).

    Prompts are encoded by the diffusers pipeline's own ``encode_prompt`` (tokenizers, clip skip,
    SDXL's second encoder and zeroed empty prompts), so the conditioning matches the pipelines.
    """

    family = "text-to-image"

    def __init__(self, pipeline: Any, xl: bool):
        self.pipeline = pipeline
        self.xl = xl
        self.network = pipeline.unet
        self.vae = pipeline.vae
        self.scheduler_config = dict(pipeline.scheduler.config)
        size = pipeline.unet.config.sample_size
        self.sample_shape = (pipeline.unet.config.in_channels, size, size)

    def check(self, items: Sequence[WorkItem], cfg_scale: float) -> None:
        for item in items:
            if item.class_label is not None:
                raise ValueError("a text-to-image model takes prompts, not class labels")
            if not item.prompt:
                raise ValueError(f"a text-to-image model needs a non-empty prompt for every item (seed {item.seed})")

    def denoiser(self, items: Sequence[WorkItem], cfg_scale: float) -> Denoiser:
        self.check(items, cfg_scale)
        with torch.no_grad():
            embeds = self.encode_prompts([item.prompt for item in items], applies_cfg(cfg_scale))
        return self.conditioned(embeds, cfg_scale)

    def encode_prompts(self, prompts: Sequence[str], cfg: bool) -> PromptEmbeds:
        """The prompts (with ``cfg``, also the empty negative prompts) through the pipeline's ``encode_prompt``.

        Differentiable in the text encoders' inputs (a method that optimises a prompt embedding needs
        that); callers that need no gradient run it under ``torch.no_grad()``.
        """
        if self.xl:
            embeds, negative, pooled, negative_pooled = self.pipeline.encode_prompt(
                list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg)
            return PromptEmbeds(embeds, negative, pooled, negative_pooled)
        embeds, negative = self.pipeline.encode_prompt(
            list(prompts), self.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg)
        return PromptEmbeds(embeds, negative)

    def conditioned(self, prompts: PromptEmbeds, cfg_scale: float) -> Denoiser:
        """(x_t, t) -> network output under these prompt embeddings; CFG iff ``applies_cfg(cfg_scale)``
        (it needs the negatives)."""
        cfg = applies_cfg(cfg_scale)
        context = torch.cat([prompts.negative, prompts.embeds]) if cfg else prompts.embeds
        extra = self._xl_conditions(prompts.pooled, prompts.negative_pooled, prompts.embeds.dtype, cfg) if self.xl else {}

        def eps(x: torch.Tensor, t: int) -> torch.Tensor:
            model_input = torch.cat([x, x]) if cfg else x
            out = self.network(model_input, t, encoder_hidden_states=context, **extra).sample
            if not cfg:
                return out
            unconditional, conditional = out.chunk(2)
            return _guided(conditional, unconditional, cfg_scale)

        return eps

    def _xl_conditions(self, pooled, negative_pooled, dtype, cfg: bool) -> dict[str, Any]:
        """SDXL's micro-conditioning: pooled text embeddings and (size, crop, size) time ids."""
        height = self.sample_shape[1] * self.pipeline.vae_scale_factor
        projection = self.pipeline.text_encoder_2.config.projection_dim
        time_ids = sdxl_time_ids(self.network, height, projection, dtype).to(self.device).repeat(len(pooled), 1)
        text_embeds = torch.cat([negative_pooled, pooled]) if cfg else pooled
        time_ids = torch.cat([time_ids, time_ids]) if cfg else time_ids
        return {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return _vae_decode(self.vae, x0)
