"""The downstream benchmark's parts: the minority-poor split drops only each class's rarest rows, as many as
asked; the scores, intervals and paired differences give known answers; bad input is one line."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from benchmarks.downstream import METRICS, SLICES, conclusion, difference, main, minority_poor, read_arms, scores, summary

T_975_2 = 4.302652729911275  # the 97.5% quantile of Student's t with 2 degrees of freedom (any t table)


def _two_classes() -> tuple[np.ndarray, np.ndarray, set[int]]:
    """Two classes of 8 points on a line: 6 packed ones and 2 far from everything, the rarest quarter of each."""
    class_0 = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 20.0, 40.0]
    class_1 = [100.0, 100.1, 100.2, 100.3, 100.4, 100.5, 60.0, 80.0]
    features = np.array(class_0 + class_1)[:, None]
    return features, np.repeat([0, 1], 8), {6, 7, 14, 15}


@pytest.mark.parametrize("drop, dropped_per_class", [(1.0, 2), (0.5, 1), (0.0, 0)])
def test_the_split_drops_the_asked_share_of_each_class_rarest_rows_only(drop, dropped_per_class):
    features, labels, rarest = _two_classes()
    seen = set()
    for seed in range(8):
        kept = minority_poor(features, labels, 0.25, drop, np.random.default_rng(seed))
        dropped = set(range(len(labels))) - set(kept.tolist())
        assert dropped <= rarest
        assert [sum(labels[i] == c for i in dropped) for c in (0, 1)] == [dropped_per_class] * 2
        seen |= dropped
    assert seen == (rarest if drop else set())  # the seed decides which of the rarest go


def test_scores_are_macro_over_the_classes_the_truth_holds():
    figures = scores(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]))
    # per class precision 1/2, 2/3, 0; recall 1/2, 1, 0; F1 1/2, 4/5, 0
    assert figures == pytest.approx({"accuracy": 3 / 5, "macro_precision": (1 / 2 + 2 / 3) / 3,
                                     "macro_recall": 1 / 2, "macro_f1": (1 / 2 + 4 / 5) / 3})
    # a slice without class 1: a wrong prediction of class 2 does not make class 2 count
    assert scores(np.array([0, 0, 1]), np.array([0, 0, 2]))["macro_precision"] == pytest.approx(1 / 2)


def test_summary_is_the_t_interval_over_seeds():
    figure = summary([1.0, 2.0, 3.0], 0.95)
    half = T_975_2 * 1 / np.sqrt(3)  # standard deviation 1 over 3 seeds
    assert (figure["mean"], figure["low"], figure["high"]) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert figure["per_seed"] == [1.0, 2.0, 3.0]


def _row(values: list[float]) -> dict:
    """A row whose every slice and metric has these per-seed values."""
    return {part: {metric: summary(values, 0.95) for metric in METRICS} for part in SLICES}


def test_differences_are_paired_by_seed():

    # seed by seed the arm is 2, 3, 4 better: paired, the interval is that of (2, 3, 4), far from 0;
    # unpaired, the spread across seeds (std 2 and 1) would reach below 0
    gain = difference(_row([3.0, 5.0, 7.0]), _row([1.0, 2.0, 3.0]), 0.95)["minority"]["macro_f1"]
    half = T_975_2 / np.sqrt(3)
    assert gain["mean"] == pytest.approx(3.0)
    assert (gain["low"], gain["high"]) == pytest.approx((3.0 - half, 3.0 + half))


def _rows(gains: dict[str, list[float]]) -> list[dict]:
    """No augmentation, unguided at 10 and 6 samples, and each arm at 10 and 6 with these per-seed gains over unguided."""
    none, unguided = [0.80, 0.81, 0.79], [0.82, 0.84, 0.80]
    rows = [{"arm": "no augmentation", "samples": 0, **_row(none)}]
    rows += [{"arm": "unguided", "samples": n, **_row(unguided)} for n in (10, 6)]
    rows += [{"arm": arm, "samples": n, **_row(np.add(unguided, gain).tolist())} for arm, gain in gains.items() for n in (10, 6)]
    for row in rows[1:]:
        row["vs_none"] = difference(row, rows[0], 0.95)
        if row["arm"] != "unguided":
            row["vs_unguided"] = difference(row, rows[1], 0.95)
    return rows


def test_the_conclusion_names_the_best_sampler_only_when_its_gain_over_unguided_excludes_0():
    clear = conclusion(_rows({"steady": [0.03, 0.02, 0.04], "small": [0.01, 0.0, 0.02]}), 0.95)
    assert clear.startswith("The samples of steady help a classifier most on the minority slice: macro-F1 +0.030")
    noisy = conclusion(_rows({"noisy": [0.09, -0.05, 0.05], "small": [0.01, 0.0, 0.02]}), 0.95)
    assert noisy.startswith("No sampler's samples help a classifier on the minority slice beyond unguided samples: "
                            "the best, noisy, changes macro-F1 by +0.030")


def test_an_arms_file_without_unguided_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "arms.npz"
    np.savez(path, names=np.array(["boost-and-skip"]), images_0=np.zeros((2, 16, 16, 3), np.uint8),
             labels_0=np.array([0, 1]))
    with pytest.raises(ValueError, match="holds no 'unguided' arm"):
        read_arms(path)


@pytest.mark.parametrize("arguments, expected", [
    (["--arms", "missing.npz"], "--arms missing.npz: no such file; make one with: python -m benchmarks.demo_evidence"),
    (["--arms", "x.npz", "--drop", "1.5"], "--drop is a share of the rarest rows, between 0 and 1; got 1.5"),
    (["--arms", "x.npz", "--seeds", "1"], "--seeds must be at least 2"),
])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys, arguments, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["downstream", *arguments, "--output", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit) as exit_:
        main()
    error = capsys.readouterr().err
    assert exit_.value.code == 2
    assert error.startswith(f"downstream: {expected}") and error.count("\n") == 1
    assert not (tmp_path / "out.json").exists()
