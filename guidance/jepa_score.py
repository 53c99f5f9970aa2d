"""Exact JEPA-SCORE (Balestriero et al., 2025): JS(x) = sum_i log max(sigma_i(J_f(x)), 1e-6).

Notation: f the encoder, x an image (N = C*H*W pixels), J_f(x) the D x N input Jacobian,
sigma_i its singular values (all min(D, N) of them). Lower JS = rarer under the world prior.
This is the evaluation metric (D backward passes per image), not a guidance objective.
The same singular values give the exact top-k log-volume sum_{i<=k} log max(sigma_i, 1e-8), the
value the guidance objective approximates (docs/method.md, 'Top-k log-volume'), at no extra cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import vjp, vmap

from guidance.checks import check_images, check_rank

Encoder = Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) -> (B, D), each row from its own image
SIGMA_FLOOR = 1e-6  # docs/method.md, 'JEPA-SCORE': singular values are clipped at 1e-6 before the log
LOG_FLOOR = 1e-8  # docs/method.md, 'Top-k log-volume': the top-k singular values are clamped at 1e-8 before the log
JACOBIAN_BYTES = 2**30  # images per group are chosen so that their fp32 Jacobians fit in this


def encoder_jacobian(encoder: Encoder, images: torch.Tensor, chunk_size: int | None = 32) -> torch.Tensor:
    """Input Jacobians of a batch, (B, D, N), from D vmapped VJPs with one-hot cotangents.

    Row d of every image's Jacobian comes from one VJP with cotangent e_d in every batch slot,
    which is exact because each output row depends on its own image only. ``chunk_size`` bounds
    how many cotangents run at once (memory); None runs all D together.
    """
    embeddings, pullback = vjp(encoder, images.detach())
    batch, dim = embeddings.shape
    basis = torch.eye(dim, dtype=embeddings.dtype, device=embeddings.device)
    cotangents = basis.unsqueeze(1).expand(dim, batch, dim)  # cotangents[d, b] = e_d
    (rows,) = vmap(pullback, chunk_size=chunk_size)(cotangents)  # (D, B, C, H, W)
    return rows.flatten(2).transpose(0, 1)


def log_singular_volume(jacobians: torch.Tensor, floor: float = SIGMA_FLOOR) -> torch.Tensor:
    """sum_i log max(sigma_i, floor) for each (D, N) matrix of a (B, D, N) batch, in float64."""
    return singular_values(jacobians).clamp_min(floor).log().sum(-1)


def singular_values(jacobians: torch.Tensor) -> torch.Tensor:
    """All singular values of each (D, N) matrix of a (B, D, N) batch, (B, min(D, N)) float64, descending."""
    return torch.stack([torch.linalg.svdvals(jacobian.double()) for jacobian in jacobians])


@torch.no_grad()
def encoder_singular_values(
    encoder: Encoder,
    images: torch.Tensor,
    *,
    chunk_size: int | None = 32,
    max_jacobian_bytes: int = JACOBIAN_BYTES,
) -> torch.Tensor:
    """Every singular value of each image's input Jacobian, (B, min(D, N)) float64, descending.

    Images are processed in groups whose fp32 Jacobians fit in ``max_jacobian_bytes`` (at least one
    image per group); singular values are computed in float64, one image at a time.
    """
    check_images(images)
    num_pixels = images[0].numel()
    embed_dim = encoder(images[:1]).shape[-1]
    group = max(1, max_jacobian_bytes // (4 * embed_dim * num_pixels))
    return torch.cat([singular_values(encoder_jacobian(encoder, part, chunk_size)) for part in images.split(group)])


def jepa_score(encoder: Encoder, images: torch.Tensor, **options) -> torch.Tensor:
    """Exact JEPA-SCORE of each image, (B,) float64 (``options``: those of ``encoder_singular_values``)."""
    return encoder_singular_values(encoder, images, **options).clamp_min(SIGMA_FLOOR).log().sum(-1)


def jepa_scores(encoder: Encoder, images: torch.Tensor, k: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact JEPA-SCORE, exact top-k log-volume) of each image from one SVD, both (B,) float64.

    The top-k value sums the logs of the k largest of the singular values the exact score already
    computes, so it is exact (no sketch) and free; it is what ``topk_log_volume`` estimates.
    """
    sigma = encoder_singular_values(encoder, images, **options)
    check_rank(k, 0, sigma.shape[1], images[0].numel())
    return sigma.clamp_min(SIGMA_FLOOR).log().sum(-1), sigma[:, :k].clamp_min(LOG_FLOOR).log().sum(-1)
