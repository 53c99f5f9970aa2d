"""Train the demo's small models on CPU from scikit-learn's digits, saved as real checkpoints are.

(a) A class-conditional DDPM (Ho et al., 2020): diffusers ``UNet2DModel`` with class embeddings,
    epsilon prediction, saved as a diffusers ``DDPMPipeline`` folder.
(b) A joint-embedding encoder of the JEPA family: two augmented views through a small timm
    DINOv2-architecture ViT and an expander over its CLS token, trained with one of two objectives:
    VICReg (Bardes et al., 2022; invariance + variance + covariance) or LeJEPA's (Balestriero & LeCun,
    2025; invariance + SIGReg, ``guidance/sigreg.py``). Saved in timm's folder layout
    (config.json + model.safetensors).
Both are reproducible from their seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm import tqdm

from guidance.encoders import JepaEncoder
from pipeline.demo.digits import augment, digits, nuisance_view
from pipeline.settings import UserError
from guidance.sigreg import POINTS, SLICES, T_MAX, sigreg

log = logging.getLogger(__name__)
ENCODER_OBJECTIVES = ("vicreg", "sigreg")


@dataclass(frozen=True)
class DiffusionTraining:
    """Recipe of the demo diffusion model."""

    output: str = "models/digits-ddpm"  # a diffusers pipeline folder
    size: int = 16  # digits are upsampled from 8x8 to size x size
    steps: int = 4000  # optimiser steps
    batch_size: int = 64
    learning_rate: float = 2e-3
    ema_decay: float = 0.999  # the saved weights are the exponential moving average
    data: str = "train"  # which digits it learns from (pipeline/demo/digits.py, PARTS)
    seed: int = 0


@dataclass(frozen=True)
class EncoderTraining:
    """Recipe of the demo JEPA-family encoder."""

    output: str = "models/digits-sigreg-vit"  # a timm model folder
    name: str = "vit_small_patch14_reg4_dinov2"  # the DINOv2 architecture family, shrunk by model_args
    input_size: int = 56  # 4 x 4 patches of 14 pixels
    embed_dim: int = 64
    depth: int = 4
    heads: int = 4
    size: int = 16  # digit resolution before the encoder's own resize
    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 1e-3
    augment_strength: float = 1.0  # scales every range of the two views' augmentations (pipeline/demo/digits.py)
    nuisance_strength: float = 0.0  # views also differ in stroke width, brightness, contrast, blur, warp (0: off)
    expander: int = 0  # expander width, both objectives act on its output; 0: on the embedding itself
    objective: str = "sigreg"  # one of ENCODER_OBJECTIVES; chosen by the prior check (models/README.md)
    invariance: float = 25.0  # VICReg weights (lambda, mu, nu of the paper)
    variance: float = 25.0
    covariance: float = 1.0
    sigreg_weight: float = 0.5  # LeJEPA's lambda: loss = (1 - lambda) * invariance + lambda * SIGReg (paper: 0.05)
    sigreg_slices: int = SLICES  # random directions, drawn afresh each step
    sigreg_points: int = POINTS  # quadrature points of t
    sigreg_t_max: float = T_MAX  # t in [-T, T]
    data: str = "train"  # which digits it learns from (pipeline/demo/digits.py, PARTS)
    seed: int = 0

    def __post_init__(self):
        if self.objective not in ENCODER_OBJECTIVES:
            raise UserError(f"objective must be one of {', '.join(ENCODER_OBJECTIVES)}, got {self.objective!r}")
        if not 0 < self.sigreg_weight < 1:
            raise UserError(f"sigreg_weight (LeJEPA's lambda) must be in (0, 1), got {self.sigreg_weight!r}")
        for label, value, least in (("sigreg_slices", self.sigreg_slices, 1), ("sigreg_points", self.sigreg_points, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"{label} must be an integer >= {least}, got {value!r}")
        if isinstance(self.expander, bool) or not isinstance(self.expander, int) or self.expander < 0:
            raise UserError(f"expander must be an integer width >= 0 (0: none), got {self.expander!r}")
        if not self.augment_strength > 0:
            raise UserError(f"augment_strength must be positive, got {self.augment_strength!r}")
        if not 0 <= self.nuisance_strength <= 1:
            raise UserError(f"nuisance_strength must be in [0, 1] (0: off), got {self.nuisance_strength!r}")
        if not self.sigreg_t_max > 0:
            raise UserError(f"sigreg_t_max must be positive (t runs over [-T, T]), got {self.sigreg_t_max!r}")


def ddpm_step(unet: UNet2DModel, scheduler: DDPMScheduler, optimisation: tuple, x0: torch.Tensor,
              generator: torch.Generator, class_labels: torch.Tensor | None = None) -> float:
    """One DDPM epsilon-prediction step (Ho et al., 2020) on clean images ``x0`` in [-1, 1]: noise at a uniform
    timestep, MSE to the noise, then the (optimiser, LR schedule, EMA) of ``optimisation``; returns the loss."""
    optimiser, schedule, ema = optimisation
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, class_labels=class_labels).sample, noise)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    schedule.step()
    ema.step(unet.parameters())
    return loss.item()


def train_diffusion(recipe: DiffusionTraining) -> Path:
    """DDPM training: eps-MSE at uniformly drawn t, class embeddings for the 10 digits."""
    torch.manual_seed(recipe.seed)
    images, labels = digits(recipe.size, recipe.data)
    data = images * 2 - 1  # the pixel UNet works in [-1, 1]
    unet = UNet2DModel(
        sample_size=recipe.size, in_channels=1, out_channels=1, block_out_channels=(32, 48, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8, num_class_embeds=10,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, recipe.learning_rate, total_steps=recipe.steps)
    ema = EMAModel(unet.parameters(), decay=recipe.ema_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    for _ in tqdm(range(recipe.steps), desc="diffusion", unit="step"):
        index = torch.randint(len(data), (recipe.batch_size,), generator=generator)
        x0, y = data[index], labels[index]
        loss = ddpm_step(unet, scheduler, (optimiser, schedule, ema), x0, generator, class_labels=y)
    ema.copy_to(unet.parameters())
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(recipe.output)
    log.info("saved the diffusion model to %s (last loss %.4f)", recipe.output, loss)
    return Path(recipe.output)


def vicreg_loss(a: torch.Tensor, b: torch.Tensor, recipe: EncoderTraining) -> torch.Tensor:
    """VICReg: invariance (MSE between views) + variance (hinge on per-dim std) + covariance (off-diagonal)."""
    invariance = F.mse_loss(a, b)
    a, b = a - a.mean(0), b - b.mean(0)
    std_a, std_b = torch.sqrt(a.var(0) + 1e-4), torch.sqrt(b.var(0) + 1e-4)
    variance = F.relu(1 - std_a).mean() + F.relu(1 - std_b).mean()
    n, d = a.shape

    def off_diagonal(z: torch.Tensor) -> torch.Tensor:
        cov = (z.T @ z) / (n - 1)
        return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / d

    covariance = off_diagonal(a) + off_diagonal(b)
    return recipe.invariance * invariance + recipe.variance * variance + recipe.covariance * covariance


def lejepa_loss(a: torch.Tensor, b: torch.Tensor, recipe: EncoderTraining, generator: torch.Generator) -> torch.Tensor:
    """LeJEPA: (1 - lambda) * prediction + lambda * SIGReg, both averaged over the two views.

    The prediction term is each view's squared distance to the views' mean embedding; SIGReg draws
    its directions from ``generator``, once per view, so they change every step.
    """
    centre = (a + b) / 2
    prediction = ((a - centre) ** 2 + (b - centre) ** 2).mean() / 2
    regulariser = sum(
        sigreg(view, generator, recipe.sigreg_slices, recipe.sigreg_t_max, recipe.sigreg_points) for view in (a, b)
    ) / 2
    return (1 - recipe.sigreg_weight) * prediction + recipe.sigreg_weight * regulariser


def encoder_loss(a: torch.Tensor, b: torch.Tensor, recipe: EncoderTraining, generator: torch.Generator) -> torch.Tensor:
    """The recipe's objective on two views' embeddings (N, D): VICReg or LeJEPA's invariance + SIGReg."""
    if recipe.objective == "sigreg":
        return lejepa_loss(a, b, recipe, generator)
    return vicreg_loss(a, b, recipe)


