"""MinorityPrompt (guidance/minority_prompt.py; docs/method.md, 'MinorityPrompt'): the placeholder's optimisation
on the tiny SD and SDXL pipelines, the sampling contracts, and its config and refusals."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from guidance.generate import generate_images
from guidance.methods import MINORITY_PROMPT_SETTINGS, MinorityPromptConfig, SamplingConfig
from guidance.minority_prompt import RENOISE_STREAM, MinorityPrompt, discrepancy
from guidance.models import WorkItem
from guidance.presets import PRESETS, load_model
from guidance.sampling import Sampler, stream_seed
from guidance.schedules import noise_schedule
from jobs import generate as generate_job
from pipeline.generate.config import load_config
from pipeline.generate.work import run_identity
from pipeline.settings import ConfigError
from tests import tiny_diffusion

ITEMS = [WorkItem(1, prompt="a photo of a cat"), WorkItem(2, prompt="a red car")]
PRESET = {"sd": "sd", "sdxl": "sdxl-base"}


@pytest.fixture(scope="module")
def models(sd_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("minority_prompt")
    return {"sd": load_model("sd", sd_folder),
            "sdxl": load_model("sdxl-base", tiny_diffusion.save_sdxl(root / "sdxl", root / "scratch"))}


def minority_prompt(cfg_scale: float = 3.0, **config) -> SamplingConfig:
    settings = {"iterations": 1, "lr": 0.05, "t_lo": 0.0} | config
    return SamplingConfig(method="minority-prompt", steps=2, cfg_scale=cfg_scale,
                          minority_prompt=MinorityPromptConfig(**settings))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_the_placeholder_moves_up_the_discrepancy_in_every_text_encoder(models, family):
    model = models[family]
    method = MinorityPrompt.build(minority_prompt(iterations=1, lr=1e-4), model, ITEMS, None)
    schedule = noise_schedule(model.scheduler_config, 2, "ddim")
    x = torch.randn((2, *model.sample_shape), generator=torch.Generator().manual_seed(0))
    t, t_prev = schedule.timesteps[0], schedule.previous[0]
    # the rows' first re-noise draws, as the method makes them
    noise = randn_tensor(x.shape, generator=[torch.Generator().manual_seed(stream_seed(RENOISE_STREAM, item.seed))
                                             for item in ITEMS])
    plain = model.conditioned(method.base, 1.0)
    r = method.renoise_level(schedule, t_prev)

    def loss(embeddings):
        with torch.no_grad():
            return discrepancy(model.conditioned(method.encode(embeddings), 1.0), plain, schedule, x, t, r, noise)

    before, start = loss(method.embeddings), list(method.embeddings)
    method.optimise(Sampler(plain, schedule, []), x, t, t_prev)
    assert len(method.embeddings) == (2 if family == "sdxl" else 1)
    for old, new in zip(start, method.embeddings):
        torch.testing.assert_close((new - old).abs(), torch.full_like(old, 1e-4))  # Adam's first step: lr * sign(g)
    assert (loss(method.embeddings) > before).all()  # up the discrepancy, per row


@pytest.fixture(scope="module")
def unguided(models):
    """The unguided sampler's images of ITEMS on the tiny SD, at the settings of ``minority_prompt()``."""
    return generate_images(models["sd"], ITEMS, dataclasses.replace(minority_prompt(), method="unguided"))[0]


def test_zero_iterations_or_zero_lr_is_the_unguided_sampler_bit_for_bit(models, unguided):
    for change in ({"iterations": 0}, {"lr": 0.0}):
        never, steps = generate_images(models["sd"], ITEMS, minority_prompt(**change))
        assert steps == 0 and torch.equal(never, unguided)
    assert MinorityPromptConfig(t_lo=0.9).optimised_steps((999, 899, 1), 1000) == [True, False, False]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_batch_equals_single_rows_and_seeds_reproduce(models, unguided, family):
    model, config = models[family], minority_prompt()
    batched, steps = generate_images(model, ITEMS, config)
    assert steps == 2
    single, _ = generate_images(model, ITEMS[1:], config)
    torch.testing.assert_close(batched[1:], single, rtol=0, atol=1e-4)  # fp32 batching noise only
    again, _ = generate_images(model, ITEMS[1:], config)
    assert torch.equal(again, single)
    if family == "sd":
        assert (batched - unguided).abs().flatten(1).amax(1).min() > 1e-3  # the optimised prompt moves every row


