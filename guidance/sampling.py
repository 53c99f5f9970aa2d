"""The JEPA-guided sampler (paper eq. for x_{t-1}; docs/method.md, 'Guided step'), a plain
function over (denoiser, x_T, schedule).

At a guided step, with x_t requiring grad:
  out = denoiser(x_t, t)                        (with graph)
  x0_hat = Tweedie(out, x_t)                    (schedules.predict_clean)
  image = clamp(decode(x0_hat), 0, 1)           (VAE decode for latent models)
  g = d JS_bar(image) / d x_t                   (top-k log-volume, envelope gradient)
  g <- g / max|g| per sample                    (optional L-inf normalisation)
  step = eta * g  or  eta * beta-tilde_t * g    (constant / variance schedule)
then either x_t <- x_t - step and the ordinary sampler step at t (pre-step, the authors' release),
or the sampler's posterior mean minus step (posterior-mean, ADM-style minority samplers).
Every stochastic draw comes from the row's own generator. With ``warm_start`` one ``SketchMemory``
carries each row's sketch subspace from a guided step to the next (log_volume module doc).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

from guidance.jepa_score import Encoder
from guidance.log_volume import SketchMemory
from guidance.methods import GuidanceConfig
from guidance.models import Denoiser
from guidance.objectives import LogVolumeObjective
from guidance.schedules import NoiseSchedule, posterior_variance, predict_clean, update

L_INF_FLOOR = 1e-12  # avoids 0 / 0 when a sample's gradient vanishes


@dataclass(frozen=True)
class JepaGuidance:
    """Everything a guided step needs besides the denoiser: the world prior and its objective."""

    encoder: Encoder
    objective: LogVolumeObjective
    decode: Callable[[torch.Tensor], torch.Tensor]  # clean sample -> image in [0, 1] (unclamped)
    config: GuidanceConfig
    sketch_generators: Sequence[torch.Generator]  # one per row, a stream apart from the noise


def guidance_step(
    guidance: JepaGuidance,
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x: torch.Tensor,
    t: int,
    t_prev: int,
    memory: SketchMemory | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, network output at x_t): the guidance displacement to subtract, per row, detached.

    ``memory`` (warm start) is passed to the objective, which starts its sketch from it and updates it.
    """
    config = guidance.config
    warm = {} if memory is None else {"memory": memory}
    with torch.enable_grad():
        x_t = x.detach().requires_grad_(True)
        model_output = denoiser(x_t, t)
        x0_hat, _ = predict_clean(schedule, model_output, x_t, t)
        image = guidance.decode(x0_hat).clamp(0, 1).float()  # the encoder branch runs in fp32
        log_volume = guidance.objective(
            guidance.encoder, image, config.k, config.oversample, config.power_iters,
            generator=guidance.sketch_generators, **warm,
        )
        (grad,) = torch.autograd.grad(log_volume.sum(), x_t)
    if config.normalize:
        grad = grad / grad.abs().flatten(1).amax(1).clamp_min(L_INF_FLOOR).view(-1, *[1] * (grad.ndim - 1))
    scale = config.eta
    if config.schedule == "variance":
        scale = config.eta * posterior_variance(schedule, t, t_prev).item()
    return scale * grad, model_output.detach()


def sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    *,
    ddim_eta: float = 0.0,
    guidance: JepaGuidance | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Run the reverse process from x_T; returns (x_0, number of guided steps)."""
    total = len(schedule.timesteps)
    guided = guidance.config.guided_steps(total) if guidance is not None else [False] * total
    placement = guidance.config.placement if guidance is not None else None
    memory = SketchMemory() if guidance is not None and guidance.config.warm_start else None
    steps_guided = 0
    pairs = zip(schedule.timesteps, schedule.previous)
    for s, (t, t_prev) in enumerate(tqdm(list(pairs), desc="sampling", unit="step", disable=not progress)):
        step = None
        if guided[s]:
            step, model_output = guidance_step(guidance, denoiser, schedule, x, t, t_prev, memory)
            steps_guided += 1
            if placement == "pre-step":
                x = x - step
                with torch.no_grad():
                    model_output = denoiser(x, t)
        else:
            with torch.no_grad():
                model_output = denoiser(x, t)
        move = update(schedule, model_output, x, t, t_prev, ddim_eta)
        x = move.mean - step if placement == "posterior-mean" and step is not None else move.mean
        if move.draws_noise:
            x = x + move.std * randn_tensor(x.shape, generator=list(generators), device=x.device, dtype=x.dtype)
    return x, steps_guided
