"""JEPA guidance: the world-prior score, its randomized top-k approximation, encoders (pure PyTorch)."""

from guidance.encoders import ENCODERS, JepaEncoder, load_encoder
from guidance.jepa_score import encoder_jacobian, jepa_score
from guidance.log_volume import topk_log_volume
from guidance.objectives import OBJECTIVES, get_objective

__all__ = [
    "ENCODERS",
    "OBJECTIVES",
    "JepaEncoder",
    "encoder_jacobian",
    "get_objective",
    "jepa_score",
    "load_encoder",
    "topk_log_volume",
]
