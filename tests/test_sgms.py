"""Self-guided minority sampling (guidance/sgms.py; docs/method.md, 'Self-guided minority sampling'): the minority
score and its step on closed-form toys, and the method through the one entry point on a tiny class DDPM."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from diffusers import DDIMScheduler

from guidance.generate import generate_images
from guidance.methods import SamplingConfig, SgmsConfig
from guidance.models import WorkItem
from guidance.presets import load_model
from guidance.sampling import Sampler
from guidance.schedules import noise_schedule, posterior_variance, renoise_timestep
from guidance.sgms import SelfGuided, minority_score, pixel_distance
from pipeline.generate.config import load_config
from pipeline.generate.work import run_identity
from pipeline.settings import ConfigError
from tests import tiny_diffusion
from tests.conftest import GaussianDenoiser

ITEMS = [WorkItem(1, 3), WorkItem(2, 7), WorkItem(3, 1)]


def pixels(x0: torch.Tensor) -> torch.Tensor:
    return (x0 + 1) / 2


def toy_schedule(prediction_type: str = "epsilon"):
    config = dict(DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type).config)
    return noise_schedule(config, 4, "ddim", clip_sample=False)


def toy_state(seed: int = 3) -> torch.Tensor:
    return torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    return load_model("pixel-unet", tiny_diffusion.save_pixel_unet(tmp_path_factory.mktemp("sgms"), num_classes=10))


def sgms(**config) -> SamplingConfig:
    return SamplingConfig(method="sgms", steps=4, sgms=SgmsConfig(**({"tau": 1.0} | config)))


def test_the_score_vanishes_exactly_when_the_round_trip_is_exact():
    schedule = toy_schedule("sample")
    x, noise = toy_state(3), toy_state(4)
    r = renoise_timestep(schedule, 0.8)
    assert r == 800
    clean = torch.full_like(x, 0.3)  # predicts one clean sample from any input: the round trip returns it

    def constant(x_t, t):
        return clean + 0 * x_t

    exact, _ = minority_score(constant, schedule, pixels, pixel_distance, x, schedule.timesteps[1], r, noise)
    assert torch.equal(exact, torch.zeros(2, dtype=torch.float64))
    gaussian = GaussianDenoiser(toy_schedule().alphas_cumprod, data_std=0.2)
    lossy, _ = minority_score(gaussian, toy_schedule(), pixels, pixel_distance, x, schedule.timesteps[1], r, noise)
    assert (lossy > 1e-6).all(), lossy  # about 3e-5: the Gaussian posterior mean does not return x0_hat


def test_the_step_moves_up_the_minority_score():
    schedule = toy_schedule()
    denoiser = GaussianDenoiser(schedule.alphas_cumprod, data_std=0.2)
    x, t, t_prev = toy_state(3), schedule.timesteps[1], schedule.previous[1]
    seeds = [5, 6]
    method = SelfGuided(SgmsConfig(strength=0.4, tau=1.0), pixels, pixel_distance,
                        [torch.Generator().manual_seed(s) for s in seeds])
    method.start(x, schedule)
    sampler = Sampler(denoiser, schedule, [])
    g, _ = method.direction(sampler, x, t)  # the rows' first re-noise draws, as below
    noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=torch.Generator().manual_seed(s), dtype=x.dtype)
                      for s in seeds])

    def score(state):
        return minority_score(denoiser, schedule, pixels, pixel_distance, state, t,
                              renoise_timestep(schedule, 0.8), noise)[0]

    h = 0.05
    assert (score(x + h * g) > score(x)).all() and (score(x - h * g) < score(x)).all()
    # the method's step is the sampler's update plus strength * beta-tilde_t * g on the mean
    method.renoise_generators = [torch.Generator().manual_seed(s) for s in seeds]
    moved = method.step(sampler, 1, x, t, t_prev)
    expected = sampler.update(x, t, t_prev) + 0.4 * posterior_variance(schedule, t, t_prev).item() * g
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-12)


def test_strength_zero_is_unguided_bit_for_bit(class_model):
    unguided, _ = generate_images(class_model, ITEMS, SamplingConfig(method="unguided", steps=4))
    never, steps = generate_images(class_model, ITEMS, sgms(strength=0.0))
    assert steps == 0
    assert torch.equal(never, unguided)
    guided, steps = generate_images(class_model, ITEMS, sgms(strength=50.0))
    assert steps == 4
    assert (guided - unguided).abs().max() > 1e-3  # the guidance moves the samples


def test_a_batch_equals_single_rows_and_seeds_reproduce(class_model):
    config, items = sgms(strength=50.0), ITEMS[:2]
    batched, _ = generate_images(class_model, items, config)
    singles = torch.cat([generate_images(class_model, [item], config)[0] for item in items])
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-4)  # fp32 batching noise, amplified by the strength
    again, _ = generate_images(class_model, items[:1], config)
    assert torch.equal(again, singles[:1])
    reseeded, _ = generate_images(class_model, [dataclasses.replace(items[0], seed=99)], config)
    assert (reseeded - singles[:1]).abs().max() > 1e-3


def test_deferral_chooses_the_guided_steps(class_model):
    assert SgmsConfig(tau=0.5).guided_steps(4) == [False, False, True, True]
    _, steps = generate_images(class_model, ITEMS[:1], sgms(strength=1.0, tau=0.5))
    assert steps == 2


@pytest.mark.parametrize("change,message", [
    (dict(strength=-1.0), "sgms.strength must be a finite number >= 0, got -1.0"),
    (dict(renoise=0.0), "sgms.renoise must be in (0, 1]"),
    (dict(distance="lpip"), "sgms.distance must be one of pixels, lpips, got 'lpip'"),
    (dict(distance="lpips"), "sgms.distance lpips reads local weights: set sgms.lpips_weights"),
    (dict(lpips_weights="lpips"), "sgms.lpips_weights is read only with sgms.distance lpips (distance is 'pixels')"),
    (dict(tau=1.5), "sgms.tau must be in [0, 1]"),
])
def test_bad_settings_name_the_key(change, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        SgmsConfig(**change)


def test_the_job_config_reads_the_section_and_the_run_identity_covers_it_for_sgms_only():
    config = load_config(None, ["sampling.method=sgms", "sampling.sgms.strength=0.2", "model.dtype=float32"])
    assert config.sampling.sgms.strength == 0.2 and config.sampling.guides and config.sampling.objective is None
    with pytest.raises(ConfigError, match=re.escape("sgms.renoise must be in (0, 1]")):
        load_config(None, ["sampling.sgms.renoise=2"])

    def identity(method: str, strength: float) -> dict:
        sampling = dataclasses.replace(config.sampling, method=method, sgms=SgmsConfig(strength=strength))
        return run_identity(dataclasses.replace(config, sampling=sampling))

    assert identity("sgms", 0.2) != identity("sgms", 0.3)
    assert identity("jepa", 0.2) == identity("jepa", 0.3)
    assert identity("sgms", 0.2)["sampling"]["guidance"] == {"k": config.sampling.guidance.k}
