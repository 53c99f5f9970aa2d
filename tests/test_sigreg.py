"""SIGReg (LeJEPA's Epps-Pulley statistic over random slices) and the demo encoder recipe's objective."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from guidance.sigreg import epps_pulley, expected_under_gaussian, sigreg
from pipeline.demo.train import EncoderTraining, encoder_loss, train_encoder, vicreg_loss


def draws(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_quadrature_of_the_gaussian_expectation_matches_its_closed_form():
    # E[EP] = int (1 - phi^2) phi dt = sqrt(2 pi) - sqrt(2 pi / 3); 17 points on [-5, 5] get it to 1e-5.
    assert expected_under_gaussian() == pytest.approx(math.sqrt(2 * math.pi) * (1 - 1 / math.sqrt(3)), rel=1e-4)


@pytest.mark.parametrize("n", [64, 512])
def test_gaussian_slices_sit_at_the_null_expectation_whatever_the_batch(n):
    slices = torch.randn(n, 2000, generator=draws(), dtype=torch.float64)
    assert epps_pulley(slices).mean().item() == pytest.approx(expected_under_gaussian(), rel=0.08)


def test_a_collapsed_slice_costs_n_times_the_distance_of_a_point_mass():
    # All samples at 0: phi_N = 1, so EP = N * int (1 - phi)^2 phi dt, growing with N.
    t = torch.linspace(-5, 5, 17, dtype=torch.float64)
    phi = torch.exp(-t ** 2 / 2)
    for n in (10, 100):
        assert epps_pulley(torch.zeros(n, 1, dtype=torch.float64)).item() == pytest.approx(
            n * torch.trapezoid((1 - phi) ** 2 * phi, t).item(), rel=1e-12)


def test_a_skewed_slice_with_the_gaussian_mean_and_variance_is_caught():
    exponential = torch.empty(512, 50, dtype=torch.float64).exponential_(generator=draws(0)) - 1  # mean 0, var 1
    assert epps_pulley(exponential).mean().item() > 10 * expected_under_gaussian()


def test_sigreg_is_small_for_isotropic_gaussian_embeddings_and_large_otherwise():
    """Collapse and low rank, which slicing sees; (a skewed 16-D cloud sliced is near Gaussian by the CLT)."""
    n, d = 512, 16
    gaussian = torch.randn(n, d, generator=draws(1))
    all_equal = torch.ones(n, d) * torch.randn(d, generator=draws(3))
    low_rank = torch.randn(n, 2, generator=draws(4)) @ torch.randn(2, d, generator=draws(5))  # a plane in 16-D
    values = {name: sigreg(z, draws(6)).item()
              for name, z in [("gaussian", gaussian), ("all_equal", all_equal), ("low_rank", low_rank)]}
    assert values["gaussian"] < 1.5 * expected_under_gaussian(), values
    for name in ("all_equal", "low_rank"):
        assert values[name] > 10 * values["gaussian"], values


def test_directions_are_drawn_afresh_from_the_generator():
    z = torch.empty(256, 8).exponential_(generator=draws(0))
    generator = draws(1)
    first, second = sigreg(z, generator, slices=4), sigreg(z, generator, slices=4)
    assert first.item() != second.item()  # the next step sees new directions
    assert sigreg(z, draws(1), slices=4).item() == first.item()  # and the same seed the same ones


def test_sigreg_is_differentiable():
    z = torch.randn(12, 3, generator=draws(0), dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sigreg(z, draws(1), slices=5), (z,))


def test_sigreg_refuses_a_batch_of_one():
    with pytest.raises(ValueError, match="N >= 2"):
        sigreg(torch.zeros(1, 4))


def test_the_recipe_validates_its_objective_and_sigreg_settings():
    with pytest.raises(ValueError, match="vicreg, sigreg"):
        EncoderTraining(objective="simclr")
    with pytest.raises(ValueError, match="sigreg_weight"):
        EncoderTraining(objective="sigreg", sigreg_weight=1.5)
    with pytest.raises(ValueError, match="sigreg_slices"):
        EncoderTraining(sigreg_slices=0)
    a, b = torch.randn(32, 8, generator=draws(0)), torch.randn(32, 8, generator=draws(1))
    vicreg = EncoderTraining(objective="vicreg")
    assert encoder_loss(a, b, vicreg, draws()) == vicreg_loss(a, b, vicreg)
    with pytest.raises(ValueError, match="expander must be an integer width >= 0"):
        EncoderTraining(expander=-1)
    with pytest.raises(ValueError, match="augment_strength must be positive"):
        EncoderTraining(augment_strength=0)


def test_a_few_dozen_sigreg_steps_make_a_tiny_encoders_embeddings_gaussian():
    """Skewed inputs through a tiny MLP: the recipe's LeJEPA loss lowers SIGReg on held-out data."""
    torch.manual_seed(0)
    recipe = EncoderTraining(objective="sigreg", sigreg_weight=0.5, sigreg_slices=32)
    encoder = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    data = torch.empty(2000, 10).exponential_(generator=draws(0)) ** 2
    held_out = torch.empty(512, 10).exponential_(generator=draws(1)) ** 2

    def measured() -> float:
        with torch.no_grad():
            return sigreg(encoder(held_out), draws(2)).item()

    before = measured()
    optimiser = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    generator = draws(3)
    for _ in range(40):
        batch = data[torch.randint(len(data), (128,), generator=generator)]
        noise = [0.05 * torch.randn(batch.shape, generator=generator) for _ in range(2)]
        loss = encoder_loss(encoder(batch + noise[0]), encoder(batch + noise[1]), recipe, generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = measured()
    assert after < before / 5, (before, after)


def test_train_encoder_runs_the_sigreg_objective_end_to_end(tmp_path):
    recipe = EncoderTraining(output=str(tmp_path / "encoder"), objective="sigreg", embed_dim=16, depth=1, heads=2,
                             steps=3, batch_size=16, expander=32, sigreg_slices=16)
    saved = train_encoder(recipe)
    assert (saved / "model.safetensors").stat().st_size > 0 and (saved / "config.json").exists()
