"""The cheaper-guidance levers (docs/method.md, 'Cheaper guidance'): each off by default, each exact where it claims to be."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers import AutoencoderTiny

from guidance.generate import generate_images
from guidance.jepa_guidance import JepaGuidance, guidance_direction, push_scale, sketch_seed
from guidance.methods import GuidanceConfig, SamplingConfig
from guidance.models import WorkItem
from guidance.objectives import get_objective
from guidance.presets import load_model
from guidance.schedules import noise_schedule, posterior_variance, predict_clean
from tests import tiny_diffusion
from tests.conftest import assert_pinned

ITEMS = [WorkItem(1, 3), WorkItem(2, 7), WorkItem(3, 0), WorkItem(4, 5)]


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    return load_model("pixel-unet", tiny_diffusion.save_pixel_unet(tmp_path_factory.mktemp("cost"), num_classes=10))


def sample(model, encoder, **guidance):
    config = SamplingConfig(method="jepa", steps=4, guidance=GuidanceConfig(**{"tau": 1.0, "eta": 0.3, **guidance}))
    images, steps_guided = generate_images(model, ITEMS, config, encoder)
    return images, steps_guided


def guidance_for(model, encoder, **config) -> JepaGuidance:
    return JepaGuidance(encoder=encoder, objective=get_objective("rsvd"), decode=model.decode,
                        config=GuidanceConfig(**config),
                        sketch_generators=[torch.Generator().manual_seed(sketch_seed(i.seed)) for i in ITEMS])


class CountingDenoiser:
    """The real denoiser, counting the calls made with a graph (x_t requiring grad)."""

    def __init__(self, denoiser):
        self.denoiser, self.with_graph = denoiser, 0

    def __call__(self, x, t):
        self.with_graph += torch.is_grad_enabled() and x.requires_grad
        return self.denoiser(x, t)


def test_the_levers_are_off_by_default():
    config = GuidanceConfig()
    assert (config.gradient, config.micro_batch, config.rescale_interval, config.reuse_direction) == \
        ("full", None, False, False)


# The whole batch's guided samples, pinned; unguided (eta 0) they would move by 0.34.
WHOLE = {False: [0.0, 0.779827, 0.803191, 0.669583, 0.453796, 0.622549, 0.472099, 0.895388, 1.0],
         True: [0.0, 0.766054, 0.796158, 0.681627, 0.44919, 0.62507, 0.480693, 0.896428, 1.0]}


@pytest.mark.parametrize("warm_start", [False, True])
def test_micro_batches_sample_what_the_whole_batch_samples(class_model, tiny_encoder, warm_start):
    whole, guided = sample(class_model, tiny_encoder, warm_start=warm_start)
    assert_pinned(whole, WHOLE[warm_start])
    for size in (1, 3):  # 3 leaves a ragged last chunk
        chunked, chunked_guided = sample(class_model, tiny_encoder, warm_start=warm_start, micro_batch=size)
        assert chunked_guided == guided == 4
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_tweedie_gradient_is_the_clean_estimate_gradient_through_tweedie_alone(class_model, tiny_encoder):
    """g = (1 / sqrt(abar_t)) * d JS_bar / d x0_hat for an epsilon model, with the network output held fixed."""
    schedule = noise_schedule(class_model.scheduler_config, 4, "ddim")
    t = schedule.timesteps[1]
    x = torch.randn((len(ITEMS), *class_model.sample_shape), generator=torch.Generator().manual_seed(0))
    denoiser = CountingDenoiser(class_model.denoiser(ITEMS, 1.0))
    got, _ = guidance_direction(guidance_for(class_model, tiny_encoder, gradient="tweedie", normalize=False),
                                denoiser, schedule, x, t)
    assert denoiser.with_graph == 0  # no denoiser graph, hence no denoiser backward

    with torch.no_grad():
        x0_hat, _ = predict_clean(schedule, class_model.denoiser(ITEMS, 1.0)(x, t), x, t)
    image = class_model.decode(x0_hat).clamp(0, 1).float().requires_grad_(True)
    objective = guidance_for(class_model, tiny_encoder)
    value = objective.objective(tiny_encoder, image, 9, 2, 2, generator=objective.sketch_generators)
    (grad_image,) = torch.autograd.grad(value.sum(), image)
    decode_jacobian = torch.autograd.functional.vjp(lambda z: class_model.decode(z).clamp(0, 1), x0_hat, grad_image)[1]
    torch.testing.assert_close(got, decode_jacobian / schedule.abar(t) ** 0.5, rtol=1e-5, atol=1e-8)

    denoiser = CountingDenoiser(class_model.denoiser(ITEMS, 1.0))
    full, _ = guidance_direction(guidance_for(class_model, tiny_encoder, normalize=False), denoiser, schedule, x, t)
    assert denoiser.with_graph == 1
    assert_pinned(full,  # through Tweedie alone (the denoiser's Jacobian the identity) it would move by 0.30
                  [0.012276, -0.299634, 0.03832, -0.253788, -0.071776, 0.193183, 0.123321, 0.110634, -0.082845])


def test_interval_rescaled_multiplies_the_step_by_the_interval(class_model):
    schedule = noise_schedule(class_model.scheduler_config, 10, "ddim")
    t, t_prev = schedule.timesteps[4], schedule.previous[4]
    assert push_scale(GuidanceConfig(eta=0.3, interval=3), schedule, t, t_prev) == pytest.approx(0.3)
    assert push_scale(GuidanceConfig(eta=0.3, interval=3, rescale_interval=True), schedule, t, t_prev) == pytest.approx(0.9)
    variance = posterior_variance(schedule, t, t_prev).item()
    assert push_scale(GuidanceConfig(eta=0.3, interval=2, rescale_interval=True, schedule="variance"),
                     schedule, t, t_prev) == pytest.approx(0.6 * variance)


def test_reuse_direction_pushes_every_step_after_the_first_guided_one():
    config = GuidanceConfig(tau=0.8, interval=3, reuse_direction=True)
    assert config.guided_steps(10) == [False, False, True, False, False, True, False, False, True, False]
    assert config.pushed_steps(10) == [False, False] + [True] * 8
    assert GuidanceConfig(tau=0.8, interval=3).pushed_steps(10) == config.guided_steps(10)
    assert GuidanceConfig(tau=0.0, reuse_direction=True).pushed_steps(4) == [False] * 4


def test_reuse_direction_calls_the_encoder_only_on_guided_steps(class_model, tiny_encoder):
    calls = []
    hook = tiny_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        skipped, _ = sample(class_model, tiny_encoder, interval=2)
        plain = len(calls)
        calls.clear()
        reused, guided = sample(class_model, tiny_encoder, interval=2, reuse_direction=True)
        assert len(calls) == plain > 0 and guided == 2
    finally:
        hook.remove()
    assert_pinned(reused,  # pushed only on the guided steps (as `skipped` is) it would move by 0.17
                  [0.191606, 0.972482, 0.720136, 0.509899, 0.359115, 0.478682, 0.606095, 0.950043, 1.0])


def test_tweedie_refused_for_a_model_that_predicts_the_clean_sample(class_model, tiny_encoder):
    model = copy.copy(class_model)
    model.scheduler_config = {**class_model.scheduler_config, "prediction_type": "sample"}
    with pytest.raises(ValueError, match="gradient 'tweedie' holds the network output constant"):
        sample(model, tiny_encoder, gradient="tweedie")


@pytest.mark.parametrize("fields, message", [
    ({"gradient": "exact"}, "guidance.gradient must be one of full, tweedie"),
    ({"micro_batch": 0}, "guidance.micro_batch must be an integer >= 1 or null"),
    ({"micro_batch": 2.5}, "guidance.micro_batch must be an integer >= 1 or null"),
    ({"rescale_interval": "yes"}, "guidance.rescale_interval must be true or false"),
    ({"rescale_interval": True, "reuse_direction": True}, "choose one"),
])
def test_bad_lever_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(GuidanceConfig(), **fields)


@pytest.fixture(scope="module")
def sd_with_taesd(tmp_path_factory):
    """The tiny SD pipeline, and a tiny random AutoencoderTiny saved beside it."""
    root = tmp_path_factory.mktemp("taesd")
    sd = tiny_diffusion.save_sd(root / "sd", root / "scratch")
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), upsampling_scaling_factor=2, latent_channels=4).save_pretrained(root / "taesd")
    return sd, root / "taesd"


PROMPTED = [WorkItem(1, prompt="a photo of a cat"), WorkItem(2, prompt="a red car")]


def test_a_cheap_decoder_decodes_inside_guidance_only(sd_with_taesd, tiny_encoder):
    sd_folder, taesd = sd_with_taesd
    plain, cheap = load_model("sd", sd_folder), load_model("sd", sd_folder, guidance_decoder=taesd)
    calls = []
    hook = cheap.guidance_vae.decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        unguided = SamplingConfig(method="unguided", steps=3, cfg_scale=7.5)
        torch.testing.assert_close(generate_images(cheap, PROMPTED, unguided)[0], generate_images(plain, PROMPTED, unguided)[0])
        assert calls == []  # the final image is decoded by the model's own VAE
        guided = SamplingConfig(method="jepa", steps=3, cfg_scale=7.5, guidance=GuidanceConfig(tau=1.0))
        with_cheap, steps = generate_images(cheap, PROMPTED, guided, tiny_encoder)
        assert len(calls) == steps == 3  # one cheap decode per guided step
        assert_pinned(with_cheap,  # guided through the model's own VAE it would move by 0.049
                      [0.471431, 0.438439, 0.378501, 0.434746, 0.384044, 0.426604, 0.462413, 0.548906, 0.570991])
    finally:
        hook.remove()


def test_a_cheap_decoder_is_refused_where_it_cannot_serve(sd_with_taesd, tmp_path):
    sd_folder, taesd = sd_with_taesd
    with pytest.raises(ValueError, match="this model samples pixels"):
        load_model("pixel-unet", tiny_diffusion.save_pixel_unet(tmp_path / "pixel"), guidance_decoder=taesd)
    with pytest.raises(FileNotFoundError, match="folder not found"):
        load_model("sd", sd_folder, guidance_decoder=tmp_path / "missing")
    with pytest.raises(ValueError, match="holds a AutoencoderKL, not an AutoencoderTiny"):
        load_model("sd", sd_folder, guidance_decoder=sd_folder / "vae")
    AutoencoderTiny(encoder_block_out_channels=(8,), decoder_block_out_channels=(8,), num_encoder_blocks=(1,),
                    num_decoder_blocks=(1,), latent_channels=3).save_pretrained(tmp_path / "three")
    with pytest.raises(ValueError, match="decodes 3-channel latents, but this model's have 4"):
        load_model("sd", sd_folder, guidance_decoder=tmp_path / "three")


def test_the_benchmark_compares_guidance_directions_through_two_decoders(sd_with_taesd, tiny_encoder):
    """benchmarks/bench_guided_cost.py's TAESD check (run only with real weights): itself it matches
    exactly, a different decoder it does not, one cosine per guided step and row."""
    from benchmarks.bench_guided_cost import decoder_direction_cosines

    sd_folder, taesd = sd_with_taesd
    cheap = load_model("sd", sd_folder, guidance_decoder=taesd)
    config = GuidanceConfig(tau=1.0, gradient="tweedie")
    same = decoder_direction_cosines(cheap, PROMPTED, tiny_encoder, config, 3, 7.5, cheap.decode, cheap.decode)
    other = decoder_direction_cosines(cheap, PROMPTED, tiny_encoder, config, 3, 7.5, cheap.decode, cheap.guidance_decode)
    assert len(same) == len(other) == 3 * len(PROMPTED)
    assert min(same) > 1 - 1e-9
    assert max(other) < 0.99
