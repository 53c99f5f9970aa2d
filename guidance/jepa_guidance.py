"""JEPA guidance as a sampling method (paper eq. for x_{t-1}; docs/method.md, 'Guided step'):
methods ``jepa`` and ``jepa-reference`` (the same sampler, the objective named by the method's row).

At a guided step, with x_t requiring grad:
  out = denoiser(x_t, t)                        (with graph)
  x0_hat = Tweedie(out, x_t)                    (schedules.predict_clean)
  image = clamp(decode(x0_hat), 0, 1)           (VAE decode for latent models)
  g = d JS_bar(image) / d x_t                   (top-k log-volume, envelope gradient)
  g <- g / max|g| per sample                    (optional L-inf normalisation)
  push = eta * g  or  eta * beta-tilde_t * g    (constant / variance schedule)
then either x_t <- x_t - push and the sampler's update at t (pre-step, the authors' release),
or the update's posterior mean minus push (posterior-mean, ADM-style minority samplers).
With ``project: renoise`` (docs/method.md, 'Manifold-constrained step') the pushed clean estimate
  x0_g = x0_hat - push / sqrt(abar_prev)        (the move of x0_hat the posterior-mean push makes under DDIM)
is re-noised to t with the row's re-noise stream and the sampler's update runs from there: the
denoiser's one call at the re-noised state undoes what of the push lies off its data.

Words: a *guided step* computes a fresh direction g; a *pushed step* moves x by the push along the
last g (the guided steps, and with ``reuse_direction`` every step of the window between them);
``push_scale`` is the push's length per unit of g. Every stochastic draw comes from the row's own
generator. With ``warm_start`` one ``SketchMemory`` per micro-batch carries each row's sketch
subspace from a guided step to the next (log_volume module doc).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.utils.torch_utils import randn_tensor

from guidance.checks import check_rank
from guidance.jepa_score import Encoder
from guidance.log_volume import SketchMemory
from guidance.objectives import LogVolumeObjective, get_objective
from guidance.sampling import L_INF_FLOOR, Method, Sampler, linf_normalized, per_row, stream_seed
from guidance.schedules import NoiseSchedule, posterior_variance, predict_clean, renoise

if TYPE_CHECKING:
    from guidance.encoders import JepaEncoder
    from guidance.methods import GuidanceConfig, SamplingConfig
    from guidance.models import Denoiser, DiffusionModel, WorkItem

@dataclass(frozen=True)
class JepaGuidance:
    """Everything a guided step needs besides the denoiser: the world prior and its objective."""

    encoder: Encoder
    objective: LogVolumeObjective
    decode: Callable[[torch.Tensor], torch.Tensor]  # clean sample -> image in [0, 1] (unclamped)
    config: GuidanceConfig
    sketch_generators: Sequence[torch.Generator]  # one per row, a stream apart from the noise
    renoise_generators: Sequence[torch.Generator] = ()  # one per row, the projection's re-noise stream


RENOISE_STREAM = "jepa-renoise"  # the name of each row's re-noise stream (project: renoise)


def sketch_seed(seed: int) -> int:
    """The seed of a row's sketch stream: derived from the row seed, apart from its noise stream."""
    return stream_seed("jepa-sketch", seed)


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
        grad = linf_normalized(grad)
    return _controlled(guidance, grad), model_output.detach()


def _controlled(guidance: JepaGuidance, grad: torch.Tensor) -> torch.Tensor:
    """The direction a control moves along instead of g, at g's L2 norm row by row (docs/method.md, 'Controls'):
    ``ascend`` is -g; ``random`` a Gaussian direction from the row's sketch stream, rescaled to |g|."""
    if guidance.config.direction == "ascend":
        return -grad
    if guidance.config.direction == "random":
        noise = randn_tensor(grad.shape, generator=list(guidance.sketch_generators), device=grad.device, dtype=grad.dtype)
        norms = grad.flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1).clamp_min(L_INF_FLOOR)
        return noise * per_row(norms, grad)
    return grad


def push_scale(config: GuidanceConfig, schedule: NoiseSchedule, t: int, t_prev: int) -> float:
    """The push per unit of g: eta (constant) or eta * beta-tilde_t (variance), times the interval when rescaled
    (docs/method.md, 'Schedules')."""
    scale = config.eta * (config.interval if config.rescale_interval else 1)
    if config.schedule == "variance":
        scale = scale * posterior_variance(schedule, t, t_prev).item()
    return scale


