"""The sampling core against the diffusers pipelines, and the guidance contracts every family keeps."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiTPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from guidance import jepa_score
from guidance.generate import generate, generate_images
from guidance.jepa_guidance import JepaGuidance, JepaGuided
from guidance.methods import BoostSkipConfig, GuidanceConfig, SamplingConfig
from guidance.models import WorkItem, sdxl_time_ids
from guidance.presets import PRESETS, load_model
from guidance.sampling import sample
from guidance.schedules import noise_schedule
from tests import tiny_diffusion
from tests.conftest import GaussianDenoiser, LinearEncoder, assert_pinned, feature_energy

CAT, DOG = "a photo of a cat", "a photo of a dog"
TEXT_ITEMS = [WorkItem(11, prompt=CAT), WorkItem(12, prompt=DOG)]


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {
        "pixel": tiny_diffusion.save_pixel_unet(root / "pixel"),
        "class": tiny_diffusion.save_pixel_unet(root / "class", num_classes=10),
        "dit": tiny_diffusion.save_dit(root / "dit"),
        "sd": tiny_diffusion.save_sd(root / "sd", root / "scratch_sd"),
        "sdxl": tiny_diffusion.save_sdxl(root / "sdxl", root / "scratch_sdxl"),
    }


@pytest.fixture(scope="session")
def models(folders):
    return {
        "pixel": load_model("pixel-unet", folders["pixel"]),
        "class": load_model("pixel-unet", folders["class"]),
        "dit": load_model("dit", folders["dit"]),
        "sd": load_model("sd", folders["sd"]),
        "sdxl": load_model("sdxl-base", folders["sdxl"]),
    }


# family -> (work items, cfg scale) used by the shared contracts below
CASES = {
    "pixel": ([WorkItem(1), WorkItem(2), WorkItem(3)], 1.0),
    "class": ([WorkItem(1, 3), WorkItem(2, 7), WorkItem(3, 0)], 1.0),
    "dit": ([WorkItem(1, 3), WorkItem(2, 7), WorkItem(3, 999)], 4.0),
    "sd": ([WorkItem(1, prompt=CAT), WorkItem(2, prompt=DOG), WorkItem(3, prompt="a red car")], 7.5),
    "sdxl": ([WorkItem(1, prompt=CAT), WorkItem(2, prompt=DOG), WorkItem(3, prompt="a red car")], 5.0),
}


def generators(seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def ours(model, items, encoder=None, **config):
    images, _ = generate_images(model, items, SamplingConfig(**config), encoder)
    return images.permute(0, 2, 3, 1).numpy()


# -- unguided reproduces the diffusers pipelines -------------------------------------------------

def test_ddpm_matches_ddpm_pipeline(folders, models):
    pipe = DDPMPipeline.from_pretrained(folders["pixel"])
    want = pipe(batch_size=2, generator=generators([5, 6]), num_inference_steps=6, output_type="np").images
    got = ours(models["pixel"], [WorkItem(5), WorkItem(6)], method="unguided", sampler="ddpm", steps=6)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("ddim_eta", [0.0, 0.5, 1.0])
def test_ddim_matches_ddim_pipeline(folders, models, ddim_eta):
    pipe = DDIMPipeline.from_pretrained(folders["pixel"])
    want = pipe(batch_size=2, generator=generators([5, 6]), num_inference_steps=5, eta=ddim_eta, output_type="np").images
    got = ours(models["pixel"], [WorkItem(5), WorkItem(6)], method="unguided", steps=5, ddim_eta=ddim_eta)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_dit_matches_dit_pipeline_with_classifier_free_guidance(folders, models):
    pipe = DiTPipeline.from_pretrained(folders["dit"])
    want = pipe(class_labels=[3, 7], guidance_scale=4.0, generator=generators([5, 6]), num_inference_steps=5,
                output_type="np").images
    got = ours(models["dit"], [WorkItem(5, 3), WorkItem(6, 7)], method="unguided", steps=5, cfg_scale=4.0)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_stable_diffusion_matches_its_pipeline(folders, models):
    pipe = StableDiffusionPipeline.from_pretrained(folders["sd"], safety_checker=None, requires_safety_checker=False)
    want = pipe([CAT, DOG], guidance_scale=7.5, num_inference_steps=4, generator=generators([11, 12]),
                output_type="np").images
    got = ours(models["sd"], TEXT_ITEMS, method="unguided", steps=4, cfg_scale=7.5)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_v_prediction_matches_the_pipeline(folders, models):
    """SD 2.x (768) predicts v: the same pipeline with a v-prediction scheduler config."""
    pipe = StableDiffusionPipeline.from_pretrained(folders["sd"], safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    want = pipe([CAT, DOG], guidance_scale=7.5, num_inference_steps=4, generator=generators([11, 12]),
                output_type="np").images
    model = copy.copy(models["sd"])
    model.scheduler_config = dict(pipe.scheduler.config)
    got = ours(model, TEXT_ITEMS, method="unguided", steps=4, cfg_scale=7.5)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_ddpm_fixed_large_variance_matches_the_pipeline(folders, models):
    """variance_type fixed_large: DDPM's noise has variance beta_t, not the posterior's beta-tilde_t."""
    pipe = DDPMPipeline.from_pretrained(folders["pixel"])
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, variance_type="fixed_large")
    want = pipe(batch_size=2, generator=generators([5, 6]), num_inference_steps=6, output_type="np").images
    model = copy.copy(models["pixel"])
    model.scheduler_config = dict(pipe.scheduler.config)
    got = ours(model, [WorkItem(5), WorkItem(6)], method="unguided", sampler="ddpm", steps=6)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("pipeline_class,scheduler_class", [(DDPMPipeline, DDPMScheduler), (DDIMPipeline, DDIMScheduler)])
def test_x0_prediction_matches_the_pipeline_and_keeps_the_guidance_contracts(folders, models, tiny_encoder,
                                                                            pipeline_class, scheduler_class):
    """A network that predicts the clean sample (prediction_type "sample"): unguided it samples what its
    pipeline samples; guided, a batch equals its single rows and guidance that never acts changes nothing."""
    sampler = "ddpm" if scheduler_class is DDPMScheduler else "ddim"
    pipe = pipeline_class.from_pretrained(folders["pixel"])
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, prediction_type="sample")
    want = pipe(batch_size=2, generator=generators([5, 6]), num_inference_steps=5, output_type="np").images
    model = copy.copy(models["pixel"])
    model.scheduler_config = dict(pipe.scheduler.config)
    got = ours(model, [WorkItem(5), WorkItem(6)], method="unguided", sampler=sampler, steps=5)
    np.testing.assert_allclose(got, want, atol=1e-5)

    items = CASES["pixel"][0]
    config = dict(method="jepa", sampler=sampler, steps=4, guidance=GuidanceConfig(tau=1.0, k=4))
    batched = ours(model, items, tiny_encoder, **config)
    singles = np.concatenate([ours(model, [item], tiny_encoder, **config) for item in items])
    np.testing.assert_allclose(batched, singles, atol=1e-5)
    never = ours(model, items, tiny_encoder, **(config | dict(guidance=GuidanceConfig(tau=0.0))))
    assert np.array_equal(never, ours(model, items, method="unguided", sampler=sampler, steps=4))


def test_sdxl_matches_its_pipeline(folders, models):
    pipe = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"])
    want = pipe([CAT, DOG], guidance_scale=5.0, num_inference_steps=4, generator=generators([11, 12]),
                output_type="np").images
    got = ours(models["sdxl"], TEXT_ITEMS, method="unguided", steps=4, cfg_scale=5.0)
    np.testing.assert_allclose(got, want, atol=1e-5)


def added_conditions(unet, run) -> dict:
    """The ``added_cond_kwargs`` the UNet receives on its first call during ``run()``."""
    seen = []
    handle = unet.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["added_cond_kwargs"]),
                                            with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen[0]


def test_sdxl_micro_conditioning_is_the_pipelines(folders, models):
    """SDXL's time ids (size, crop, size) and pooled text embeddings reach the UNet as the pipeline passes them."""
    pipe = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"])
    model = models["sdxl"]
    want = added_conditions(pipe.unet, lambda: pipe([CAT, DOG], guidance_scale=5.0, num_inference_steps=1,
                                                    output_type="latent"))
    denoiser = model.denoiser(TEXT_ITEMS, 5.0)
    got = added_conditions(model.network, lambda: denoiser(torch.zeros(2, *model.sample_shape), 999))
    size = model.sample_shape[1] * pipe.vae_scale_factor
    assert got["time_ids"].tolist() == [[size, size, 0, 0, size, size]] * 4  # negative and positive rows, 2 prompts
    assert got["time_ids"].dtype == want["time_ids"].dtype
    torch.testing.assert_close(got["time_ids"], want["time_ids"], rtol=0, atol=0)
    torch.testing.assert_close(got["text_embeds"], want["text_embeds"], rtol=0, atol=0)


