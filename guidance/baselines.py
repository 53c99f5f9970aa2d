"""The baselines as sampling methods (docs/method.md, 'Baselines'): the model's own sampler, and
boost-and-skip (Um, Kim and Ye, ICML 2025)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from guidance.sampling import Method
from guidance.schedules import NoiseSchedule

if TYPE_CHECKING:
    from collections.abc import Sequence

    from guidance.encoders import JepaEncoder
    from guidance.methods import SamplingConfig
    from guidance.models import DiffusionModel, WorkItem


class Unguided(Method):
    """Method ``unguided``: the model's own DDPM / DDIM sampler on its scheduler's timesteps."""


class BoostSkip(Method):
    """Method ``bns``: start from gamma-scaled noise and skip the first ``skip`` sampled steps."""

    def __init__(self, gamma: float, skip: int):
        self.gamma, self.skip = gamma, skip

    @classmethod
    def build(cls, config: SamplingConfig, model: DiffusionModel, items: Sequence[WorkItem],
              encoder: JepaEncoder | None) -> BoostSkip:
        return cls(config.bns.gamma, config.bns.skip)

    def start(self, x: torch.Tensor, schedule: NoiseSchedule) -> tuple[torch.Tensor, NoiseSchedule]:
        return self.gamma * x, schedule.skip(self.skip)
