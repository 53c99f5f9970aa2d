"""The discrete noise schedule of a diffusers model, and the DDPM / DDIM update rules over it.

DDPM: Ho et al., 2020 (ancestral sampling); DDIM: Song et al., 2021 (eta = 0 deterministic).
Notation: abar_t = prod_{s<=t} (1 - beta_s); x0_hat the Tweedie estimate of the clean sample;
eps_hat the predicted noise; t_prev the next (less noisy) sampled timestep, -1 past the end.
The tables come from the model's own scheduler config through a private diffusers scheduler
(never shared between generations); the update rules are plain functions with no state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from guidance.methods import SAMPLERS

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclass(frozen=True)
class NoiseSchedule:
    """abar_t and the sampled timesteps (noisiest first), with their t_prev."""

    sampler: str  # "ddpm" (ancestral) or "ddim"
    alphas_cumprod: torch.Tensor  # abar_t for t = 0 .. T-1, float32 as diffusers keeps it
    timesteps: tuple[int, ...]  # the sampled t, noisiest first
    previous: tuple[int, ...]  # t_prev of each sampled t; -1 means the clean end
    final_alpha_cumprod: float  # abar used at t_prev = -1
    prediction_type: str  # what the network predicts: epsilon, sample or v_prediction
    clip_sample_range: float | None  # clamp x0_hat to [-r, r] inside the update (diffusers clip_sample)
    variance_type: str  # DDPM noise variance: fixed_small (beta-tilde) or fixed_large (beta)

    def abar(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else torch.tensor(self.final_alpha_cumprod)

    def skip(self, count: int) -> NoiseSchedule:
        """The same schedule without its first ``count`` (noisiest) steps."""
        return replace(self, timesteps=self.timesteps[count:], previous=self.previous[count:])


def noise_schedule(scheduler_config: Mapping[str, Any], steps: int, sampler: str, **overrides: Any) -> NoiseSchedule:
    """Tables for ``steps`` sampling steps from a diffusers scheduler config (spacing, offsets, betas).

    ``overrides`` replace config entries (e.g. ``timestep_spacing="trailing"`` for SDXL-Lightning).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    # As keyword arguments: merged into the dict, diffusers would drop any key the config file omitted
    # (it lists those in ``_use_default_values`` and restores their defaults).
    scheduler = (DDPMScheduler if sampler == "ddpm" else DDIMScheduler).from_config(dict(scheduler_config), **overrides)
    train_steps = scheduler.config.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= train_steps:
        raise ValueError(f"steps must be an integer in [1, {train_steps}] (the model's training steps), got {steps!r}")
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {scheduler.config.prediction_type!r} is not one of {PREDICTION_TYPES}")
    if scheduler.config.thresholding:
        raise ValueError("dynamic thresholding is not supported; set thresholding=false in the scheduler config")
    variance_type = scheduler.config.get("variance_type", "fixed_small")
    if sampler == "ddpm" and variance_type not in VARIANCE_TYPES:
        raise ValueError(f"DDPM variance_type {variance_type!r} is not supported; use one of {VARIANCE_TYPES}")
    scheduler.set_timesteps(steps)
    timesteps = tuple(int(t) for t in scheduler.timesteps)
    if sampler == "ddpm":  # diffusers DDPMScheduler.previous_timestep: the next sampled t
        previous = timesteps[1:] + (-1,)
        final = 1.0
    else:  # diffusers DDIMScheduler.step: a fixed stride
        stride = train_steps // steps
        previous = tuple(t - stride for t in timesteps)
        final = float(scheduler.final_alpha_cumprod)
    return NoiseSchedule(
        sampler=sampler,
        alphas_cumprod=scheduler.alphas_cumprod.clone(),
        timesteps=timesteps,
        previous=previous,
        final_alpha_cumprod=final,
        prediction_type=scheduler.config.prediction_type,
        clip_sample_range=scheduler.config.clip_sample_range if scheduler.config.clip_sample else None,
        variance_type=variance_type if sampler == "ddpm" else "fixed_small",
    )


def predict_clean(schedule: NoiseSchedule, model_output: torch.Tensor, x: torch.Tensor, t: int):
    """Tweedie: (x0_hat, eps_hat) from the network output at x_t. x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar_t = schedule.abar(t).to(x.device)
    if schedule.prediction_type == "epsilon":
        eps_hat = model_output
        x0_hat = (x - (1 - abar_t) ** 0.5 * eps_hat) / abar_t**0.5
    elif schedule.prediction_type == "sample":
        x0_hat = model_output
        eps_hat = (x - abar_t**0.5 * x0_hat) / (1 - abar_t) ** 0.5
    else:  # v_prediction
        x0_hat = abar_t**0.5 * x - (1 - abar_t) ** 0.5 * model_output
        eps_hat = abar_t**0.5 * model_output + (1 - abar_t) ** 0.5 * x
    return x0_hat, eps_hat


def renoise(schedule: NoiseSchedule, x0: torch.Tensor, r: int, noise: torch.Tensor) -> torch.Tensor:
    """x_r = sqrt(abar_r) x0 + sqrt(1 - abar_r) noise: a clean estimate taken back to the noise level r."""
    abar_r = schedule.abar(r).to(x0.device, x0.dtype)
    return abar_r.sqrt() * x0 + (1 - abar_r).sqrt() * noise


def renoise_timestep(schedule: NoiseSchedule, level: float) -> int:
    """The fixed re-noise timestep r = level * N of the model's N training timesteps (the last one at most)."""
    count = len(schedule.alphas_cumprod)
    return min(round(level * count), count - 1)


def posterior_variance(schedule: NoiseSchedule, t: int, t_prev: int) -> torch.Tensor:
    """DDPM beta-tilde_t = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)."""
    abar_t, abar_prev = schedule.abar(t), schedule.abar(t_prev)
    return (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)


@dataclass(frozen=True)
class Step:
    """One update x_t -> x_{t_prev} = mean + std * z; ``draws_noise`` says whether z is drawn."""

    mean: torch.Tensor
    std: torch.Tensor | float
    draws_noise: bool


def update(
    schedule: NoiseSchedule, model_output: torch.Tensor, x: torch.Tensor, t: int, t_prev: int, ddim_eta: float
) -> Step:
    """The sampler's own update at t (DDPM posterior or DDIM), exactly as diffusers computes it."""
    abar_t, abar_prev = schedule.abar(t).to(x.device), schedule.abar(t_prev).to(x.device)
    x0_hat, eps_hat = predict_clean(schedule, model_output, x, t)
    if schedule.clip_sample_range is not None:
        x0_hat = x0_hat.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    if schedule.sampler == "ddpm":
        beta_t = 1 - abar_t / abar_prev
        mean = (abar_prev**0.5 * beta_t / (1 - abar_t)) * x0_hat + ((1 - beta_t) ** 0.5 * (1 - abar_prev) / (1 - abar_t)) * x
        variance = beta_t if schedule.variance_type == "fixed_large" else ((1 - abar_prev) / (1 - abar_t) * beta_t).clamp_min(1e-20)
        return Step(mean, variance**0.5, draws_noise=t > 0)
    std = ddim_eta * posterior_variance(schedule, t, t_prev).to(x.device) ** 0.5
    mean = abar_prev**0.5 * x0_hat + (1 - abar_prev - std**2) ** 0.5 * eps_hat
    return Step(mean, std, draws_noise=ddim_eta > 0)
