"""Downstream: do a sampler's samples help a classifier on the real minority? (the paper's augmentation table in small)

No rarity metric judges the samples here; a classifier does:
1. A minority-poor training split: each class's rarest quarter of the training digits, by leave-one-out
   AvgkNN in raw pixels (16 x 16 grey; ``minority_mask`` of pipeline/evaluate/minority.py, per class),
   loses ``--drop`` of its rows, drawn per seed.
2. The demo's digit classifier recipe (pipeline/demo/digits.py: an SVM, gamma 0.001, on 8 x 8 grey digits)
   trained on that split alone (no augmentation) and on it plus N and 0.6 N samples of each sampled arm,
   labelled with the class each sample was conditioned on. The draw varies with the seed and is the same
   for every arm: index i is the same work item (seed, class) in every arm of one arms file.
3. Scored on the held-out digits and on their minority slice, the minority test's reference (the rarest
   quarter by leave-one-out AvgkNN; docs/method.md, 'The minority test'): accuracy, macro-F1, macro
   precision and macro recall (macro over the classes the slice holds).
Over seeds: each figure's mean with a 95% t-interval, and each arm's difference from no augmentation and
from unguided samples at the same N, paired by seed, with its t-interval.

The arms come from ``python -m benchmarks.demo_evidence --save-arms FILE.npz``; then run
``python -m benchmarks.downstream --arms FILE.npz``.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import stats
from sklearn.metrics import precision_recall_fscore_support

from benchmarks.paths import RESULTS, write_json
from pipeline.demo.digits import digits, fit_digit_svm, to_8x8
from pipeline.evaluate.evidence import DEFAULT_SPACE
from pipeline.evaluate.minority import MinorityConfig, minority_mask
from pipeline.pixels import PixelSpace

SPACE = PixelSpace.parse(DEFAULT_SPACE)  # where rarity is measured: the demo evidence's pixel space
MINORITY = MinorityConfig()  # the held-out minority slice: the minority test's reference, as the demo evidence chooses it
METRICS = ("accuracy", "macro_f1", "macro_precision", "macro_recall")
SLICES = ("held_out", "minority")
NONE = "no augmentation"
UNGUIDED = "unguided"
SMALLER_VOLUME = 0.6  # the second volume, as a share of N: the paper's "30K beats 50K" in small


@dataclass(frozen=True)
class DownstreamConfig:
    """What is dropped, what is added, and how often it is redrawn."""

    arms: Path  # the .npz of ``benchmarks.demo_evidence --save-arms``
    samples: int | None = None  # N, the samples of each arm added; None: the smallest arm's size
    drop: float = 0.8  # the share of each class's rarest quarter removed from the training digits
    quantile: float = MINORITY.quantile  # the rarest share of each training class that loses ``drop`` of its rows
    seeds: int = 10  # redraws of the dropped rows and the added samples
    confidence: float = 0.95  # of the t-intervals over seeds

    def __post_init__(self):
        if self.samples is not None and self.samples < 2:
            raise ValueError(f"--samples must be at least 2 (N and 0.6 N samples are added), got {self.samples}")
        if not 0 <= self.drop <= 1:
            raise ValueError(f"--drop is a share of the rarest rows, between 0 and 1; got {self.drop}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"--quantile must lie strictly between 0 and 1, got {self.quantile}")
        if self.seeds < 2:
            raise ValueError(f"--seeds must be at least 2 for an interval over seeds, got {self.seeds}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"--confidence must lie strictly between 0 and 1, got {self.confidence}")


@dataclass(frozen=True)
class Samples:
    """One sampled arm: uint8 images (n, H, W[, C]) and the class each was conditioned on."""

    name: str
    images: np.ndarray
    labels: np.ndarray


def read_arms(path: Path) -> list[Samples]:
    """The arms an arms file holds; a ValueError that names the file and how to make one when it is not one."""
    remedy = "make one with: python -m benchmarks.demo_evidence --save-arms FILE.npz"
    try:
        with np.load(path) as data:
            arms = [Samples(str(name), data[f"images_{i}"], data[f"labels_{i}"]) for i, name in enumerate(data["names"])]
    except FileNotFoundError:
        raise ValueError(f"--arms {path}: no such file; {remedy}") from None
    except (KeyError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"--arms {path} is not an arms file ({error}); {remedy}") from None
    names = [arm.name for arm in arms]
    if UNGUIDED not in names:
        raise ValueError(f"--arms {path} holds no {UNGUIDED!r} arm (it holds {', '.join(names) or 'none'}); {remedy}")
    for arm in arms:
        if arm.images.dtype != np.uint8 or arm.images.ndim not in (3, 4) or len(arm.images) != len(arm.labels):
            raise ValueError(f"--arms {path}: arm {arm.name!r} holds images {arm.images.shape} {arm.images.dtype} and "
                             f"{len(arm.labels)} labels, not uint8 (n, H, W[, C]) images with one label each; {remedy}")
    return arms


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images (n, H, W[, C]) as vectors of the pixel space (grey, 16 x 16, values in [0, 1])."""
    return np.stack([SPACE.vector(Image.fromarray(image)) for image in images]).astype(np.float64)