def test_sdxl_refuses_a_second_text_encoder_of_another_width(models):
    unet = models["sdxl"].network
    with pytest.raises(ValueError, match="expects added conditions of length 80.*projection_dim 7"):
        sdxl_time_ids(unet, 64, projection_dim=7, dtype=torch.float32)


def test_sdxl_lightning_loads_its_unet_file_and_samples_four_trailing_steps(folders, tmp_path):
    base = load_model("sdxl-base", folders["sdxl"])
    distilled = {name: value + 0.01 for name, value in base.network.state_dict().items()}
    weights = tmp_path / "sdxl_lightning_4step_unet.safetensors"
    safetensors.torch.save_file(distilled, weights)
    lightning = load_model("sdxl-lightning-4step", folders["sdxl"], unet_weights=weights)
    for name, value in lightning.network.state_dict().items():
        torch.testing.assert_close(value, distilled[name])
    preset = PRESETS["sdxl-lightning-4step"]
    schedule = noise_schedule(lightning.scheduler_config, preset.steps, preset.sampler,
                              timestep_spacing=preset.timestep_spacing)
    assert schedule.timesteps == (999, 749, 499, 249)
    config = dict(method="unguided", steps=preset.steps, cfg_scale=preset.cfg_scale, timestep_spacing="trailing")
    assert_pinned(ours(lightning, TEXT_ITEMS, **config),  # the base UNet's weights would move it by 0.028
                  [0.459727, 0.302663, 0.40487, 0.420834, 0.57234, 0.475225, 0.569403, 0.514243, 0.50327])