def guidance_push(
    guidance: JepaGuidance,
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x: torch.Tensor,
    t: int,
    t_prev: int,
    memory: SketchMemory | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(push, network output at x_t): the displacement a guided step subtracts, per row, detached.

    ``memory`` (warm start, whole batch as one micro-batch) is passed to the objective, which starts its
    sketch from it and updates it.
    """
    direction, model_output = guidance_direction(guidance, denoiser, schedule, x, t,
                                                 None if memory is None else [memory])
    return push_scale(guidance.config, schedule, t, t_prev) * direction, model_output


def projected_update(guidance: JepaGuidance, sampler: Sampler, x: torch.Tensor, t: int, t_prev: int,
                     model_output: torch.Tensor | None, push: torch.Tensor) -> torch.Tensor:
    """x_{t_prev} by the manifold-constrained step (docs/method.md, 'Manifold-constrained step'): the clean
    estimate moved by the push, re-noised to t (the row's re-noise stream), then the sampler's update from
    there, whose denoiser call is the one extra call."""
    if model_output is None:
        with torch.no_grad():
            model_output = sampler.denoiser(x, t)
    x0_hat, _ = predict_clean(sampler.schedule, model_output, x, t)
    x0_guided = x0_hat - push / sampler.schedule.abar(t_prev).to(x.device, x.dtype).sqrt()
    noise = randn_tensor(x.shape, generator=list(guidance.renoise_generators), device=x.device, dtype=x.dtype)
    return sampler.update(renoise(sampler.schedule, x0_guided, t, noise), t, t_prev)


class JepaGuided(Method):
    """Methods ``jepa`` and ``jepa-reference``: guided steps compute g, pushed steps move x by the push at the
    configured placement."""

    def __init__(self, guidance: JepaGuidance):
        self.guidance = guidance

    @classmethod
    def check_work(cls, config: SamplingConfig, model: DiffusionModel, encoder: JepaEncoder | None) -> None:
        if encoder is None:
            raise ValueError(f"method {config.method!r} guides with a JEPA encoder: pass encoder=load_encoder(...)")
        check_rank(config.guidance.k, config.guidance.oversample, encoder.embed_dim, 3 * encoder.input_size**2)
        if config.guidance.gradient == "tweedie" and model.scheduler_config.get("prediction_type") == "sample":
            raise ValueError("guidance.gradient 'tweedie' holds the network output constant, and this model predicts the "
                             "clean sample itself, so the gradient would vanish: use gradient 'full'")

    @classmethod
    def build(cls, config: SamplingConfig, model: DiffusionModel, items: Sequence[WorkItem],
              encoder: JepaEncoder | None) -> JepaGuided:
        return cls(JepaGuidance(
            encoder=encoder,
            objective=get_objective(config.objective),
            decode=model.guidance_decode,
            config=config.guidance,
            sketch_generators=[torch.Generator().manual_seed(sketch_seed(item.seed)) for item in items],
            renoise_generators=[torch.Generator().manual_seed(stream_seed(RENOISE_STREAM, item.seed)) for item in items],
        ))

    def start(self, x: torch.Tensor, schedule: NoiseSchedule) -> tuple[torch.Tensor, NoiseSchedule]:
        """Which steps are guided and pushed (docs/method.md, 'Deferral and interval'), fresh memories."""
        config, total = self.guidance.config, len(schedule.timesteps)
        self.guided, self.pushed = config.guided_steps(total), config.pushed_steps(total)
        self.memories = None
        if config.warm_start:
            self.memories = [SketchMemory() for _ in range(math.ceil(x.shape[0] / (config.micro_batch or x.shape[0])))]
        self.steps_guided, self.direction = 0, None
        return x, schedule

    def step(self, sampler: Sampler, s: int, x: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        model_output = None
        if self.guided[s]:
            self.direction, model_output = guidance_direction(
                self.guidance, sampler.denoiser, sampler.schedule, x, t, self.memories)
            self.steps_guided += 1
        if not self.pushed[s]:
            return sampler.update(x, t, t_prev, model_output)
        # a guided step, or one between guided steps that reuses the last direction
        push = push_scale(self.guidance.config, sampler.schedule, t, t_prev) * self.direction
        if self.guidance.config.project == "renoise":
            return projected_update(self.guidance, sampler, x, t, t_prev, model_output, push)
        if self.guidance.config.placement == "pre-step":
            return sampler.update(x - push, t, t_prev)
        return sampler.update(x, t, t_prev, model_output, shift=push)

