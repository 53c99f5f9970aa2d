"""The demo diffusion model's recipe (pipeline/demo/train.py, train_diffusion) and the job that trains the demo
models (jobs/train_demo_models.py), on a few optimiser steps: what they save loads through the product's loader,
and a recipe reproduces its weights from its seed. (The encoder's recipe: tests/test_sigreg.py.)"""

from __future__ import annotations

from dataclasses import replace

import torch

from guidance import SamplingConfig, WorkItem, generate_images, load_encoder, load_model
from jobs import train_demo_models
from pipeline.demo.train import DiffusionTraining, EncoderTraining, train_diffusion

TINY = DiffusionTraining(size=8, steps=2, batch_size=8)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_model("pixel-unet", folder).network.state_dict()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_train_diffusion_saves_a_class_conditional_ddpm_reproducible_from_its_seed(tmp_path):
    saved = train_diffusion(replace(TINY, output=str(tmp_path / "a")))
    model = load_model("pixel-unet", saved)
    assert model.sample_shape == (1, 8, 8) and model.network.config.num_class_embeds == 10
    assert model.scheduler_config["prediction_type"] == "epsilon"
    images, _ = generate_images(model, [WorkItem(1, 0), WorkItem(2, 9)], SamplingConfig(method="unguided", steps=2))
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()

    trained = model.network.state_dict()
    assert same_weights(weights(train_diffusion(replace(TINY, output=str(tmp_path / "b")))), trained)
    assert not same_weights(weights(train_diffusion(replace(TINY, output=str(tmp_path / "c"), seed=1))), trained)
    assert not same_weights(weights(train_diffusion(replace(TINY, output=str(tmp_path / "d"), steps=1))), trained)


def test_the_job_trains_both_demo_models_into_the_models_folder(tmp_path):
    models = tmp_path / "models"
    assert train_demo_models.main(["both", "--diffusion-steps", "2", "--encoder-steps", "1", "--models", str(models)]) == 0
    recipe = DiffusionTraining(output=str(tmp_path / "direct"), steps=2)  # the job's recipe: the defaults, its steps
    assert same_weights(weights(models / "digits-ddpm"), weights(train_diffusion(recipe)))
    assert load_model("pixel-unet", models / "digits-ddpm").sample_shape == (1, DiffusionTraining.size, DiffusionTraining.size)
    encoder = load_encoder(EncoderTraining.name, models / "digits-sigreg-vit", input_size=EncoderTraining.input_size)
    assert encoder.embed_dim == EncoderTraining.embed_dim