def test_timesteps_come_from_the_models_scheduler_config(models):
    sd = noise_schedule(models["sd"].scheduler_config, 4, "ddim")
    assert sd.timesteps == (751, 501, 251, 1)  # leading spacing with steps_offset = 1
    assert sd.previous == (501, 251, 1, -249)
    ddpm = noise_schedule(models["pixel"].scheduler_config, 4, "ddpm")
    assert ddpm.timesteps == (750, 500, 250, 0) and ddpm.previous == (500, 250, 0, -1)


def test_an_override_applies_even_when_the_config_file_omits_that_key(tmp_path):
    """Hub configs often lack ``timestep_spacing`` (SD 1.5's does); diffusers then lists it in
    ``_use_default_values``, and an override merged into the dict was silently replaced by the default."""
    (tmp_path / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, "set_alpha_to_one": False}))
    config = dict(DDIMScheduler.from_pretrained(tmp_path).config)
    assert "timestep_spacing" in config["_use_default_values"]
    assert noise_schedule(config, 4, "ddim").timesteps == (751, 501, 251, 1)
    assert noise_schedule(config, 4, "ddim", timestep_spacing="trailing").timesteps == (999, 749, 499, 249)
    assert noise_schedule(config, 4, "ddim", clip_sample=False).clip_sample_range is None


# -- the guidance contracts, for every family -----------------------------------------------------