def real_digits(part: str) -> tuple[np.ndarray, np.ndarray]:
    """The training or held-out digits as uint8 grey images, as the demo's reference holds them, and labels."""
    images, labels = digits(SPACE.size, part)
    return (images[:, 0] * 255).round().to(torch.uint8).numpy(), labels.numpy()


def classifier_input(vectors: np.ndarray) -> np.ndarray:
    """Pixel-space vectors as the demo classifier's 8 x 8, 0..16 grey digits."""
    return to_8x8(torch.from_numpy(vectors.reshape(-1, 1, SPACE.size, SPACE.size)))


def minority_poor(features: np.ndarray, labels: np.ndarray, quantile: float, drop: float,
                  rng: np.random.Generator) -> np.ndarray:
    """The rows kept: within each class, ``round(drop * m)`` of its ``m`` rarest rows (the rarest ``quantile``
    by leave-one-out AvgkNN, ``minority_mask``) are removed, drawn by ``rng``."""
    rare = minority_mask(features, MINORITY.k, quantile, labels)
    dropped = [rng.choice(rows, round(drop * len(rows)), replace=False)
               for rows in (np.flatnonzero(rare & (labels == label)) for label in np.unique(labels))]
    return np.setdiff1d(np.arange(len(labels)), np.concatenate(dropped))


def scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1, macro over the classes ``truth`` holds (none scores 0)."""
    precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, labels=np.unique(truth),
                                                               average="macro", zero_division=0)
    return {"accuracy": float(np.mean(truth == predicted)), "macro_f1": float(f1),
            "macro_precision": float(precision), "macro_recall": float(recall)}


def summary(values: list[float], confidence: float) -> dict:
    """The mean over seeds and its t-interval at ``confidence``, with the per-seed values."""
    values = np.asarray(values, np.float64)
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    mean = float(values.mean())
    return {"mean": mean, "low": mean - float(half), "high": mean + float(half), "per_seed": values.tolist()}


def difference(row: dict, base: dict, confidence: float) -> dict:
    """Row minus base for every slice and metric, paired by seed, as ``summary`` gives it."""
    return {part: {metric: summary(np.subtract(row[part][metric]["per_seed"], base[part][metric]["per_seed"]), confidence)
                   for metric in METRICS} for part in SLICES}


def measure(config: DownstreamConfig, arms: list[Samples]) -> tuple[list[dict], dict]:
    """Every (arm, volume) row's figures over seeds, and the split's facts."""
    smallest = min(len(arm.images) for arm in arms)
    full = config.samples or smallest
    if full > smallest:
        raise ValueError(f"--samples {full} is more than the smallest arm holds ({smallest}): give at most {smallest}")
    volumes = (full, round(SMALLER_VOLUME * full))
    train_images, train_labels = real_digits("train")
    held_images, held_labels = real_digits("held_out")
    train, held = pixels(train_images), pixels(held_images)
    slices = {"held_out": np.ones(len(held), bool), "minority": minority_mask(held, MINORITY.k, MINORITY.quantile)}
    added = {arm.name: (classifier_input(pixels(arm.images)), arm.labels) for arm in arms}
    train_x, held_x = classifier_input(train), classifier_input(held)
    values: dict[tuple[str, int], dict] = {}
    kept_counts = []
    for seed in range(config.seeds):
        rng = np.random.default_rng(seed)
        kept = minority_poor(train, train_labels, config.quantile, config.drop, rng)
        kept_counts.append(len(kept))
        draws = {volume: rng.choice(smallest, volume, replace=False) for volume in volumes}
        runs = [(NONE, 0, train_x[kept], train_labels[kept])]
        runs += [(name, volume, np.concatenate([train_x[kept], x[draws[volume]]]),
                  np.concatenate([train_labels[kept], y[draws[volume]]]))
                 for name, (x, y) in added.items() for volume in volumes]
        for name, volume, x, y in runs:
            predicted = fit_digit_svm(x, y).predict(held_x)
            row = values.setdefault((name, volume), {part: {metric: [] for metric in METRICS} for part in SLICES})
            for part, mask in slices.items():
                for metric, value in scores(held_labels[mask], predicted[mask]).items():
                    row[part][metric].append(value)
    rows = [{"arm": name, "samples": volume,
             **{part: {metric: summary(figures[part][metric], config.confidence) for metric in METRICS} for part in SLICES}}
            for (name, volume), figures in values.items()]
    none = rows[0]
    for row in rows[1:]:
        row["vs_none"] = difference(row, none, config.confidence)
        if row["arm"] != UNGUIDED:
            unguided = next(r for r in rows if r["arm"] == UNGUIDED and r["samples"] == row["samples"])
            row["vs_unguided"] = difference(row, unguided, config.confidence)
    split = {"training_digits": len(train), "kept_per_seed": kept_counts, "held_out_digits": len(held),
             "minority_slice": int(slices["minority"].sum()), "volumes": list(volumes), "arm_size": smallest}
    return rows, split


def _cell(figure: dict, signed: bool = False) -> str:
    form = "{:+.3f}" if signed else "{:.3f}"
    return f"{form.format(figure['mean'])} [{form.format(figure['low'])}, {form.format(figure['high'])}]"


def markdown(rows: list[dict], part: str) -> str:
    """One slice's table: every row's figures (mean [95% interval] over seeds) and its macro-F1 differences."""
    head = ("training set", "samples added", "accuracy", "macro-F1", "macro precision", "macro recall",
            "Δ macro-F1 vs no augmentation", "Δ macro-F1 vs unguided samples")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        deltas = [_cell(row[key][part]["macro_f1"], signed=True) if key in row else "—" for key in ("vs_none", "vs_unguided")]
        lines.append("| " + " | ".join([row["arm"], str(row["samples"]), *(_cell(row[part][m]) for m in METRICS),
                                        *deltas]) + " |")
    return "\n".join(lines)


def _interval(figure: dict) -> str:
    return f"{figure['mean']:+.3f} (95% interval {figure['low']:+.3f} to {figure['high']:+.3f})"


def conclusion(rows: list[dict], confidence: float) -> str:
    """Plainly: which sampler's samples, at the full volume, raise minority-slice macro-F1 most beyond unguided
    samples (only when the interval lies above 0), and whether its smaller volume beats unguided's full one."""
    full = max(row["samples"] for row in rows)
    guided = [row for row in rows if row["samples"] == full and "vs_unguided" in row]
    unguided = next(row for row in rows if row["arm"] == UNGUIDED and row["samples"] == full)
    effect = f"Unguided samples themselves change it by {_interval(unguided['vs_none']['minority']['macro_f1'])} against no augmentation."
    if not guided:
        return f"Only unguided samples were given, at {full} samples. {effect}"
    best = max(guided, key=lambda row: row["vs_unguided"]["minority"]["macro_f1"]["mean"])
    gain = best["vs_unguided"]["minority"]["macro_f1"]
    smaller = next(row for row in rows if row["arm"] == best["arm"] and row["samples"] < full)
    volume = difference(smaller, unguided, confidence)["minority"]["macro_f1"]
    if gain["low"] > 0:
        head = (f"The samples of {best['arm']} help a classifier most on the minority slice: macro-F1 {_interval(gain)} "
                f"against unguided samples, {full} added.")
    else:
        head = (f"No sampler's samples help a classifier on the minority slice beyond unguided samples: the best, "
                f"{best['arm']}, changes macro-F1 by {_interval(gain)} against unguided samples, {full} added.")
    return (f"{head} {effect} {smaller['samples']} samples of {best['arm']} against {full} unguided ones: "
            f"{_interval(volume)}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", type=Path, required=True, help="the .npz of benchmarks.demo_evidence --save-arms")
    parser.add_argument("--samples", type=int, default=None,
                        help="N, the samples of each arm added (0.6 N too); default: the smallest arm's size")
    parser.add_argument("--drop", type=float, default=DownstreamConfig.drop,
                        help="share of each class's rarest quarter of training digits removed")
    parser.add_argument("--seeds", type=int, default=DownstreamConfig.seeds,
                        help="redraws of the dropped rows and the added samples")
    parser.add_argument("--output", type=Path, default=RESULTS / "downstream.json", help="the results JSON")
    args = parser.parse_args()
    try:
        config = DownstreamConfig(args.arms, args.samples, args.drop, seeds=args.seeds)
        arms = read_arms(config.arms)
        rows, split = measure(config, arms)
    except ValueError as error:
        parser.exit(2, f"downstream: {error}\n")
    tables = {part: markdown(rows, part) for part in SLICES}
    sentence = conclusion(rows, config.confidence)
    print("Minority slice:", tables["minority"], "All held-out digits:", tables["held_out"], sentence, sep="\n")
    write_json(args.output, {
        "command": " ".join(["python -m benchmarks.downstream", *sys.argv[1:]]),
        "settings": {"arms": str(config.arms), "drop": config.drop, "quantile": config.quantile, "seeds": config.seeds,
                     "confidence": config.confidence, "k": MINORITY.k, "space": SPACE.name,
                     "minority_slice_rule": f"held-out rarest {MINORITY.quantile:g} by leave-one-out AvgkNN",
                     "classifier": "the demo's digit classifier recipe (pipeline/demo/digits.py, fit_digit_svm): an RBF SVM on 8 x 8 grey digits",
                     "interval": f"t over seeds, {config.confidence:.0%}; differences paired by seed"} | split,
        "rows": rows, "markdown": tables, "conclusion": sentence})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