def test_the_init_word_is_one_token_of_the_tokenizer(models):
    model = models["sd"]
    tokenizer = model.pipeline.tokenizer
    method = MinorityPrompt.build(minority_prompt(init_word="x"), model, ITEMS, None)
    table = model.pipeline.text_encoder.get_input_embeddings().weight
    word = tokenizer("x", add_special_tokens=False).input_ids[0]
    assert torch.equal(method.embeddings[0], table[word].detach().repeat(2, 1))
    mean = MinorityPrompt.build(minority_prompt(), model, ITEMS, None).embeddings[0]
    torch.testing.assert_close(mean, table.detach().mean(0).repeat(2, 1))
    with pytest.raises(ValueError, match=re.escape("minority_prompt.init_word 'cool' is 4 tokens")):
        generate_images(model, ITEMS, minority_prompt(init_word="cool"))


def test_the_mirrored_renoise_level_follows_the_step(models):
    method = MinorityPrompt.build(minority_prompt(mirror_renoise=True), models["sd"], ITEMS, None)
    schedule = noise_schedule(models["sd"].scheduler_config, 4, "ddim", timestep_spacing="trailing")
    assert [method.renoise_level(schedule, t_prev) for t_prev in schedule.previous] == [250, 500, 750, 999]
    method.config = MinorityPromptConfig()
    assert method.renoise_level(schedule, 749) == 750


def test_a_class_model_is_refused_in_one_line_before_anything_loads(write_config, tmp_path, capsys, class_unet):
    assert generate_job.main([write_config(), "--set", "sampling.method=minority-prompt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sampling.method: minority-prompt runs on sd or sdxl models only, and preset " \
                              "'pixel-unet' is a pixel-unet model" in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlruns").exists()
    with pytest.raises(ValueError, match="needs a text-to-image model"):
        generate_images(load_model("pixel-unet", class_unet), [WorkItem(1, 3)], minority_prompt(cfg_scale=1.0))


@pytest.mark.parametrize("change,message", [
    (dict(iterations=-1), "minority_prompt.iterations must be an integer >= 0, got -1"),
    (dict(lr=-0.1), "minority_prompt.lr must be a finite number >= 0, got -0.1"),
    (dict(t_lo=1.0), "minority_prompt.t_lo must be in [0, 1)"),
    (dict(renoise=0.0), "minority_prompt.renoise must be in (0, 1]"),
    (dict(init_word="two words"), "minority_prompt.init_word must be one word or null"),
])
def test_bad_settings_name_the_key(change, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        MinorityPromptConfig(**change)


def test_the_job_config_reads_the_section_the_identity_covers_it_and_the_published_settings_load():
    config = load_config(None, ["sampling.method=minority-prompt", "sampling.minority_prompt.lr=0.001",
                                "model.dtype=float32"])
    assert config.sampling.minority_prompt.lr == 0.001 and config.sampling.objective is None
    with pytest.raises(ConfigError, match=re.escape("minority_prompt.iterations must be an integer >= 0")):
        load_config(None, ["sampling.minority_prompt.iterations=-2"])

    def identity(method: str, lr: float) -> dict:
        sampling = dataclasses.replace(config.sampling, method=method, minority_prompt=MinorityPromptConfig(lr=lr))
        return run_identity(dataclasses.replace(config, sampling=sampling))

    assert identity("minority-prompt", 0.001) != identity("minority-prompt", 0.01)
    assert identity("jepa", 0.001) == identity("jepa", 0.01)
    assert set(MINORITY_PROMPT_SETTINGS) <= set(PRESETS)
    lightning = MINORITY_PROMPT_SETTINGS["sdxl-lightning-4step"]
    assert (lightning.iterations, lightning.lr, lightning.mirror_renoise) == (3, 0.001, True)