@pytest.mark.parametrize("family", CASES)
def test_guidance_that_never_acts_is_identical_to_unguided(models, tiny_encoder, family):
    items, cfg = CASES[family]
    unguided = ours(models[family], items, method="unguided", steps=4, cfg_scale=cfg)
    for guidance in (GuidanceConfig(tau=0.0), GuidanceConfig(eta=0.0, tau=1.0)):
        guided = ours(models[family], items, tiny_encoder, method="jepa", steps=4, cfg_scale=cfg, guidance=guidance)
        assert np.array_equal(guided, unguided)


@pytest.mark.parametrize("family", CASES)
def test_a_batch_equals_single_rows_and_seeds_reproduce(models, tiny_encoder, family):
    items, cfg = CASES[family]
    config = dict(method="jepa", sampler="ddpm", steps=4, cfg_scale=cfg, guidance=GuidanceConfig(tau=1.0, k=4))
    batched = ours(models[family], items, tiny_encoder, **config)
    singles = np.concatenate([ours(models[family], [item], tiny_encoder, **config) for item in items])
    np.testing.assert_allclose(batched, singles, atol=1e-5)
    again = ours(models[family], items[:1], tiny_encoder, **config)
    assert np.array_equal(again, singles[:1])


# The second item's condition on the first item's noise, pinned; the first item's condition moves it by 0.82
# (class), 0.19 (dit), 3.3e-3 (sd), 7.3e-4 (sdxl).
CONDITIONED = {
    "class": [0.0, 1.0, 0.941453, 0.854731, 0.753713, 0.094995, 1.0, 0.181609, 0.935467],
    "dit": [0.177627, 0.292435, 0.241693, 0.321414, 0.411068, 0.411368, 0.469564, 0.542257, 0.645357],
    "sd": [0.461541, 0.418423, 0.357051, 0.405573, 0.363959, 0.435792, 0.454291, 0.546061, 0.585723],
    "sdxl": [0.427674, 0.395343, 0.326087, 0.479929, 0.371931, 0.396112, 0.461489, 0.526573, 0.581137],
}


@pytest.mark.parametrize("family", ["class", "dit", "sd", "sdxl"])
def test_conditioning_changes_the_output(models, family):
    items, cfg = CASES[family]
    swapped = dataclasses.replace(items[1], seed=items[0].seed)  # same noise, other condition
    assert_pinned(ours(models[family], [swapped], method="unguided", steps=3, cfg_scale=cfg), CONDITIONED[family])


@pytest.mark.parametrize("family", CASES)
def test_jepa_guidance_lowers_the_mean_exact_jepa_score(models, tiny_encoder, family):
    """8 seeds, same noise; the tiny random models respond strongly, so the margin is a full nat."""
    base_items, cfg = CASES[family]
    items = [dataclasses.replace(base_items[i % 3], seed=100 + i) for i in range(8)]
    unguided = generate(models[family], items, SamplingConfig(method="unguided", steps=4, cfg_scale=cfg), tiny_encoder)
    guided = generate(models[family], items, SamplingConfig(
        method="jepa", steps=4, cfg_scale=cfg, guidance=GuidanceConfig(tau=1.0, k=4)), tiny_encoder)
    shift = np.mean([g.jepa_score for g in guided]) - np.mean([u.jepa_score for u in unguided])
    assert shift < -1.0, shift


def test_rows_carry_exact_scores_embeddings_and_metadata(models, tiny_encoder):
    items = [WorkItem(1, 3), WorkItem(2, 7)]
    rows = generate(models["class"], items, SamplingConfig(steps=4, guidance=GuidanceConfig(tau=0.5, k=4)), tiny_encoder)
    images = torch.stack([torch.from_numpy(row.image).permute(2, 0, 1).float() / 255 for row in rows])
    assert rows[0].image.dtype == np.uint8 and rows[0].image.shape == (8, 8, 3)
    resized = tiny_encoder.resize(images)
    want = jepa_score(tiny_encoder, resized)
    for row, score, embedding in zip(rows, want, tiny_encoder(resized)):
        assert row.jepa_score == pytest.approx(score.item(), abs=0.02)  # fp32 noise of a near-null direction
        np.testing.assert_allclose(row.embedding, embedding.detach().numpy(), atol=1e-5)
        assert row.embedding.dtype == np.float32
        assert row.steps_guided == 2  # tau = 0.5 of 4 steps: s = 2, 3


