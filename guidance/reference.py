"""Reference implementations, kept only to check and measure the fast ones against.

- ``jepa_score_naive``: per image, ``torch.autograd.functional.jacobian`` + ``svdvals``.
- ``topk_log_volume_exact``: the top-k log-volume from the full Jacobian SVD; by the envelope
  theorem its gradient (Q = the exact top-k left singular vectors, held fixed) is the exact one.
- ``topk_log_volume_reference``: the authors' release, restated (docs/method.md, 'Differences from
  the released code'): one image and one sketch column at a time, J v by forward finite differences
  (step 1e-4), optionally under reduced-precision autocast. Its sketch is far from the top-k
  subspace at low precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch.autograd.functional import jacobian

from guidance.checks import check_images, check_rank, check_sketch
from guidance.jepa_score import SIGMA_FLOOR, Encoder, encoder_jacobian
from guidance.log_volume import Generators, orthonormal_columns, projected_log_volume, unit_tangents

FD_STEP = 1e-4  # the authors' finite-difference step


def jepa_score_naive(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """Exact JEPA-SCORE, one image and one Jacobian row at a time, (B,) float64."""
    check_images(images)
    scores = []
    for image in images.detach():
        rows = jacobian(lambda x: encoder(x[None])[0], image)  # (D, C, H, W)
        sigma = torch.linalg.svdvals(rows.flatten(1).double())
        scores.append(sigma.clamp_min(SIGMA_FLOOR).log().sum())
    return torch.stack(scores)


def topk_log_volume_exact(encoder: Encoder, images: torch.Tensor, k: int) -> torch.Tensor:
    """sum_{i<=k} log sigma_i(J), (B,) float64, differentiable: Q = exact top-k left singular vectors."""
    check_images(images)
    jacobians = encoder_jacobian(encoder, images)
    check_rank(k, 0, jacobians.shape[1], jacobians.shape[2])
    left = torch.linalg.svd(jacobians.double(), full_matrices=False).U[..., :k]
    return projected_log_volume(encoder, images, left.to(jacobians.dtype), k)


def topk_log_volume_reference(
    encoder: Encoder,
    images: torch.Tensor,
    k: int = 9,
    oversample: int = 2,
    power_iters: int = 2,
    generator: Generators = None,
    fd_step: float = FD_STEP,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The authors' top-k objective: sequential finite-difference sketch, then Q^T J with a graph.

    ``autocast_dtype`` (e.g. torch.float16) runs every encoder evaluation under autocast, as the
    authors' release did. Differentiable with respect to ``images`` like ``topk_log_volume``.
    """
    check_images(images)
    check_sketch(k, oversample, power_iters)
    rank = k + oversample

    def precision():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(images.device.type, dtype=autocast_dtype)

    def f(x: torch.Tensor) -> torch.Tensor:
        with precision():
            return encoder(x).to(x.dtype)

    values = []
    for index in range(images.shape[0]):
        image = images[index : index + 1]
        x = image.detach()
        with torch.no_grad():
            base = f(x)
        check_rank(k, oversample, base.shape[-1], x.numel())
        own = generator[index] if isinstance(generator, Sequence) else generator
        omega = unit_tangents(x, rank, own)[0]

        def jacobian_times(v: torch.Tensor) -> torch.Tensor:  # forward difference, one column
            with torch.no_grad():
                return ((f(x + fd_step * v[None]) - base) / fd_step)[0]

        y = torch.stack([jacobian_times(v) for v in omega], dim=1)  # (D, r)
        for _ in range(power_iters):
            q = orthonormal_columns(y)
            z = torch.stack([_pull_back(f, x, q[:, j]) for j in range(rank)], dim=1)  # (N, r)
            z = orthonormal_columns(z)
            y = torch.stack([jacobian_times(z[:, j].view_as(x[0])) for j in range(rank)], dim=1)
        basis = orthonormal_columns(y).detach()[None]
        with precision():
            values.append(projected_log_volume(encoder, image, basis, k))
    return torch.cat(values)


def _pull_back(f, x: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
    """J^T u for one image, by one backward pass, flattened to (N,)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(f(xg)[0], xg, grad_outputs=cotangent.to(x.dtype))
    return grad.flatten().to(cotangent.dtype)