def view(batch: torch.Tensor, recipe: EncoderTraining, generator: torch.Generator) -> torch.Tensor:
    """One augmented view of each image: geometry and noise, then the nuisances if the recipe asks."""
    views = augment(batch, generator, recipe.augment_strength)
    return nuisance_view(views, generator, recipe.nuisance_strength) if recipe.nuisance_strength else views


def train_encoder(recipe: EncoderTraining) -> Path:
    torch.manual_seed(recipe.seed)
    images, _ = digits(recipe.size, recipe.data)
    rgb = images.expand(-1, 3, -1, -1)
    backbone = timm.create_model(
        recipe.name, pretrained=False, img_size=recipe.input_size, num_classes=0, embed_dim=recipe.embed_dim,
        depth=recipe.depth, num_heads=recipe.heads, init_values=1e-5,
    )
    cfg = backbone.pretrained_cfg
    encoder = JepaEncoder(backbone, recipe.name, recipe.input_size, cfg["mean"], cfg["std"])
    expander = nn.Sequential(
        nn.Linear(recipe.embed_dim, recipe.expander), nn.BatchNorm1d(recipe.expander), nn.ReLU(),
        nn.Linear(recipe.expander, recipe.expander),
    ) if recipe.expander else nn.Identity()
    parameters = list(backbone.parameters()) + list(expander.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=recipe.learning_rate, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, recipe.learning_rate, total_steps=recipe.steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    for _ in tqdm(range(recipe.steps), desc="encoder", unit="step"):
        batch = rgb[torch.randint(len(rgb), (recipe.batch_size,), generator=generator)]
        a = expander(encoder(view(batch, recipe, generator)))
        b = expander(encoder(view(batch, recipe, generator)))
        loss = encoder_loss(a, b, recipe, generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    timm.models.save_for_hf(backbone.eval(), recipe.output, safe_serialization=True)
    log.info("saved the encoder to %s (last loss %.4f)", recipe.output, loss)
    return Path(recipe.output)
