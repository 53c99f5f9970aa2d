"""SIGReg: Sketched Isotropic Gaussian Regularization (Balestriero & LeCun, 2025, LeJEPA).

Notation: Z (N, D) a batch of embeddings; A (D, M) M random unit directions, drawn afresh at every
call (each training step); z_m = Z a_m the m-th 1-D slice. Each slice is tested for N(0, 1) with
the Epps-Pulley statistic, which compares its empirical characteristic function with the Gaussian's:

  EP(z) = N * int |phi_N(t) - phi(t)|^2 w(t) dt,   phi_N(t) = 1/N sum_n exp(i t z_n),
  phi(t) = w(t) = exp(-t^2 / 2),   |phi_N - phi|^2 = (mean cos(t z) - phi)^2 + (mean sin(t z))^2,

integrated by the trapezoidal rule on ``points`` values of t evenly spaced in [-T, T].
SIGReg(Z) = the mean of EP over the M slices. By Cramer-Wold, Z is isotropic Gaussian iff every
slice is N(0, 1). For z_n drawn iid from N(0, 1), E[EP] = int (1 - phi^2) w dt
= sqrt(2 pi) (1 - 1 / sqrt(3)) ~= 1.06 whatever N; a shifted, skewed or collapsed slice grows like N.
"""

from __future__ import annotations

import torch

SLICES = 256  # M, the paper's default number of directions
POINTS = 17  # quadrature points of t (the paper's 17)
T_MAX = 5.0  # t in [-T, T]; the Gaussian weight is below 4e-6 beyond


def epps_pulley(slices: torch.Tensor, t_max: float = T_MAX, points: int = POINTS) -> torch.Tensor:
    """EP of each column of ``slices`` (N, M) against N(0, 1): (M,), differentiable."""
    t = torch.linspace(-t_max, t_max, points, dtype=slices.dtype, device=slices.device)
    gaussian = torch.exp(-t ** 2 / 2)  # phi(t), also the weight w(t)
    angles = slices[..., None] * t  # (N, M, T)
    real, imaginary = angles.cos().mean(0), angles.sin().mean(0)  # the empirical characteristic function
    distance = ((real - gaussian) ** 2 + imaginary ** 2) * gaussian
    return len(slices) * torch.trapezoid(distance, t, dim=-1)


def expected_under_gaussian(t_max: float = T_MAX, points: int = POINTS) -> float:
    """E[EP] for iid N(0, 1) slices under the same quadrature: the trapezoid rule on (1 - phi^2) w."""
    t = torch.linspace(-t_max, t_max, points, dtype=torch.float64)
    return float(torch.trapezoid(torch.exp(-t ** 2 / 2) - torch.exp(-3 * t ** 2 / 2), t))


def sigreg(
    embeddings: torch.Tensor,
    generator: torch.Generator | None = None,
    slices: int = SLICES,
    t_max: float = T_MAX,
    points: int = POINTS,
) -> torch.Tensor:
    """SIGReg of a batch of embeddings (N, D): mean EP over ``slices`` random unit directions, a scalar.

    The directions come from ``generator`` (on the CPU), so a training run that passes its own
    generator resamples them each step and stays reproducible.
    """
    if embeddings.ndim != 2 or len(embeddings) < 2:
        raise ValueError(f"SIGReg needs a batch of embeddings (N >= 2, D), got shape {tuple(embeddings.shape)}")
    directions = torch.randn((embeddings.shape[1], slices), generator=generator)
    directions = (directions / directions.norm(dim=0)).to(embeddings.device, embeddings.dtype)
    return epps_pulley(embeddings @ directions, t_max, points).mean()

