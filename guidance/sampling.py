"""The reverse process as a plain function over (denoiser, x_T, schedule), in the spirit of
k-diffusion's samplers: the loop knows a denoiser and a schedule only.

Words: a *step* is one sampled pair (t, t_prev) of the schedule's T steps, s = 0 the noisiest; the
sampler's *update* takes x_t to x_{t_prev} (docs/method.md, 'Placements'). A ``Method`` owns
everything else: ``start`` may change the initial noise and the schedule, ``step`` wraps each
step's update, and the method keeps its own state (memories, last direction, ``steps_guided``).
A new method is one new module with a ``Method`` subclass plus one row in ``methods.METHODS``
(its light facts: objective, whether it guides, its config sections, its config checks): the loop,
the checks and the Ray actor stay as they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

from guidance.models import Denoiser
from guidance.schedules import NoiseSchedule, update

if TYPE_CHECKING:
    from guidance.encoders import JepaEncoder
    from guidance.methods import SamplingConfig
    from guidance.models import DiffusionModel, WorkItem


L_INF_FLOOR = 1e-12  # avoids 0 / 0 when a sample's gradient vanishes


def stream_seed(stream: str, seed: int) -> int:
    """The seed of a row's named random stream (a guidance method's own draws), derived from the row seed
    and apart from its noise stream."""
    return int.from_bytes(hashlib.sha256(f"{stream}:{seed}".encode()).digest()[:8], "big") >> 1


def per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped to broadcast over ``like`` (B, ...)."""
    return values.view(-1, *[1] * (like.ndim - 1))


def linf_normalized(grad: torch.Tensor) -> torch.Tensor:
    """g / max_j |g_j| per row (L-inf normalisation; docs/method.md, 'Guided step')."""
    return grad / per_row(grad.abs().flatten(1).amax(1).clamp_min(L_INF_FLOOR), grad)


@dataclass(frozen=True)
class Sampler:
    """The model's own sampler: one update x_t -> x_{t_prev}, its noise from each row's generator."""

    denoiser: Denoiser
    schedule: NoiseSchedule
    generators: Sequence[torch.Generator]
    ddim_eta: float = 0.0

    def update(self, x: torch.Tensor, t: int, t_prev: int, model_output: torch.Tensor | None = None,
               shift: torch.Tensor | None = None) -> torch.Tensor:
        """x_{t_prev}: mean - shift + std * z. ``model_output`` at x_t is reused when given, else computed
        without a graph; ``shift`` (a posterior-mean push) is subtracted before the noise."""
        if model_output is None:
            with torch.no_grad():
                model_output = self.denoiser(x, t)
        move = update(self.schedule, model_output, x, t, t_prev, self.ddim_eta)
        x = move.mean if shift is None else move.mean - shift
        if move.draws_noise:
            x = x + move.std * randn_tensor(x.shape, generator=list(self.generators), device=x.device, dtype=x.dtype)
        return x


class Method:
    """A sampling method: the plain sampler unless a subclass changes ``start`` or ``step``.

    ``build`` makes one per batch from the run's config; its state lives for one trajectory.
    """

    steps_guided: int = 0  # how many steps ran guidance in the last trajectory

    @classmethod
    def check_work(cls, config: SamplingConfig, model: DiffusionModel, encoder: JepaEncoder | None) -> None:
        """Refuse a model or encoder this method cannot use, before sampling (generate.check_work calls it)."""

    @classmethod
    def build(cls, config: SamplingConfig, model: DiffusionModel, items: Sequence[WorkItem],
              encoder: JepaEncoder | None) -> Method:
        """The method for one batch of ``items``."""
        return cls()

    def start(self, x: torch.Tensor, schedule: NoiseSchedule) -> tuple[torch.Tensor, NoiseSchedule]:
        """The initial noise and the schedule the loop runs (unchanged here)."""
        return x, schedule

    def step(self, sampler: Sampler, s: int, x: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """x_{t_prev} from x_t at step s: the sampler's update."""
        return sampler.update(x, t, t_prev)


def sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    *,
    ddim_eta: float = 0.0,
    method: Method | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the reverse process from x_T with ``method`` (the plain sampler when None); returns x_0."""
    method = method or Method()
    x, schedule = method.start(x, schedule)
    sampler = Sampler(denoiser, schedule, generators, ddim_eta)
    pairs = list(zip(schedule.timesteps, schedule.previous))
    for s, (t, t_prev) in enumerate(tqdm(pairs, desc="sampling", unit="step", disable=not progress)):
        x = method.step(sampler, s, x, t, t_prev)
    return x
