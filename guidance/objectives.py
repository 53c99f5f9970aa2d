"""The guidance objectives, selectable by name: ours and the authors' reference, for comparison."""

from __future__ import annotations

from collections.abc import Callable

import torch

from guidance.log_volume import topk_log_volume
from guidance.reference import topk_log_volume_reference

LogVolumeObjective = Callable[..., torch.Tensor]

OBJECTIVES: dict[str, LogVolumeObjective] = {
    "rsvd": topk_log_volume,  # exact J v by forward-mode AD, batched over images and sketch columns
    "reference": topk_log_volume_reference,  # the authors' finite-difference sketch, one column at a time
}


def get_objective(name: str) -> LogVolumeObjective:
    """The top-k log-volume function registered under ``name``."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid names: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
