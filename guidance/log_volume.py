"""Top-k log-volume of the encoder Jacobian by randomized SVD, differentiable by the envelope theorem.

Paper section 4 (JEPA guidance); docs/method.md, 'Top-k log-volume'. Notation:
  J = J_f(x)    the D x N input Jacobian of the encoder at image x
  r = k + p     sketch width (p = oversample), q = power_iters
  Omega         r unit-norm Gaussian tangents in input space, one set per image
  Q             orthonormal D x r basis of range(J Omega) after q power iterations, DETACHED
  JS_bar        sum_{i<=k} log max(sigma_i(Q^T J), 1e-8)
Envelope theorem (docs/method.md, 'Envelope gradient'): sum_{i<=k} log sigma_i(J) =
1/2 max_Q log det(Q^T J J^T Q) over orthonormal Q; at the maximiser the gradient with Q held fixed
is exact, so no gradient flows through the power iterations, the QR or the random sketch. J v comes
from forward-mode AD (exact, no finite differences); Q^T J comes from r VJPs with a graph, so
JS_bar can be differentiated.

Warm start (docs/method.md, 'Warm start'): the rows of Q^T J are J^T Q, half a subspace iteration
towards the top-k right singular vectors. Consecutive guided steps see nearby images, so a
``SketchMemory`` keeps those rows and the next sketch starts from them instead of random tangents:
each guided step then adds one subspace iteration for the cost of a fresh sketch without power
iterations.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.func import jvp, vjp, vmap

with warnings.catch_warnings():  # torch's own JVP decompositions (loaded by the first jvp) still call torch.jit.script
    warnings.filterwarnings("ignore", r"`torch.jit.script` is deprecated", FutureWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401

from guidance.checks import check_images, check_rank, check_sketch
from guidance.jepa_score import LOG_FLOOR, Encoder

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class SketchMemory:
    """The right subspace J^T Q found by the last call, to start the next sketch from (warm start).

    Holds one set of r input-space directions per image, (B, r, C, H, W), detached. Keep one memory
    per batch of rows across the guided steps of a sampling run; it is replaced on every call.
    """

    directions: torch.Tensor | None = None

    def start(self, images: torch.Tensor, rank: int) -> torch.Tensor | None:
        """The stored directions when they fit this batch and sketch width, else None (a fresh sketch)."""
        fits = self.directions is not None and self.directions.shape == (images.shape[0], rank, *images.shape[1:])
        return self.directions.to(images.dtype) if fits else None


def unit_tangents(images: torch.Tensor, rank: int, generator: Generators = None) -> torch.Tensor:
    """Omega: (B, r, C, H, W) Gaussian tangents of unit norm, drawn image by image.

    With one generator the images draw in batch order, so a batch equals consecutive single calls;
    with a list, image b draws from generator b alone.
    """
    batch = images.shape[0]
    if isinstance(generator, Sequence):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch} images; pass one per image")
        generators = list(generator)
    else:
        generators = [generator] * batch
    omega = torch.stack([
        torch.randn(
            (rank, *images.shape[1:]), generator=g, dtype=images.dtype, device=g.device if g else images.device
        ).to(images.device)
        for g in generators
    ])
    return omega / omega.flatten(2).norm(dim=-1)[..., None, None, None]


def orthonormal_columns(matrix: torch.Tensor) -> torch.Tensor:
    """orth(): an orthonormal basis of the column space of each (.., M, r) matrix (reduced QR)."""
    return torch.linalg.qr(matrix).Q


def sketch_range(
    encoder: Encoder,
    images: torch.Tensor,
    rank: int,
    power_iters: int,
    generator: Generators = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Randomized range finder with subspace iteration (Halko et al. 2011, Alg. 4.4): Q, (B, D, r).

    Y = J Omega; q times: Y <- J orth(J^T orth(Y)); Q = orth(Y). Computed without a graph.
    ``start`` (B, r, C, H, W) replaces the random Omega (warm start); only its span matters.
    """
    x = images.detach()
    omega = unit_tangents(x, rank, generator) if start is None else start

    def jacobian_times(tangents: torch.Tensor) -> torch.Tensor:  # (B, r, C, H, W) -> (B, D, r)
        return vmap(lambda v: jvp(encoder, (x,), (v,))[1], in_dims=1, out_dims=2)(tangents)

    with torch.no_grad():
        y = jacobian_times(omega)
        if power_iters:
            _, pullback = vjp(encoder, x)
            for _ in range(power_iters):
                (z,) = vmap(pullback, in_dims=2, out_dims=1)(orthonormal_columns(y))  # J^T Q: (B, r, C, H, W)
                z = orthonormal_columns(z.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(z.shape)
                y = jacobian_times(z)
        return orthonormal_columns(y)


def projected_log_volume(encoder: Encoder, images: torch.Tensor, basis: torch.Tensor, k: int) -> torch.Tensor:
    """sum_{i<=k} log max(sigma_i(Q^T J), 1e-8), (B,) float64, with Q = ``basis`` (B, D, r) held fixed.

    Q^T J is built from r VJPs; when ``images`` requires grad (and grad mode is on) they keep their
    graph, so the value is differentiable with respect to ``images`` and whatever produced them.
    """
    return projected_rows(encoder, images, basis, k)[0]


def projected_rows(
    encoder: Encoder, images: torch.Tensor, basis: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``projected_log_volume``, the rows J^T Q detached as (B, r, C, H, W) for a warm start)."""
    differentiable = torch.is_grad_enabled() and images.requires_grad
    x = images if differentiable else images.detach().requires_grad_(True)
    with torch.enable_grad():
        embeddings = encoder(x)
        (rows,) = torch.autograd.grad(
            embeddings, x, grad_outputs=basis.permute(2, 0, 1), is_grads_batched=True, create_graph=differentiable
        )  # rows[j, b] = q_j^T J for image b: (r, B, C, H, W)
    projected = rows.flatten(2).transpose(0, 1)  # (B, r, N)
    sigma = torch.linalg.svdvals(projected.double())  # descending
    return sigma[:, :k].clamp_min(LOG_FLOOR).log().sum(-1), rows.detach().transpose(0, 1)


def topk_log_volume(
    encoder: Encoder,
    images: torch.Tensor,
    k: int = 9,
    oversample: int = 2,
    power_iters: int = 2,
    generator: Generators = None,
    memory: SketchMemory | None = None,
) -> torch.Tensor:
    """JS_bar: the randomized top-k approximation of the JEPA-SCORE, (B,) float64.

    Differentiable with respect to ``images`` through the envelope theorem (see the module doc).
    Each image's value and gradient depend on that image and its own sketch draw (or its own
    remembered directions) only. With ``memory`` the sketch starts from the directions the previous
    call left there, when they fit, and leaves this call's for the next (warm start).
    """
    check_images(images)
    check_sketch(k, oversample, power_iters)
    rank = k + oversample
    start = memory.start(images, rank) if memory is not None else None
    basis = sketch_range(encoder, images, rank, power_iters, generator, start)
    check_rank(k, oversample, basis.shape[1], images[0].numel())  # a reduced Q has min(D, r) columns
    value, rows = projected_rows(encoder, images, basis, k)
    if memory is not None:  # orthonormal, as inside the power iterations, so no direction is lost to scale
        memory.directions = orthonormal_columns(rows.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(rows.shape)
    return value
