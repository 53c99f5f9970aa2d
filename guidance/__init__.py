"""JEPA guidance: the world-prior score, its randomized top-k approximation, encoders, and the
JEPA-guided samplers (pure PyTorch over diffusers models).

The names below load on first use, so the light modules (``guidance.methods``, ``guidance.presets``'
table and checks, ``guidance.encoder_specs``) import without torch: configs and preflight checks answer fast.
"""

from __future__ import annotations

import importlib
import sys
import types

_HOMES = {
    "ENCODERS": "guidance.encoder_specs",
    "JepaEncoder": "guidance.encoders",
    "load_encoder": "guidance.encoders",
    "GeneratedSample": "guidance.generate",
    "generate": "guidance.generate",
    "generate_images": "guidance.generate",
    "encoder_jacobian": "guidance.jepa_score",
    "jepa_score": "guidance.jepa_score",
    "jepa_scores": "guidance.jepa_score",
    "topk_log_volume": "guidance.log_volume",
    "METHODS": "guidance.methods",
    "BoostSkipConfig": "guidance.methods",
    "GuidanceConfig": "guidance.methods",
    "SamplingConfig": "guidance.methods",
    "DiffusionModel": "guidance.models",
    "WorkItem": "guidance.models",
    "OBJECTIVES": "guidance.objectives",
    "get_objective": "guidance.objectives",
    "PRESETS": "guidance.presets",
    "load_model": "guidance.presets",
}
__all__ = sorted(_HOMES)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _HOMES and isinstance(value, types.ModuleType):
            return  # a submodule named like its function (jepa_score, generate): the function keeps the name
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'guidance' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
