"""The guided sampler's controls and its noise window (docs/method.md, 'Controls', 'Deferral and interval')."""

from __future__ import annotations

import pytest
import torch

from guidance.generate import generate_images
from guidance.jepa_guidance import JepaGuidance, guidance_direction, sketch_seed
from guidance.methods import GuidanceConfig, SamplingConfig
from guidance.models import WorkItem
from guidance.objectives import get_objective
from guidance.presets import load_model
from guidance.schedules import noise_schedule
from tests import tiny_diffusion

ITEMS = [WorkItem(1, 3), WorkItem(2, 7), WorkItem(3, 0)]


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    return load_model("pixel-unet", tiny_diffusion.save_pixel_unet(tmp_path_factory.mktemp("controls"), num_classes=10))


def direction(model, encoder, items=ITEMS, **config):
    schedule = noise_schedule(model.scheduler_config, 4, "ddim")
    x = torch.cat([torch.randn((1, *model.sample_shape), generator=torch.Generator().manual_seed(i.seed)) for i in items])
    guidance = JepaGuidance(encoder=encoder, objective=get_objective("rsvd"), decode=model.decode,
                            config=GuidanceConfig(**config),
                            sketch_generators=[torch.Generator().manual_seed(sketch_seed(i.seed)) for i in items])
    return guidance_direction(guidance, model.denoiser(items, 1.0), schedule, x, schedule.timesteps[1])[0]


def test_ascend_is_the_reversed_direction_at_the_same_state(class_model, tiny_encoder):
    descend = direction(class_model, tiny_encoder)
    torch.testing.assert_close(direction(class_model, tiny_encoder, direction="ascend"), -descend)
    assert descend.abs().flatten(1).amax(1).allclose(torch.ones(len(ITEMS)))  # L-inf normalised


def test_random_keeps_each_rows_norm_and_draws_from_the_rows_own_stream(class_model, tiny_encoder):
    descend = direction(class_model, tiny_encoder)
    random = direction(class_model, tiny_encoder, direction="random")
    torch.testing.assert_close(random.flatten(1).norm(dim=1), descend.flatten(1).norm(dim=1))
    cosine = torch.nn.functional.cosine_similarity(random.flatten(1), descend.flatten(1))
    assert cosine.abs().max() < 0.2  # not the JEPA direction
    torch.testing.assert_close(direction(class_model, tiny_encoder, direction="random"), random)  # same seeds, same draw
    alone = direction(class_model, tiny_encoder, items=ITEMS[1:2], direction="random")
    torch.testing.assert_close(alone, random[1:2])  # a row's draw does not depend on its batch


def test_controls_sample_away_from_the_method(class_model, tiny_encoder):
    config = dict(tau=1.0, eta=0.3)

    def images(**extra):
        return generate_images(class_model, ITEMS, SamplingConfig(method="jepa", steps=4,
                                                                  guidance=GuidanceConfig(**config, **extra)), tiny_encoder)[0]

    descend, ascend, random = images(), images(direction="ascend"), images(direction="random")
    unguided = generate_images(class_model, ITEMS, SamplingConfig(method="unguided", steps=4), tiny_encoder)[0]
    for control in (ascend, random):
        assert (control - descend).abs().amax() > 1e-2
        assert (control - unguided).abs().amax() > 1e-2


def test_tau_stop_closes_the_window_before_the_clean_end():
    assert GuidanceConfig(tau=0.8, tau_stop=0.2).guided_steps(10) == [False] * 2 + [True] * 6 + [False] * 2
    assert GuidanceConfig(tau=0.8, tau_stop=0.2, interval=2, reuse_direction=True).pushed_steps(10) == \
        [False] * 2 + [True] * 6 + [False] * 2
    assert GuidanceConfig(tau=0.8).guided_steps(10) == [False] * 2 + [True] * 8  # 0 guides to the last step


@pytest.mark.parametrize("fields, message", [
    ({"direction": "up"}, "guidance.direction must be one of descend, ascend, random"),
    ({"tau": 0.5, "tau_stop": 0.5}, r"guidance.tau_stop must be 0 or in \(0, tau = 0.5\)"),
    ({"tau_stop": -0.1}, "guidance.tau_stop must be 0 or in"),
])
def test_bad_control_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        GuidanceConfig(**fields)
