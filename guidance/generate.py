"""The library entry point: a model, a batch of work items and a method in; images and scores out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from guidance.checks import check_rank
from guidance.encoders import JepaEncoder
from guidance.jepa_score import jepa_scores
from guidance.methods import SamplingConfig, method_class
from guidance.models import DiffusionModel, WorkItem
from guidance.sampling import sample
from guidance.schedules import noise_schedule


@dataclass(frozen=True)
class GeneratedSample:
    """One finished row."""

    image: np.ndarray  # uint8 (H, W, 3)
    jepa_score: float  # exact JEPA-SCORE of the final uint8 image under the run's encoder
    topk_score: float  # exact top-k log-volume of that image at the run's guidance k (the same SVD)
    embedding: np.ndarray  # float32 (D,): the encoder's CLS embedding of the final image
    steps_guided: int  # how many sampling steps ran the method's guidance


def check_work(model: DiffusionModel, items: Sequence[WorkItem], config: SamplingConfig,
               encoder: JepaEncoder | None) -> None:
    """Refuse work this model, method and encoder cannot do (ValueError naming the fix), before sampling."""
    if not items:
        raise ValueError("items is empty: pass at least one WorkItem")
    model.check(items, config.cfg_scale)
    method_class(config.method).check_work(config, model, encoder)


def generate_images(
    model: DiffusionModel,
    items: Sequence[WorkItem],
    config: SamplingConfig,
    encoder: JepaEncoder | None = None,
    *,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Sample one image per work item: ((B, 3, H, W) float images in [0, 1], guided step count).

    Row b's initial noise and every stochastic step come from ``torch.Generator().manual_seed(seed_b)``
    (CPU generators, as diffusers recommends), so a row's image does not depend on the rest of the
    batch. JEPA methods need ``encoder`` (on the model's device).
    """
    check_work(model, items, config, encoder)
    overrides = {"timestep_spacing": config.timestep_spacing} if config.timestep_spacing else {}
    schedule = noise_schedule(model.scheduler_config, config.steps, config.sampler, **overrides)
    method = method_class(config.method).build(config, model, items, encoder)
    generators = [torch.Generator().manual_seed(item.seed) for item in items]
    x = randn_tensor((len(items), *model.sample_shape), generator=generators, device=model.device, dtype=model.dtype)
    x0 = sample(model.denoiser(items, config.cfg_scale), x, schedule, generators,
                ddim_eta=config.ddim_eta, method=method, progress=progress)
    with torch.no_grad():
        return model.decode(x0).clamp(0, 1).float(), method.steps_guided


def generate(
    model: DiffusionModel,
    items: Sequence[WorkItem],
    config: SamplingConfig,
    encoder: JepaEncoder,
    *,
    progress: bool = False,
) -> list[GeneratedSample]:
    """Generate one image per work item with ``config.method``; score each with the exact JEPA-SCORE
    and the exact top-k log-volume at ``config.guidance.k``."""
    check_rank(config.guidance.k, 0, encoder.embed_dim, 3 * encoder.input_size**2)  # the top-k score, before sampling
    images, steps_guided = generate_images(model, items, config, encoder, progress=progress)
    broken = (~torch.isfinite(images).flatten(1).all(1)).nonzero().flatten().tolist()
    if broken:  # caught before uint8 quantisation would hide it
        raise FloatingPointError(f"non-finite image for seeds {[items[b].seed for b in broken]}")
    pixels = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    stored = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # score what is stored: the uint8 image
    encoder_input = encoder.resize(stored.to(encoder.mean.device))
    with torch.no_grad():
        embeddings = encoder(encoder_input).cpu().numpy().astype(np.float32)
    scores, topk = (values.tolist() for values in jepa_scores(encoder, encoder_input, config.guidance.k))
    return [
        GeneratedSample(pixels[b], scores[b], topk[b], embeddings[b], steps_guided) for b in range(len(items))
    ]
