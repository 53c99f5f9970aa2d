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

import math
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


def _log_volume_gradient(guidance: JepaGuidance, image: torch.Tensor, memories: Sequence[SketchMemory] | None):
    """d JS_bar / d image, the encoder branch run ``micro_batch`` rows at a time (rows are independent)."""
    config = guidance.config
    size = config.micro_batch or image.shape[0]
    grads = []
    for chunk, start in enumerate(range(0, image.shape[0], size)):
        rows = slice(start, start + size)
        part = image[rows].detach().requires_grad_(True)
        warm = {} if memories is None else {"memory": memories[chunk]}
        log_volume = guidance.objective(
            guidance.encoder, part, config.k, config.oversample, config.power_iters,
            generator=guidance.sketch_generators[rows], **warm,
        )
        grads.append(torch.autograd.grad(log_volume.sum(), part)[0])
    return torch.cat(grads)


def guidance_direction(
    guidance: JepaGuidance,
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x: torch.Tensor,
    t: int,
    memories: Sequence[SketchMemory] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, network output at x_t): the gradient of JS_bar with respect to x_t (L-inf normalised if asked), detached.

    ``gradient="full"`` differentiates through the denoiser (docs/method.md, 'Guided step');
    ``"tweedie"`` holds the network output constant and differentiates the clean estimate alone
    (docs/method.md, 'Cheaper guidance'): no denoiser backward and no denoiser graph in memory.
    The image -> encoder part runs in micro-batches; ``memories`` (warm start) holds one per micro-batch.
    """
    config = guidance.config
    with torch.enable_grad():
        x_t = x.detach().requires_grad_(True)
        if config.gradient == "full":
            model_output = denoiser(x_t, t)
        else:
            with torch.no_grad():
                model_output = denoiser(x, t)
        x0_hat, _ = predict_clean(schedule, model_output, x_t, t)
        image = guidance.decode(x0_hat).clamp(0, 1).float()  # the encoder branch runs in fp32
        (grad,) = torch.autograd.grad(image, x_t, _log_volume_gradient(guidance, image, memories))
    if config.normalize:
        grad = grad / _per_row(grad.abs().flatten(1).amax(1).clamp_min(L_INF_FLOOR), grad)
    return _controlled(guidance, grad), model_output.detach()


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *[1] * (like.ndim - 1))


def _controlled(guidance: JepaGuidance, grad: torch.Tensor) -> torch.Tensor:
    """The direction a control moves along instead of g, at g's L2 norm row by row (docs/method.md, 'Controls'):
    ``ascend`` is -g; ``random`` a Gaussian direction from the row's sketch stream, rescaled to |g|."""
    if guidance.config.direction == "ascend":
        return -grad
    if guidance.config.direction == "random":
        noise = randn_tensor(grad.shape, generator=list(guidance.sketch_generators), device=grad.device, dtype=grad.dtype)
        norms = grad.flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1).clamp_min(L_INF_FLOOR)
        return noise * _per_row(norms, grad)
    return grad


def step_size(config: GuidanceConfig, schedule: NoiseSchedule, t: int, t_prev: int) -> float:
    """The step's scale: eta (constant) or eta * beta-tilde_t (variance), times the interval when rescaled."""
    scale = config.eta * (config.interval if config.rescale_interval else 1)
    if config.schedule == "variance":
        scale = scale * posterior_variance(schedule, t, t_prev).item()
    return scale


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

    ``memory`` (warm start, whole batch as one micro-batch) is passed to the objective, which starts its
    sketch from it and updates it.
    """
    direction, model_output = guidance_direction(guidance, denoiser, schedule, x, t,
                                                 None if memory is None else [memory])
    return step_size(guidance.config, schedule, t, t_prev) * direction, model_output


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
    config = guidance.config if guidance is not None else None
    guided = config.guided_steps(total) if config is not None else [False] * total
    pushed = config.pushed_steps(total) if config is not None else [False] * total
    placement = config.placement if config is not None else None
    memories = None
    if config is not None and config.warm_start:
        memories = [SketchMemory() for _ in range(math.ceil(x.shape[0] / (config.micro_batch or x.shape[0])))]
    steps_guided, direction = 0, None
    pairs = zip(schedule.timesteps, schedule.previous)
    for s, (t, t_prev) in enumerate(tqdm(list(pairs), desc="sampling", unit="step", disable=not progress)):
        step, model_output = None, None
        if guided[s]:
            direction, model_output = guidance_direction(guidance, denoiser, schedule, x, t, memories)
            steps_guided += 1
        if pushed[s]:  # a guided step, or one between guided steps that reuses the last direction
            step = step_size(config, schedule, t, t_prev) * direction
            if placement == "pre-step":
                x, model_output = x - step, None
        if model_output is None:
            with torch.no_grad():
                model_output = denoiser(x, t)
        move = update(schedule, model_output, x, t, t_prev, ddim_eta)
        x = move.mean - step if placement == "posterior-mean" and step is not None else move.mean
        if move.draws_noise:
            x = x + move.std * randn_tensor(x.shape, generator=list(generators), device=x.device, dtype=x.dtype)
    return x, steps_guided
