"""The embedded default: the committed demo models load through the product's loaders and make
digits; a short demo run writes the data, the MLflow runs and the report."""

from __future__ import annotations

import hashlib
import io
import json
import re
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from mlflow import MlflowClient
from PIL import Image
from sklearn.svm import SVC

from guidance import GuidanceConfig, SamplingConfig, WorkItem, generate_images, load_encoder, load_model
from jobs import demo as demo_job
from pipeline.demo.digits import augment, digit_classifier, digits, held_out_images, split_indices, to_8x8
from pipeline.demo.job import guidance_settings
from pipeline.demo.train import DiffusionTraining, EncoderTraining
from pipeline.evaluate.features import FeatureSpace
from pipeline.evaluate.rarity import avg_knn
from pipeline.rows import read_committed
from pipeline.schema import CARD_FILE, DATA_FILE_PREFIX, RUN_FILE, SELECTION_FILE
from pipeline.storage import StorageConfig, resolve
from tests.test_refresh import count_preflights

MODELS = Path(__file__).resolve().parents[1] / "models"
CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"


def test_demo_models_load_like_real_checkpoints_and_draw_the_requested_digits():
    model = load_model("pixel-unet", MODELS / "digits-ddpm")
    encoder = load_encoder("vit_small_patch14_reg4_dinov2", MODELS / "digits-sigreg-vit", input_size=56)
    assert model.sample_shape == (1, 16, 16) and encoder.embed_dim == 64
    images, labels = digits(16)
    classifier = SVC(gamma=0.001).fit(to_8x8(images.expand(-1, 3, -1, -1)), labels.numpy())
    items = [WorkItem(seed, seed % 10) for seed in range(30)]
    samples, _ = generate_images(model, items, SamplingConfig(method="unguided", steps=20))
    accuracy = np.mean(classifier.predict(to_8x8(samples)) == np.array([i.class_label for i in items]))
    assert accuracy >= 0.8, accuracy
    with torch.no_grad():
        embeddings = encoder(encoder.resize(samples))
    assert embeddings.std(0).mean() > 0.1  # not collapsed: SIGReg kept the embedding spread


def test_the_held_out_digits_are_a_fixed_stratified_split_no_model_trains_on():
    train, held_out = split_indices()
    assert len(held_out) == 400 and len(train) + len(held_out) == 1797 and not set(train) & set(held_out)
    assert np.array_equal(split_indices()[1], held_out)  # the same split for every caller
    everything, labels = digits(16)
    images, held_labels = digits(16, "held_out")
    assert torch.equal(images, everything[held_out]) and torch.equal(held_labels, labels[held_out])
    counts = np.bincount(held_labels.numpy(), minlength=10)
    assert counts.min() >= 38 and counts.max() <= 41  # stratified: about 40 of each digit
    assert EncoderTraining().data == DiffusionTraining().data == "train"
    pictures, picture_labels = held_out_images()
    assert np.mean(digit_classifier()(pictures) == picture_labels) > 0.97


def test_weaker_views_stay_closer_to_the_digit():
    images = digits(16)[0][:64].expand(-1, 3, -1, -1)
    change = {strength: (augment(images, torch.Generator().manual_seed(0), strength) - images).abs().mean().item()
              for strength in (0.25, 1.0)}
    assert change[0.25] < change[1.0] / 2, change


