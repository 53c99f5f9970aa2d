"""JEPA guidance: the world-prior score, its randomized top-k approximation, encoders, and the
JEPA-guided samplers (pure PyTorch over diffusers models)."""

from guidance.encoders import ENCODERS, JepaEncoder, load_encoder
from guidance.generate import GeneratedSample, generate, generate_images
from guidance.jepa_score import encoder_jacobian, jepa_score, jepa_scores
from guidance.log_volume import topk_log_volume
from guidance.methods import METHODS, BoostSkipConfig, GuidanceConfig, SamplingConfig
from guidance.models import DiffusionModel, WorkItem
from guidance.objectives import OBJECTIVES, get_objective
from guidance.presets import PRESETS, load_model

__all__ = [
    "ENCODERS",
    "METHODS",
    "OBJECTIVES",
    "PRESETS",
    "BoostSkipConfig",
    "DiffusionModel",
    "GeneratedSample",
    "GuidanceConfig",
    "JepaEncoder",
    "SamplingConfig",
    "WorkItem",
    "encoder_jacobian",
    "generate",
    "generate_images",
    "get_objective",
    "jepa_score",
    "jepa_scores",
    "load_encoder",
    "load_model",
    "topk_log_volume",
]
