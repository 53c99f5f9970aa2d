"""Self-guided minority sampling, SGMS (Um and Ye, ECCV 2024), as a sampling method: method ``sgms``
(docs/method.md, 'Self-guided minority sampling').

At a guided step (t, t_prev), per row, with x_t requiring grad:
  x0_hat   = Tweedie(denoiser(x_t, t), x_t)                        (with graph)
  x_r      = sqrt(abar_r) x0_hat + sqrt(1 - abar_r) z              re-noised to the fixed level r (z: the row's stream)
  x0_tilde = Tweedie(denoiser(x_r, r), x_r)                        denoised back in one step
  L        = d(decode(x0_hat), decode(x0_tilde))                   the minority score (d: pixels or LPIPS)
  g        = dL / dx_t, L-inf normalised per row                   through both denoiser calls
  x_{t_prev} = mean(x_t) + strength * beta-tilde_t * g + std * z'  up the score, at the posterior mean
A sample the model reconstructs well from heavy noise is typical to it; one it does not is a minority.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from diffusers.utils.torch_utils import randn_tensor

from guidance.lpips import shared_lpips
from guidance.models import Denoiser
from guidance.sampling import Method, Sampler, linf_normalized, stream_seed
from guidance.schedules import NoiseSchedule, posterior_variance, predict_clean, renoise, renoise_timestep

if TYPE_CHECKING:
    from guidance.encoders import JepaEncoder
    from guidance.methods import SamplingConfig, SgmsConfig
    from guidance.models import DiffusionModel, WorkItem

RENOISE_STREAM = "sgms-renoise"  # the name of each row's re-noise stream (sampling.stream_seed)


def pixel_distance(image: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per row: the stand-in for LPIPS on images too small for AlexNet."""
    return (image - other).square().flatten(1).mean(1)


def distance_for(config: SgmsConfig, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The minority score's distance by name: ``pixel_distance``, or AlexNet LPIPS from ``config.lpips_weights``
    on ``device`` (loaded once per process: guidance/lpips.py ``shared_lpips``)."""
    if config.distance == "lpips":
        return shared_lpips(config.lpips_weights, device)
    return pixel_distance


def minority_score(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    decode: Callable[[torch.Tensor], torch.Tensor],
    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: int,
    r: int,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L per row, network output at x_t): the distance between the clean estimate of x_t and its re-noised
    (to r, with ``noise``) and once-denoised copy, differentiable in ``x``."""
    model_output = denoiser(x, t)
    x0_hat, _ = predict_clean(schedule, model_output, x, t)
    x_r = renoise(schedule, x0_hat, r, noise)
    x0_tilde, _ = predict_clean(schedule, denoiser(x_r, r), x_r, r)
    return distance(decode(x0_hat).float(), decode(x0_tilde).float()), model_output


class SelfGuided(Method):
    """Method ``sgms``: in the deferral window, the posterior mean moves up the minority score's gradient."""

    def __init__(self, config: SgmsConfig, decode: Callable[[torch.Tensor], torch.Tensor],
                 distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 renoise_generators: Sequence[torch.Generator]):
        self.config, self.decode, self.distance = config, decode, distance
        self.renoise_generators = renoise_generators

    @classmethod
    def build(cls, config: SamplingConfig, model: DiffusionModel, items: Sequence[WorkItem],
              encoder: JepaEncoder | None) -> SelfGuided:
        return cls(config.sgms, model.guidance_decode, distance_for(config.sgms, model.device),
                   [torch.Generator().manual_seed(stream_seed(RENOISE_STREAM, item.seed)) for item in items])

    def start(self, x: torch.Tensor, schedule: NoiseSchedule) -> tuple[torch.Tensor, NoiseSchedule]:
        self.guided, self.steps_guided = self.config.guided_steps(len(schedule.timesteps)), 0
        return x, schedule

    def direction(self, sampler: Sampler, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, network output at x_t): the L-inf normalised gradient of the minority score at x_t, detached."""
        noise = randn_tensor(x.shape, generator=list(self.renoise_generators), device=x.device, dtype=x.dtype)
        r = renoise_timestep(sampler.schedule, self.config.renoise)
        with torch.enable_grad():
            x_t = x.detach().requires_grad_(True)
            score, model_output = minority_score(sampler.denoiser, sampler.schedule, self.decode, self.distance,
                                                 x_t, t, r, noise)
            (grad,) = torch.autograd.grad(score.sum(), x_t)
        return linf_normalized(grad), model_output.detach()

    def step(self, sampler: Sampler, s: int, x: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        if not self.guided[s]:
            return sampler.update(x, t, t_prev)
        g, model_output = self.direction(sampler, x, t)
        self.steps_guided += 1
        push = self.config.strength * posterior_variance(sampler.schedule, t, t_prev).item() * g
        return sampler.update(x, t, t_prev, model_output, shift=-push)  # mean + push: toward a higher score