def test_reference_objective_guides_too(models, tiny_encoder):
    items = [WorkItem(100 + i, i % 10) for i in range(4)]
    config = dict(steps=4, guidance=GuidanceConfig(tau=1.0, k=4))
    unguided = generate(models["class"], items, SamplingConfig(method="unguided", steps=4), tiny_encoder)
    reference = generate(models["class"], items, SamplingConfig(method="jepa-reference", **config), tiny_encoder)
    ours_rows = generate(models["class"], items, SamplingConfig(method="jepa", **config), tiny_encoder)
    assert np.mean([r.jepa_score for r in reference]) < np.mean([u.jepa_score for u in unguided]) - 1.0
    assert not all(np.array_equal(r.image, o.image) for r, o in zip(reference, ours_rows))


@pytest.mark.parametrize("change", [dict(placement="posterior-mean"), dict(schedule="variance", eta=500.0),
                                    dict(normalize=False, eta=50.0), dict(interval=2)])
def test_every_guidance_option_acts(models, tiny_encoder, change):
    items = [WorkItem(1, 3), WorkItem(2, 7)]
    default = GuidanceConfig(tau=1.0, k=4)
    base = ours(models["class"], items, tiny_encoder, steps=4, guidance=default)
    changed = ours(models["class"], items, tiny_encoder, steps=4, guidance=dataclasses.replace(default, **change))
    assert np.abs(base - changed).max() > 1e-4