def test_only_the_demo_models_are_measured_against_digits(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    parse = demo_job.build_parser().parse_args
    assert demo_job.measures_digits(parse([])) and demo_job.measures_digits(parse(["--config", str(CONFIG)]))
    assert not demo_job.measures_digits(parse(["--config", str(tmp_path / "sd.yaml")]))
    assert not demo_job.measures_digits(parse(["--set", "model.source=other"]))
    assert demo_job.measures_digits(parse(["--set", "work.samples_per_label=2"]))


def test_the_report_names_every_guidance_setting_apart_from_the_authors_defaults():
    assert guidance_settings(GuidanceConfig()) == "eta 0.5, tau 0.8, k 9"
    assert guidance_settings(GuidanceConfig(eta=0.2, gradient="tweedie")) == "eta 0.2, tau 0.8, k 9, gradient tweedie"


def test_a_short_demo_run_writes_data_mlflow_runs_and_the_report(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    tracking = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    preflights = count_preflights(monkeypatch)
    code = demo_job.main([
        "--config", str(CONFIG), "--root", str(tmp_path / "demo"),
        "--set", "work.class_labels=[3, 8]", "--set", "work.samples_per_label=4", "--set", "sampling.steps=10",
        "--set", f"tracking.tracking_uri={tracking}", "--set", f"tracking.artifact_location={tmp_path}/artifacts",
    ])
    assert code == 0
    assert preflights == [f"{tmp_path}/demo/unguided", f"{tmp_path}/demo/jepa"]  # each arm preflighted once
    out = capsys.readouterr().out
    report = tmp_path / "demo" / "report" / "index.html"
    assert f"report:  {report}" in out
    page = report.read_text()
    for picture in ("jepa_score_histograms.png", "guided_vs_unguided.png", "rarest.png"):
        assert picture in page and (report.parent / picture).stat().st_size > 1000
    for arm in ("unguided", "jepa"):
        assert (tmp_path / "demo" / arm / "_run.json").exists()
        assert len(list((tmp_path / "demo" / arm / "data").rglob(f"{DATA_FILE_PREFIX}*.parquet"))) >= 1
    assert (tmp_path / "demo" / "rarest" / SELECTION_FILE).exists()
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("jepa-minority-demo")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [  # output folder first: the arms apart, then job, method, model
        "jepa: generate jepa digits-ddpm", "rarest: filter jepa digits-ddpm", "unguided: generate unguided digits-ddpm"]
    assert all(r.info.status == "FINISHED" for r in runs)
    # rarity in the data: each arm against the held-out digits in pixels, recomputed here for the unguided arm
    assert "Rare in the data?" in page and "the 400 held-out real digits" in page
    assert "with JEPA guidance (eta 0.275, tau 0.8, k 9, interval 2, placement posterior-mean," in page  # the demo's cheap step
    unguided = read_committed(resolve(str(tmp_path / "demo" / "unguided"), StorageConfig()), ["image"])
    space = FeatureSpace.parse("pixels-16-grey")
    samples = np.stack([space.pixels(Image.open(io.BytesIO(png["bytes"]))) for png in unguided.column("image").to_pylist()])
    reference = np.stack([space.pixels(image) for image in held_out_images()[0]])
    assert f"<td>unguided</td><td>{avg_knn(samples, reference).mean():.3f}</td>" in page
    guided_run = next(r for r in runs if r.info.run_name.startswith("jepa:")).info
    assert out.strip().splitlines()[-1] == (f"browse:  mlflow ui --backend-store-uri {tracking}, then open "
                                            f"http://127.0.0.1:5000/#/experiments/{guided_run.experiment_id}/runs")
    # the report opens with a verdict per arm and its cost, then what made it
    top = page[:page.index("Class-conditional")]
    assert "<h2>Verdict</h2>" in top and "<li>unguided: the baseline (precision " in top
    assert re.search(r"<li>JEPA-guided: (minority|inconclusive|off-data|typical) by the minority test against unguided "
                     r"\(precision \d\.\d\d, \d+% outside every real k-NN ball, class accuracy \d\.\d\d\)</li>", top)
    assert f"JEPA-guided {guided_run.run_id}" in top and f"jepa-minority {version('jepa-minority')}" in top
    assert re.search(r"took \d+ s; .*; \d{4}-\d\d-\d\d \d\d:\d\d UTC", top)
    # the curated set's card: where its rows came from (weights digests as sha256sum gives them, recomputed here)
    card = (tmp_path / "demo" / "rarest" / CARD_FILE).read_text()
    listing = {folder: "".join(f"{hashlib.sha256(file.read_bytes()).hexdigest()}  {file.relative_to(MODELS / folder)}\n"
                               for file in sorted((MODELS / folder).rglob("*.safetensors")))
               for folder in ("digits-ddpm", "digits-sigreg-vit")}
    digest = {folder: hashlib.sha256(text.encode()).hexdigest() for folder, text in listing.items()}
    assert (f"# model: pixel-unet from models/digits-ddpm; weights sha256:{digest['digits-ddpm']}; licence: not stated\n"
            in card)  # the demo model's folder states no licence; its encoder's config.json does
    assert (f"# encoder: vit_small_patch14_reg4_dinov2 from models/digits-sigreg-vit; weights "
            f"sha256:{digest['digits-sigreg-vit']}; licence: apache-2.0\n") in card
    made = json.loads((tmp_path / "demo" / "jepa" / RUN_FILE).read_text())
    config_digest = hashlib.sha256(json.dumps(made["config"], sort_keys=True).encode()).hexdigest()
    assert f"# config digest: sha256:{config_digest}; manifest digest: {made['manifest_digest']}\n" in card
    assert '"keep_fraction": 0.25' in card and '"per": "class_label"' in card and "# filter rule: " in card
    assert "# 2 rows; model: pixel-unet (2)" in card and "# 2 of 8 rows of " in card
    rarest_run = next(r for r in runs if r.info.run_name.startswith("rarest:")).info
    assert (f"# MLflow run {rarest_run.run_id} in experiment 'jepa-minority-demo' of {tracking} "
            f"(generation run {guided_run.run_id})\n") in card
    assert re.search(rf"# made \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 with jepa-minority "
                     rf"{re.escape(version('jepa-minority'))}, torch ", card)
