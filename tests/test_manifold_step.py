"""The manifold-constrained step, ``guidance.project: renoise`` (docs/method.md, 'Manifold-constrained step'):
a hand computation of one step, and the method through the one entry point on a tiny class DDPM."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from guidance.generate import generate_images
from guidance.jepa_guidance import RENOISE_STREAM, JepaGuided, guidance_direction, push_scale
from guidance.methods import GuidanceConfig, SamplingConfig
from guidance.models import WorkItem
from guidance.presets import load_model
from guidance.sampling import Sampler, stream_seed
from guidance.schedules import noise_schedule, predict_clean, update
from tests import tiny_diffusion

ITEMS = [WorkItem(1, 3), WorkItem(2, 7), WorkItem(3, 0)]


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    return load_model("pixel-unet", tiny_diffusion.save_pixel_unet(tmp_path_factory.mktemp("manifold"), num_classes=10))


def jepa(project: str = "renoise", **config) -> SamplingConfig:
    guidance = GuidanceConfig(**({"tau": 1.0, "eta": 0.3, "placement": "posterior-mean", "project": project} | config))
    return SamplingConfig(method="jepa", steps=4, guidance=guidance)


def test_a_step_is_the_pushed_clean_estimate_renoised_and_denoised_once(class_model, tiny_encoder):
    config = jepa()
    schedule = noise_schedule(class_model.scheduler_config, 4, "ddim")
    denoiser = class_model.denoiser(ITEMS, 1.0)
    x = torch.cat([torch.randn((1, *class_model.sample_shape), generator=torch.Generator().manual_seed(i.seed))
                   for i in ITEMS])
    s, t, t_prev = 1, schedule.timesteps[1], schedule.previous[1]
    method = JepaGuided.build(config, class_model, ITEMS, tiny_encoder)
    method.start(x, schedule)
    stepped = method.step(Sampler(denoiser, schedule, []), s, x, t, t_prev)

    # by hand, from a fresh build (the same streams): push, clean estimate, re-noise, one denoiser call, DDIM
    fresh = JepaGuided.build(config, class_model, ITEMS, tiny_encoder).guidance
    g, model_output = guidance_direction(fresh, denoiser, schedule, x, t)
    push = push_scale(config.guidance, schedule, t, t_prev) * g
    x0_hat, _ = predict_clean(schedule, model_output, x, t)
    abar_t, abar_prev = schedule.abar(t), schedule.abar(t_prev)
    x0_guided = x0_hat - push / abar_prev.sqrt()
    z = torch.cat([torch.randn((1, *x.shape[1:]), generator=torch.Generator().manual_seed(stream_seed(RENOISE_STREAM, i.seed)))
                   for i in ITEMS])
    x_renoised = abar_t.sqrt() * x0_guided + (1 - abar_t).sqrt() * z
    with torch.no_grad():
        expected = update(schedule, denoiser(x_renoised, t), x_renoised, t, t_prev, 0.0).mean
    torch.testing.assert_close(stepped, expected, rtol=0, atol=1e-5)
    unprojected = update(schedule, model_output, x, t, t_prev, 0.0).mean - push  # the same push without the projection
    assert (stepped - unprojected).abs().amax() > 1e-2


def test_the_option_changes_the_samples_and_seeds_reproduce(class_model, tiny_encoder):
    plain, steps = generate_images(class_model, ITEMS, jepa("none"), tiny_encoder)
    projected, projected_steps = generate_images(class_model, ITEMS, jepa(), tiny_encoder)
    assert steps == projected_steps == 4
    assert (projected - plain).abs().amax() > 1e-2
    again, _ = generate_images(class_model, ITEMS, jepa(), tiny_encoder)
    assert torch.equal(again, projected)
    reseeded, _ = generate_images(class_model, [dataclasses.replace(ITEMS[0], seed=99)], jepa(), tiny_encoder)
    assert (reseeded - projected[:1]).abs().amax() > 1e-2


def test_a_batch_equals_single_rows(class_model, tiny_encoder):
    config = jepa(interval=2, reuse_direction=True)  # a reused direction is projected too
    batched, _ = generate_images(class_model, ITEMS, config, tiny_encoder)
    singles = torch.cat([generate_images(class_model, [item], config, tiny_encoder)[0] for item in ITEMS])
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-4)


def test_eta_zero_is_unguided_and_the_option_needs_the_posterior_mean_placement(class_model, tiny_encoder):
    unguided, _ = generate_images(class_model, ITEMS, SamplingConfig(method="unguided", steps=4))
    never, steps = generate_images(class_model, ITEMS, jepa(eta=0.0), tiny_encoder)
    assert steps == 0 and torch.equal(never, unguided)
    with pytest.raises(ValueError, match="^guidance.project 'renoise' .* set guidance.placement: posterior-mean$"):
        GuidanceConfig(project="renoise")
    with pytest.raises(ValueError, match="^guidance.project must be one of none, renoise, got 'clamp'$"):
        GuidanceConfig(project="clamp")