@pytest.mark.parametrize("schedule_name", ["constant", "variance"])
@pytest.mark.parametrize("placement", ["pre-step", "posterior-mean"])
def test_guided_steps_match_a_hand_computation(schedule_name, placement):
    """Three guided DDIM steps with Gaussian data's exact denoiser and the objective 1/2 ||A x||^2,
    against the update written out in float64: x0_hat = a_t x, g = 1/2 a_t A^T A image / max|.|,
    step = eta g or eta beta-tilde_t g, then DDIM's mean m_t x taken after (pre-step) or before
    (posterior-mean) subtracting the step."""
    config = dict(DDIMScheduler(num_train_timesteps=1000).config)
    schedule = noise_schedule(config, 3, "ddim", clip_sample=False)
    assert schedule.timesteps == (666, 333, 0) and schedule.previous == (333, 0, -333)
    denoiser = GaussianDenoiser(schedule.alphas_cumprod, data_std=0.2)
    encoder = LinearEncoder(torch.linspace(2.0, 0.5, 6))
    eta = 0.5
    guidance_config = GuidanceConfig(eta=eta, schedule=schedule_name, placement=placement, tau=1.0)
    guidance = JepaGuidance(encoder, feature_energy, lambda x0: (x0 + 1) / 2, guidance_config, [None, None])
    x_T = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    method = JepaGuided(guidance)
    got = sample(denoiser, x_T, schedule, generators([1, 2]), method=method)
    assert method.steps_guided == 3

    A = encoder.matrix
    x = x_T.flatten(1)
    for t, t_prev in zip(schedule.timesteps, schedule.previous):
        abar_t = float(schedule.alphas_cumprod[t])
        abar_prev = float(schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
        c_t = denoiser.gain(t)
        a_t = (1 - (1 - abar_t) ** 0.5 * c_t) / abar_t**0.5  # x0_hat = a_t x_t
        m_t = abar_prev**0.5 * a_t + (1 - abar_prev) ** 0.5 * c_t  # DDIM (eta 0): x_prev = m_t x_t
        image = (a_t * x + 1) / 2
        assert ((image > 0) & (image < 1)).all()  # no clamping, so the chain rule above is the whole story
        g = 0.5 * a_t * image @ A.T @ A
        g = g / g.abs().amax(1, keepdim=True)
        beta_tilde = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        step = eta * g if schedule_name == "constant" else eta * beta_tilde * g
        x = m_t * (x - step) if placement == "pre-step" else m_t * x - step
    torch.testing.assert_close(got.flatten(1), x, atol=1e-6, rtol=0)


def test_warm_start_keeps_rows_independent_and_acts(models, tiny_encoder):
    items = CASES["class"][0]
    warm = GuidanceConfig(tau=1.0, k=4, power_iters=0, warm_start=True)
    config = dict(method="jepa", sampler="ddpm", steps=4, guidance=warm)
    batched = ours(models["class"], items, tiny_encoder, **config)
    singles = np.concatenate([ours(models["class"], [item], tiny_encoder, **config) for item in items])
    np.testing.assert_allclose(batched, singles, atol=1e-5)
    fresh = ours(models["class"], items, tiny_encoder, **(config | dict(guidance=dataclasses.replace(warm, warm_start=False))))
    assert np.abs(batched - fresh).max() > 1e-4


def test_deferral_and_interval_choose_the_guided_steps():
    assert GuidanceConfig(tau=0.8).guided_steps(10) == [False] * 2 + [True] * 8
    assert GuidanceConfig(tau=0.8, interval=2).guided_steps(10) == [False, False] + [True, False] * 4
    assert GuidanceConfig(tau=1.0).guided_steps(4) == [True] * 4
    assert GuidanceConfig(tau=0.0).guided_steps(4) == [False] * 4
    assert GuidanceConfig(eta=0.0, tau=1.0).guided_steps(4) == [False] * 4


@pytest.mark.parametrize("tau,total,guided", [(0.3, 10, 3), (0.82, 50, 41), (0.16, 25, 4), (0.7, 10, 7), (0.1, 3, 0)])
def test_deferral_is_exact_at_the_boundary(tau, total, guided):
    # 1 - s/T <= tau  <=>  T - s <= tau * T: in floats 1 - 7/10 > 0.3, which would drop step s = 7 of 10
    steps = GuidanceConfig(tau=tau).guided_steps(total)
    assert steps == [False] * (total - guided) + [True] * guided


def network_calls(network: torch.nn.Module, run) -> list[tuple[torch.Tensor, int]]:
    """(x_t, t) of every call of the real network while ``run()`` samples."""
    calls = []
    handle = network.register_forward_pre_hook(lambda module, args: calls.append((args[0].detach().clone(), int(args[1]))))
    try:
        run()
    finally:
        handle.remove()
    return calls


def test_boost_and_skip_scales_the_seeded_noise_and_skips_the_noisiest_steps(models):
    model, items = models["class"], [WorkItem(1, 3), WorkItem(2, 7)]
    unguided = network_calls(model.network, lambda: ours(model, items, method="unguided", steps=5))
    boosted = network_calls(model.network, lambda: ours(model, items, method="bns", steps=5,
                                                        bns=BoostSkipConfig(gamma=1.3, skip=2)))
    assert [t for _, t in unguided] == [800, 600, 400, 200, 0]
    assert [t for _, t in boosted] == [400, 200, 0]  # the noisiest two skipped, the rest unchanged
    noise = torch.stack([torch.randn(model.sample_shape, generator=torch.Generator().manual_seed(item.seed))
                         for item in items])
    assert torch.equal(unguided[0][0], noise)
    assert torch.equal(boosted[0][0], 1.3 * noise)  # the first denoised latent is gamma * the row's noise
    neutral = ours(model, items, method="bns", steps=5, bns=BoostSkipConfig(gamma=1.0, skip=0))
    assert np.array_equal(neutral, ours(model, items, method="unguided", steps=5))


def test_bf16_model_keeps_the_encoder_branch_in_fp32(folders, tiny_encoder):
    """Hooks on the real bf16 network and the real encoder during guided sampling: the network runs in
    bf16, while every encoder call (the sketch's JVPs, the VJPs with graph) gets fp32 images, fp32
    tangents and fp32 weights."""
    model = load_model("pixel-unet", folders["class"], dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    network_dtypes, encoder_dtypes, tangent_dtypes = [], [], []

    def encoder_call(module, args):
        encoder_dtypes.append((args[0].dtype, *{p.dtype for p in module.parameters()}))
        tangent = torch.autograd.forward_ad.unpack_dual(args[0]).tangent
        if tangent is not None:
            tangent_dtypes.append(tangent.dtype)

    hooks = [model.network.register_forward_hook(lambda module, args, out: network_dtypes.append(out.sample.dtype)),
             tiny_encoder.register_forward_pre_hook(encoder_call)]
    try:
        config = SamplingConfig(steps=3, guidance=GuidanceConfig(tau=1.0, k=4))
        (row,) = generate(model, [WorkItem(1, 3)], config, tiny_encoder)
    finally:
        for hook in hooks:
            hook.remove()
    assert row.steps_guided == 3 and np.isfinite(row.jepa_score)
    assert network_dtypes == [torch.bfloat16] * 6  # the guided step's forward and the sampler's, 3 times
    assert set(encoder_dtypes) == {(torch.float32, torch.float32)}, encoder_dtypes
    assert tangent_dtypes == [torch.float32] * 9  # 3 guided steps x (the sketch + 2 power iterations)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_network_samples_the_same_images(folders, tiny_encoder, backend):
    """torch.compile changes speed, not samples: guided and unguided steps (grad on and off) both compile.
    aot_eager traces the graphs inductor gets (dynamo, AOT autograd's forward and backward) in seconds;
    inductor's own code generation (minutes on CPU) runs as the slow case."""
    eager = load_model("pixel-unet", folders["class"])
    compiled = load_model("pixel-unet", folders["class"], compile_network=True)
    if backend != "inductor":  # the product compiles with the default backend, inductor
        compiled.network.compile(backend=backend)
    torch.compiler.reset()
    calls = []  # (running under torch.compile, grad mode) of each network call, recorded by a hook inside it
    compiled.network.register_forward_pre_hook(
        lambda *_: calls.append((torch.compiler.is_compiling(), torch.is_grad_enabled())))
    items, config = [WorkItem(1, 3), WorkItem(2, 7)], SamplingConfig(steps=3, guidance=GuidanceConfig(tau=0.7, k=4))
    expected, guided = generate_images(eager, items, config, tiny_encoder)
    images, steps_guided = generate_images(compiled, items, config, tiny_encoder)
    assert steps_guided == guided == 2
    assert set(calls) == {(True, True), (True, False)}  # every call ran compiled, guided (grad on) and not
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


# -- bad input --------------------------------------------------------------------------------------

def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model preset 'sd-9'; valid presets: pixel-unet"):
        load_model("sd-9")


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_model("pixel-unet", tmp_path / "nowhere" / "unet")


def test_a_folder_of_another_family_is_refused(folders):
    with pytest.raises(ValueError, match="holds a DDPMPipeline, but this preset loads a StableDiffusionPipeline"):
        load_model("sd", folders["pixel"])


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        load_model("pixel-unet", tmp_path)


def test_preset_without_default_weights_needs_a_source():
    with pytest.raises(ValueError, match="pass the model's pipeline folder as source"):
        load_model("pixel-unet")


def test_lightning_without_its_unet_file(folders, tmp_path):
    with pytest.raises(ValueError, match="needs unet_weights"):
        load_model("sdxl-lightning-4step", folders["sdxl"])
    with pytest.raises(FileNotFoundError, match="UNet weights file not found"):
        load_model("sdxl-lightning-4step", folders["sdxl"], unet_weights=tmp_path / "absent.safetensors")


@pytest.mark.parametrize("family,items,message", [
    ("class", [WorkItem(1, 10)], "class_label 10 is out of range: this model has classes 0..9"),
    ("class", [WorkItem(1)], "needs a class_label for every item"),
    ("pixel", [WorkItem(1, 2)], "this pixel UNet is unconditional"),
    ("dit", [WorkItem(1, 1000)], "out of range: this model has classes 0..999"),
    ("sd", [WorkItem(1)], "needs a non-empty prompt"),
    ("sd", [WorkItem(1, prompt="")], "needs a non-empty prompt"),
    ("sd", [WorkItem(1, 3, prompt=CAT)], "takes prompts, not class labels"),
    ("class", [WorkItem(1, 3, prompt=CAT)], "takes no prompts"),
])
def test_bad_conditions_are_refused(models, family, items, message):
    with pytest.raises(ValueError, match=message):
        ours(models[family], items, method="unguided", steps=2)


def test_cfg_on_a_pixel_unet_is_refused(models):
    with pytest.raises(ValueError, match="set cfg_scale=1"):
        ours(models["class"], [WorkItem(1, 3)], method="unguided", steps=2, cfg_scale=3.0)


@pytest.mark.parametrize("settings,message", [
    (dict(method="magic"), "method must be one of unguided, bns, jepa, jepa-reference"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(ddim_eta=-0.1), "ddim_eta must be a finite number >= 0"),
    (dict(ddim_eta=1.5), "ddim_eta must be in \\[0, 1\\]"),
    (dict(cfg_scale=0.5), "cfg_scale must be a finite number >= 1 \\(1 = off, > 1 applies classifier-free guidance\\), got 0.5"),
    (dict(cfg_scale=0.0), "cfg_scale must be a finite number >= 1"),
    (dict(sampler="euler"), "sampler must be one of ddpm, ddim"),
    (dict(method="bns", steps=2, bns=BoostSkipConfig(skip=2)), "bns.skip \\(2\\) must be smaller than steps"),
    (dict(method="jepa-reference", guidance=GuidanceConfig(warm_start=True)), "warm_start needs method jepa"),
])
def test_bad_sampling_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**settings)


@pytest.mark.parametrize("settings,message", [
    (dict(tau=1.5), "tau must be in \\[0, 1\\]"),
    (dict(tau=-0.1), "tau must be in \\[0, 1\\]"),
    (dict(eta=-1.0), "guidance.eta must be a finite number >= 0"),
    (dict(eta=float("nan")), "guidance.eta must be a finite number >= 0"),
    (dict(interval=0), "interval must be an integer >= 1"),
    (dict(placement="after"), "placement must be one of pre-step, posterior-mean"),
    (dict(schedule="cosine"), "schedule must be one of constant, variance"),
    (dict(warm_start=1), "warm_start must be true or false"),
])
def test_bad_guidance_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        GuidanceConfig(**settings)


def test_sketch_wider_than_the_encoder_is_refused_before_sampling(models, tiny_encoder):
    config = SamplingConfig(steps=2, guidance=GuidanceConfig(k=31, oversample=2))
    with pytest.raises(ValueError, match="k \\+ oversample = 31 \\+ 2 exceeds min\\(D, N\\) = min\\(32"):
        generate_images(models["class"], [WorkItem(1, 3)], config, tiny_encoder)


def test_steps_beyond_the_training_schedule_are_refused(models):
    with pytest.raises(ValueError, match="steps must be an integer in \\[1, 1000\\]"):
        ours(models["pixel"], [WorkItem(1)], method="unguided", steps=1001)


def test_a_non_finite_image_is_an_error_not_a_quantised_row(nan_class_unet, tiny_encoder):
    model = load_model("pixel-unet", nan_class_unet)
    with pytest.raises(FloatingPointError, match="non-finite image for seeds \\[8\\]"):
        generate(model, [WorkItem(7, 1), WorkItem(8, 9)], SamplingConfig(method="unguided", steps=2), tiny_encoder)


def test_jepa_without_an_encoder_is_refused(models):
    with pytest.raises(ValueError, match="pass encoder=load_encoder"):
        generate_images(models["class"], [WorkItem(1, 3)], SamplingConfig(steps=2))
