"""The minority test: the reference's rare part, FD and k-NN figures against it, the paired bootstrap,
the noise match, and the verdicts on toy point sets and on the demo's real digits in pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.demo.digits import digits, held_out_images
from pipeline.evaluate.features import FeatureSpace
from pipeline.evaluate.metrics import FrechetToGaussian, Gaussian, Moments, frechet_distance, manifold_metrics
from pipeline.evaluate.minority import (NOISE_TOLERANCE, RESAMPLED, MinorityConfig, MinorityReference, match_noise,
                                        minority_mask, minority_test)
from pipeline.evaluate.rarity import avg_knn, avg_knn_within

DIM = 6
QUICK = MinorityConfig(resamples=200)


def cloud(rng: np.random.Generator, n: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    centre = np.zeros(DIM)
    centre[0] = shift
    return rng.normal(0, scale, (n, DIM)) + centre


@pytest.fixture(scope="module")
def toy():
    """A dense cloud of 540 points and a sparse one of 60 far along the first axis: the reference;
    150 fresh points of the dense cloud: a typical baseline."""
    rng = np.random.default_rng(0)
    reference = np.concatenate([cloud(rng, 540), cloud(rng, 60, shift=6)])
    return reference, cloud(rng, 150), rng


def test_the_minority_is_the_rarest_quantile_by_leave_one_out_avgknn_and_per_class_within_each():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(40, 3))
    within = avg_knn_within(reference, 5)
    mask = minority_mask(reference, 5, 0.25)
    assert mask.sum() == 10 and within[mask].min() > within[~mask].max()
    labels = np.repeat([0, 1], 20)
    reference[20:] = 4 * reference[20:] + 20  # class 1 apart and spread out: overall it takes every minority place
    assert minority_mask(reference, 5, 0.25)[20:].sum() == 10
    per_class = minority_mask(reference, 5, 0.25, labels)
    assert per_class[:20].sum() == per_class[20:].sum() == 5
    within = avg_knn_within(reference, 5)
    assert within[:20][per_class[:20]].min() > within[:20][~per_class[:20]].max()


def test_fd_of_resampled_rows_equals_the_frechet_distance_of_their_gaussian():
    rng = np.random.default_rng(2)
    target_rows, rows = rng.normal(size=(50, 4)) @ rng.normal(size=(4, 4)), rng.normal(1, 2, (30, 4))
    moments = Moments(4)
    moments.add(target_rows)
    target = Gaussian.of(moments)
    index = rng.integers(0, 30, 30)  # repeats, as a bootstrap draws
    drawn = rows[index]
    want = frechet_distance(target.mean, target.cov, drawn.mean(0), np.cov(drawn, rowvar=False))
    assert FrechetToGaussian(rows, target)(index) == pytest.approx(want, rel=1e-9)
    assert FrechetToGaussian(rows, target)() == pytest.approx(
        frechet_distance(target.mean, target.cov, rows.mean(0), np.cov(rows, rowvar=False)), rel=1e-9)


def test_resampled_ball_figures_equal_prdc_on_every_row(toy):
    reference, baseline, _ = toy
    chosen = MinorityReference(reference, QUICK)
    figures = chosen.figures(baseline)
    every = figures.resampled(np.arange(len(baseline)))
    whole = figures.whole()
    assert {name: every[name] for name in RESAMPLED} == pytest.approx({name: whole[name] for name in RESAMPLED})
    assert whole["precision_all"] == manifold_metrics(reference, baseline, 5)["precision"]
    assert whole["nearest_minority_share"] < chosen.mask.mean()  # typical rows: their nearest real rows are seldom rare


def test_toy_verdicts_rare_points_are_minority_noise_is_off_data_a_copy_is_typical(toy):
    reference, baseline, rng = toy
    chosen = MinorityReference(reference, QUICK)
    rare = minority_test(reference[chosen.mask], baseline, chosen)
    assert rare["verdict"] == "minority"
    assert rare["fd_minority"] == pytest.approx(0, abs=1e-9) and rare["intervals"]["fd_minority"][1] < 0
    assert rare["nearest_minority_share"] == 1.0 > rare["baseline"]["nearest_minority_share"]
    noisy = minority_test(baseline + rng.normal(0, 2, baseline.shape), baseline, chosen)
    assert noisy["verdict"] == "off-data"
    assert noisy["avg_knn"] > noisy["baseline"]["avg_knn"] and noisy["intervals"]["avg_knn"][0] > 0
    copy = minority_test(baseline.copy(), baseline, chosen)
    assert copy["verdict"] == "typical" and copy["fd_minority"] == copy["baseline"]["fd_minority"]
    assert copy["equal_rarity"]["sigma"] == 0.0


def test_the_verdict_is_inconclusive_when_closer_but_less_precise_than_the_margin(toy):
    reference, baseline, _ = toy
    chosen = MinorityReference(reference, QUICK)
    rare = reference[chosen.mask]
    outside = rare + 0.8 * np.sign(rare)  # pushed outwards: still nearer the rare part, but off the real balls
    result = minority_test(outside, baseline, chosen)
    assert result["fd_minority"] < result["baseline"]["fd_minority"]
    assert result["precision_all"] < result["baseline"]["precision_all"] - QUICK.precision_margin
    assert result["verdict"] == "inconclusive"
    lenient = MinorityReference(reference, MinorityConfig(resamples=200, precision_margin=1.0))
    assert minority_test(outside, baseline, lenient)["verdict"] == "minority"


def test_the_bootstrap_pairs_rows_by_seed_not_by_position(toy):
    reference, baseline, rng = toy
    chosen = MinorityReference(reference, QUICK)
    seeds = np.arange(len(baseline)) + 1000
    run = baseline + rng.normal(0, 0.3, baseline.shape)  # each row near its baseline row of the same seed
    order = rng.permutation(len(run))
    paired = minority_test(run, baseline, chosen, (seeds, seeds))
    shuffled = minority_test(run[order], baseline, chosen, (seeds[order], seeds))
    assert paired["paired"] and shuffled["intervals"] == paired["intervals"]
    unpaired = minority_test(run, baseline, chosen)
    assert not unpaired["paired"] and minority_test(run[order], baseline, chosen)["intervals"] != unpaired["intervals"]
    width = lambda result: np.diff(result["intervals"]["avg_knn"])[0]
    assert width(paired) < 0.5 * width(unpaired)  # the shared seeds' variation cancels


def test_bisection_finds_the_noise_that_matches_the_target_avgknn(toy):
    reference, baseline, _ = toy
    target = 1.5 * avg_knn(baseline, reference, 5).mean()
    sigma, reached = match_noise(baseline, reference, target, 5, seed=3)
    assert sigma > 0 and abs(reached - target) <= NOISE_TOLERANCE * target
    noise = np.random.default_rng(3).standard_normal(baseline.shape)
    assert avg_knn(baseline + sigma * noise, reference, 5).mean() == pytest.approx(reached)
    assert match_noise(baseline, reference, 100.0, 5, seed=3, bounds=(0, 1))[0] is None  # clipping caps AvgkNN
    assert match_noise(baseline, reference, 0.0, 5, seed=3)[0] == 0.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="strictly between 0 and 1, got 1.5"):
        MinorityConfig(quantile=1.5)
    with pytest.raises(ValueError, match="per-class minority needs the reference's class labels"):
        MinorityReference(np.zeros((30, 2)), MinorityConfig(per_class=True))
    with pytest.raises(ValueError, match="the minority reference holds 2 rows"):
        MinorityReference(np.random.default_rng(0).normal(size=(8, 2)), MinorityConfig())


def pixels(images: torch.Tensor) -> np.ndarray:
    space = FeatureSpace.parse("pixels-16-grey")
    grey = (images[:, 0] * 255).round().to(torch.uint8).numpy()
    return np.stack([space.pixels(Image.fromarray(g, mode="L")) for g in grey]).astype(np.float64)


@pytest.mark.slow  # three bootstraps in 256 pixels: about 40 s alone, minutes on a loaded machine
def test_real_digits_rare_training_digits_are_minority_noise_is_off_data_a_copy_is_typical():
    real, _ = held_out_images()
    space = FeatureSpace.parse("pixels-16-grey")
    reference = np.stack([space.pixels(image) for image in real]).astype(np.float64)
    training = pixels(digits(16, "train")[0])
    rng = np.random.default_rng(0)
    baseline = training[rng.choice(len(training), 200, replace=False)]
    rare = training[np.argsort(-avg_knn_within(training, 5))[:200]]  # the rarest real training digits
    chosen = MinorityReference(reference, QUICK)
    assert minority_test(rare, baseline, chosen, bounds=(0, 1))["verdict"] == "minority"
    noisy = minority_test(np.clip(baseline + rng.normal(0, 0.08, baseline.shape), 0, 1), baseline, chosen, bounds=(0, 1))
    assert noisy["verdict"] == "off-data"
    assert noisy["equal_rarity"]["noisy"]["precision"] == pytest.approx(noisy["precision_all"], abs=0.05)
    assert minority_test(baseline.copy(), baseline, chosen, bounds=(0, 1))["verdict"] == "typical"


def test_a_subset_of_the_baselines_seeds_is_resampled_on_its_own():
    """A curated subset (10 of 200 seeds) paired by seed could draw seeds holding none of its rows; it is
    tested unpaired, and its intervals exist."""
    rng = np.random.default_rng(3)
    reference = rng.standard_normal((300, 4))
    baseline, seeds = rng.standard_normal((200, 4)), np.arange(200)
    chosen = MinorityReference(reference, MinorityConfig(resamples=50))
    subset = minority_test(baseline[:10] * 1.5, baseline, chosen, (seeds[:10], seeds))
    assert not subset["paired"] and all(np.isfinite(subset["intervals"]["fd_minority"]))
    assert minority_test(baseline * 1.5, baseline, chosen, (seeds, seeds))["paired"]
