"""jepa-minority check-prior: the verdict as a pure function of known correlations, then whole checks
on a real folder of images and a Parquet run, scored by the tiny random encoder, against a real MLflow store."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import scipy.stats
import torch
from mlflow import MlflowClient
from PIL import Image

from guidance import jepa_score, jepa_scores, load_encoder
from jobs import check_prior as check_prior_job
from pipeline.evaluate.features import FeatureSpace
from pipeline.nuisance import CHANGES, perturb
from pipeline.evaluate.prior import class_frequency, prior_summary, robust_spread, verdict
from pipeline.evaluate.rarity import avg_knn_within
from pipeline.evaluate.config import ScoreConfig
from pipeline.evaluate.scoring import score_images
from tests.conftest import ENCODER_NAME, TINY_SIZE
from tests.test_evaluation import fake_run, reference_folder


def test_verdict_follows_the_sign_convention():
    assert verdict(-0.42, 1000, 1e-9) == "JEPA-SCORE falls with rarity here (Spearman -0.42 on 1,000 images)"
    assert verdict(0.07, 300, 0.2) == (
        "JEPA-SCORE does not track rarity here (Spearman +0.07 on 300 images; p = 0.20: too few images to be sure "
        "of the sign): guidance will find images that are rare to this encoder, not rare in this data")
    assert verdict(0.3, 50, 0.01).startswith("JEPA-SCORE rises with rarity here (Spearman +0.30 on 50 images): "
                                             "guidance will push towards typical images")
    assert verdict(-0.1, 10).startswith("JEPA-SCORE falls") and verdict(0.1, 10).startswith("JEPA-SCORE rises")
    assert verdict(-0.09, 10).startswith("JEPA-SCORE does not track")
    assert "not independent" in verdict(-0.5, 10, space=FeatureSpace.parse("encoder"))
    assert verdict(None, 7).startswith("JEPA-SCORE cannot be compared with rarity here")


def test_prior_summary_on_scores_that_are_known_functions_of_rarity():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 3))
    rarity = avg_knn_within(features, 4)
    space = FeatureSpace.parse("pixels-8")
    falls, _ = prior_summary(-rarity ** 2, features, space, k=4)  # lower score exactly where rarer
    assert falls["spearman"] == pytest.approx(-1) and falls["verdict"].startswith("JEPA-SCORE falls with rarity")
    rises, _ = prior_summary(np.exp(rarity), features, space, k=4, topk=(3, -rarity))
    assert rises["spearman"] == pytest.approx(1) and rises["verdict"].startswith("JEPA-SCORE rises with rarity")
    assert rises["topk"]["spearman"] == pytest.approx(-1) and rises["topk"]["guidance_k"] == 3
    assert rises["topk"]["verdict"].startswith("The top-3 score falls with rarity")
    assert "topk" not in falls
    assert [b["images"] for b in falls["binned"]] == [6] * 10
    assert np.all(np.diff([b["avg_knn"] for b in falls["binned"]]) > 0)  # rarest bin last
    assert np.all(np.diff([b["jepa_score"] for b in falls["binned"]]) < 0)

    # rarer classes score lower: the per-class mean rises with the class's frequency
    labels = [c for c, n in zip("abcd", (1, 2, 3, 4)) for _ in range(n)]
    scores = np.array([{"a": -9.0, "b": -5.0, "c": -4.0, "d": -1.0}[c] for c in labels])
    classes = class_frequency(scores, labels)
    assert classes["spearman"] == pytest.approx(1)
    assert classes["classes"]["c"] == {"images": 3, "jepa_score": -4.0}


@pytest.fixture
def tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlruns/mlflow.db"


def test_check_prior_on_a_folder_with_labels_and_a_subsample(tmp_path, tiny_vit_folder, tracking_uri, capsys):
    images = reference_folder(tmp_path / "real", count=12, size=8)
    (tmp_path / "labels.csv").write_text("".join(f"{p.name},{'abc'[i % 3]}\n" for i, p in enumerate(images)))
    args = [str(tmp_path / "real"), "--encoder", ENCODER_NAME, "--weights", str(tiny_vit_folder), "--input-size",
            str(TINY_SIZE), "--features", "pixels-8", "--k", "3", "--labels", str(tmp_path / "labels.csv"),
            "--tracking-uri", tracking_uri, "--device", "cpu"]
    assert check_prior_job.main([*args, "--guidance-k", "4", "--nuisances", "brightness, dilation",
                                 "--output", str(tmp_path / "check")]) == 0
    printed = capsys.readouterr().out.splitlines()
    summary = json.loads((tmp_path / "check" / "prior_check.json").read_text())
    assert printed[:2] == [summary["verdict"], summary["topk"]["verdict"]]
    assert printed[2:-3] == summary["nuisance"]["verdicts"] != []
    assert printed[-1].startswith("browse:  mlflow ui ") and "/#/experiments/" in printed[-1]  # the runs page

    # the score is the exact JEPA-SCORE of `jepa-minority score`, rarity the leave-one-out AvgkNN in pixels-8
    scored = {row.path: row.score for row in score_images(ScoreConfig(
        paths=(str(tmp_path / "real"),), encoder=ENCODER_NAME, weights=str(tiny_vit_folder), input_size=TINY_SIZE)).rows}
    scores = np.array([scored[str(p)] for p in images])
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float64).reshape(-1) / 255 for p in images])
    rho, p_value = scipy.stats.spearmanr(scores, avg_knn_within(pixels, 3))
    assert summary["spearman"] == pytest.approx(rho, abs=1e-9) and summary["p_value"] == pytest.approx(p_value)
    assert summary["verdict"] == verdict(rho, 12, p_value)  # the line's sign is the computed one
    # the score guidance descends, checked the same way: the exact top-4 log-volume, recomputed here
    encoder = load_encoder(ENCODER_NAME, tiny_vit_folder, input_size=TINY_SIZE)
    _, topk = jepa_scores(encoder, encoder.resize(torch.from_numpy(pixels).float().view(-1, 8, 8, 3).permute(0, 3, 1, 2)), 4)
    rho_k, p_k = scipy.stats.spearmanr(topk.numpy(), avg_knn_within(pixels, 3))
    assert summary["topk"]["guidance_k"] == 4 and summary["topk"]["spearman"] == pytest.approx(rho_k, abs=1e-9)
    assert summary["topk"]["verdict"] == verdict(rho_k, 12, p_k, score="The top-4 score")
    assert rho_k != pytest.approx(rho, abs=1e-3)  # a different score, so the check can tell them apart
    # nuisance sensitivity: every image (12 < 64) changed at its own size, then resized and scored
    nuisance = summary["nuisance"]
    assert nuisance["images"] == 12 and list(nuisance["nuisances"]) == ["brightness", "dilation"]
    images8 = torch.from_numpy(pixels).float().view(-1, 8, 8, 3).permute(0, 3, 1, 2)
    for name in nuisance["nuisances"]:
        exact, top = jepa_scores(encoder, encoder.resize(perturb(name, images8, torch.Generator())), 4)
        for score, values, moved in (("jepa_score", scores, exact), ("topk_score", topk.numpy(), top)):
            change = np.median(np.abs(moved.numpy() - values))
            assert nuisance["nuisances"][name][score]["ratio"] == pytest.approx(change / robust_spread(values), rel=1e-3)
    assert summary["feature_space"] == "pixels-8" and summary["independent"] is True
    assert summary["images"] == summary["reference_images"] == 12 and summary["subsample"] is None
    classes = summary["class_frequency"]["classes"]
    assert {name: c["images"] for name, c in classes.items()} == {"a": 4, "b": 4, "c": 4}
    assert classes["b"]["jepa_score"] == pytest.approx(scores[1::3].mean(), abs=1e-6)
    assert (tmp_path / "check" / "prior_check.png").read_bytes()[:4] == b"\x89PNG"
    run = MlflowClient(tracking_uri=tracking_uri).get_run(summary["run_id"])
    assert run.data.metrics["spearman"] == pytest.approx(rho)
    assert run.data.metrics["nuisance_dilation"] == pytest.approx(nuisance["nuisances"]["dilation"]["jepa_score"]["ratio"])
    assert run.data.metrics["nuisance_brightness_topk"] == pytest.approx(
        nuisance["nuisances"]["brightness"]["topk_score"]["ratio"])
    assert {a.path for a in MlflowClient(tracking_uri=tracking_uri).list_artifacts(summary["run_id"])} == {
        "prior_check.json", "prior_check.png"}

    assert check_prior_job.main([*args, "--max-images", "8", "--seed", "3", "--nuisance-images", "3",
                                 "--output", str(tmp_path / "sub")]) == 0
    sub = json.loads((tmp_path / "sub" / "prior_check.json").read_text())
    assert sub["nuisance"]["images"] == 3 and list(sub["nuisance"]["nuisances"]) == list(CHANGES)  # the default: all
    assert sub["images"] == 8 and sub["reference_images"] == 12 and sub["subsample"]["seed"] == 3
    assert sum(c["images"] for c in sub["class_frequency"]["classes"].values()) == 8


def test_check_prior_on_a_parquet_run_scores_its_images_and_reads_a_label_column(
        tmp_path, tiny_vit_folder, tracking_uri, capsys):
    table = fake_run(tmp_path / "run", "unguided", 0, count=10, prompts=False)
    (tmp_path / "gen.yaml").write_text(f"encoder:\n  name: {ENCODER_NAME}\n  weights: {tiny_vit_folder}\n"
                                       f"  input_size: {TINY_SIZE}\nsampling:\n  guidance:\n    k: 3\n")
    assert check_prior_job.main([str(tmp_path / "run"), "--config", str(tmp_path / "gen.yaml"), "--labels",
                                 "class_label", "--k", "2", "--device", "cpu", "--nuisances", "none",
                                 "--tracking-uri", tracking_uri]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("JEPA-SCORE ") and "under" not in printed and "No nuisance" not in printed
    encoder = load_encoder(ENCODER_NAME, tiny_vit_folder, input_size=TINY_SIZE)
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")).copy())
                          .permute(2, 0, 1) for r in table.column("image").to_pylist()]).float() / 255
    scores = jepa_score(encoder, encoder.resize(pixels)).numpy()  # recomputed, not the stored column
    client = MlflowClient(tracking_uri=tracking_uri)
    (experiment,) = client.search_experiments(filter_string="name != 'Default'")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["images"] == 10 and run.data.tags["reference_uri"] == str(tmp_path / "run")
    with open(client.download_artifacts(run.info.run_id, "prior_check.json", str(tmp_path))) as handle:
        summary = json.load(handle)
    assert summary["feature_space"] == "pixels-32"  # the default without weights files
    assert summary["topk"]["guidance_k"] == 3  # the generation config's guidance k
    assert summary["class_frequency"]["classes"]["0"]["jepa_score"] == pytest.approx(scores[0::2].mean(), abs=1e-5)
    assert summary["class_frequency"]["spearman"] is None  # two classes: no rank correlation
    assert "nuisance" not in summary  # --nuisances none


def test_bad_input_is_refused_in_one_line(tmp_path, tiny_vit_folder, tracking_uri, capsys):
    reference_folder(tmp_path / "real", count=4, size=8)
    fake_run(tmp_path / "run", "unguided", 0, count=6)
    base = ["--weights", str(tiny_vit_folder), "--input-size", str(TINY_SIZE), "--tracking-uri", tracking_uri,
            "--output", str(tmp_path / "check")]

    def refused(*args) -> str:
        assert check_prior_job.main([*args, *base]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("jepa-minority check-prior: ")
        return err

    assert f"reference {tmp_path / 'missing'} not found" in refused(str(tmp_path / "missing"))
    assert "has 4 images but AvgkNN with k = 5 needs more than k: lower --k to at most 3" in refused(str(tmp_path / "real"))
    (tmp_path / "labels.json").write_text(json.dumps({"img00.png": "a"}))
    assert "has no label for 3 image(s), e.g. img01.png" in refused(str(tmp_path / "real"), "--k", "2",
                                                                    "--labels", str(tmp_path / "labels.json"))
    assert "--labels species is not a file" in refused(str(tmp_path / "real"), "--labels", "species")
    assert "lacks the column(s) species" in refused(str(tmp_path / "run"), "--labels", "species")
    assert "column class_label of" in refused(str(tmp_path / "run"), "--k", "2", "--labels", "class_label")
    assert "feature space inception needs --inception-weights" in refused(str(tmp_path / "real"), "--features",
                                                                          "inception")
    assert "unknown feature space 'pixel-8'" in refused(str(tmp_path / "real"), "--features", "pixel-8")
    assert "unknown nuisance(s) glare: choose from brightness," in refused(str(tmp_path / "real"), "--nuisances",
                                                                         "brightness,glare")
    assert "nuisance_images must be >= 1" in refused(str(tmp_path / "real"), "--nuisance-images", "0")
    assert not (tmp_path / "check" / "prior_check.json").exists()
