"""Rarity evidence for a few sampled arms against held-out real images, in one table.

Each arm (unguided, a guidance setting, a curated set) is measured in a feature space that does not
see the encoder (raw pixels by default; docs/method.md, 'Measuring rarity'): AvgkNN, LOF and Rarity
Score against the real reference (pipeline/evaluate/rarity.py), precision and recall with k-NN balls
(pipeline/evaluate/metrics.py), the class accuracy of a classifier the caller supplies, and the mean
exact JEPA-SCORE, the objective, for comparison. With a baseline arm, each other arm gets the minority
test against it, paired by seed (pipeline/evaluate/minority.py; docs/method.md, 'The minority test'):
an arm is called rarer only when its verdict is minority. Used by the demo's report and its benchmark.
"""

from __future__ import annotations

import html
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.evaluate.features import FeatureSpace
from pipeline.evaluate.metrics import knn_ready, manifold_metrics
from pipeline.evaluate.minority import BASELINE, MinorityConfig, MinorityReference, minority_test
from pipeline.evaluate.rarity import DEFAULT_K, RaritySummary

DEFAULT_SPACE = "pixels-16-grey"
Classifier = Callable[[list[Image.Image]], np.ndarray]  # images -> predicted class labels


@dataclass(frozen=True)
class Arm:
    """One set of samples: its images, the class each was asked for, and their exact JEPA-SCOREs."""

    name: str
    images: list[Image.Image]
    labels: np.ndarray
    jepa_scores: np.ndarray
    seconds_per_sample: float | None = None
    seeds: np.ndarray | None = None  # each sample's generator seed: the minority test pairs arms by it


@dataclass(frozen=True)
class ArmEvidence:
    name: str
    samples: int
    feature_space: str
    avg_knn: float  # larger = rarer, against the real reference
    lof: float
    rarity_score: float | None
    rarity_score_uncovered: float
    precision: float | None  # share of samples inside the real data's k-NN balls (fidelity); None: k or fewer samples
    recall: float | None  # share of real images inside the samples' k-NN balls (diversity)
    class_accuracy: float | None
    jepa_score: float  # the guidance objective's mean, not a rarity measure here
    seconds_per_sample: float | None
    minority: dict | None = None  # the minority test against the baseline arm; None: no baseline, or too few samples


def from_rows(name: str, table: pa.Table) -> Arm:
    """An arm from rows of the generated schema (``image``, ``class_label``, ``jepa_score``, ``seed``)."""
    images = [Image.open(io.BytesIO(png["bytes"])) for png in table.column("image").to_pylist()]
    return Arm(name, images, table.column("class_label").to_numpy(), table.column("jepa_score").to_numpy(),
               seeds=table.column("seed").to_numpy())


def features(images: list[Image.Image], space: FeatureSpace) -> np.ndarray:
    return np.stack([space.pixels(image) for image in images]).astype(np.float64)


def measure(arms: list[Arm], reference: list[Image.Image], classify: Classifier | None = None,
            space: str = DEFAULT_SPACE, k: int = DEFAULT_K, baseline: str | None = None,
            minority: MinorityConfig = MinorityConfig()) -> list[ArmEvidence]:
    """Every arm against the same real reference, in the pixel ``space``; with ``baseline`` (an arm's
    name), the minority test of every arm large enough for its k-NN balls (``knn_ready``) against it."""
    chosen = FeatureSpace.parse(space)
    if chosen.column != "pixels":
        raise ValueError(f"the evidence table measures in a pixels-N space, got {space!r}")
    if baseline is not None and baseline not in [arm.name for arm in arms]:
        raise ValueError(f"baseline {baseline!r} is none of the arms: {', '.join(arm.name for arm in arms)}")
    real = features(reference, chosen)
    pixels = {arm.name: features(arm.images, chosen) for arm in arms}
    tests = _minority_tests(arms, pixels, real, baseline, minority) if baseline is not None else {}
    rows = []
    for arm in arms:
        mine = pixels[arm.name]
        rarity = RaritySummary.of(mine, real, chosen.name, k)
        manifold = manifold_metrics(real, mine, k) if knn_ready(len(mine), k) else {"precision": None, "recall": None}
        accuracy = float(np.mean(classify(arm.images) == np.asarray(arm.labels))) if classify else None
        rows.append(ArmEvidence(arm.name, len(arm.images), chosen.name, rarity.avg_knn, rarity.lof, rarity.rarity_score,
                                rarity.rarity_score_uncovered, manifold["precision"], manifold["recall"], accuracy,
                                float(np.mean(arm.jepa_scores)), arm.seconds_per_sample, tests.get(arm.name)))
    return rows


def _minority_tests(arms: list[Arm], pixels: dict[str, np.ndarray], real: np.ndarray, baseline: str,
                    config: MinorityConfig) -> dict[str, dict]:
    """Each arm's minority test against the baseline arm, paired by seed (pixels clipped to [0, 1])."""
    chosen = MinorityReference(real, config)
    base = next(arm for arm in arms if arm.name == baseline)
    tests = {baseline: {"verdict": BASELINE, **chosen.figures(pixels[baseline]).whole()}}
    for arm in arms:
        if arm is not base and knn_ready(len(arm.images), config.nearest_k):
            tests[arm.name] = minority_test(pixels[arm.name], pixels[baseline], chosen, (arm.seeds, base.seeds), (0.0, 1.0))
    return tests


COLUMNS = (
    ("setting", lambda r: r.name),
    ("AvgkNN ↑", lambda r: f"{r.avg_knn:.3f}"),
    ("LOF ↑", lambda r: f"{r.lof:.2f}"),
    ("Rarity Score ↑ (uncovered)", lambda r: "—" if r.rarity_score is None
     else f"{r.rarity_score:.3f} ({100 * r.rarity_score_uncovered:.0f}%)"),
    ("precision", lambda r: "—" if r.precision is None else f"{r.precision:.2f}"),
    ("recall", lambda r: "—" if r.recall is None else f"{r.recall:.2f}"),
    ("class accuracy", lambda r: "—" if r.class_accuracy is None else f"{r.class_accuracy:.2f}"),
    ("mean JEPA-SCORE (objective)", lambda r: f"{r.jepa_score:.1f}"),
    ("minority test", lambda r: "—" if r.minority is None else r.minority["verdict"]),
    ("FD to minority ↓", lambda r: "—" if r.minority is None else f"{r.minority['fd_minority']:.2f}"),
    ("nearest is minority ↑", lambda r: "—" if r.minority is None else f"{r.minority['nearest_minority_share']:.2f}"),
)


def markdown(rows: list[ArmEvidence]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r) for _, cell in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def html_table(rows: list[ArmEvidence]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(r))}</td>" for _, cell in COLUMNS) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def compared(rows: list[ArmEvidence], baseline: str) -> list[str]:
    """One plain sentence per arm against ``baseline`` by its minority-test verdict: rarer only when minority."""
    base = next(r for r in rows if r.name == baseline)
    if base.minority is None:
        raise ValueError(f"measure the arms with baseline={baseline!r} first: the comparison words the minority test")
    sentences = []
    for r in rows:
        if r is base:
            continue
        test = r.minority
        knn = f"AvgkNN {r.avg_knn:.3f} vs {base.avg_knn:.3f}"
        if test is None:
            said = f"{r.name}: too few samples for the minority test ({knn})"
        else:
            fd = (f"FD to the real minority {test['fd_minority']:.2f} vs {base.minority['fd_minority']:.2f}, "
                  f"{test['confidence']:.0%} interval of the difference {_interval(test['intervals']['fd_minority'])}")
            said = f"{r.name}: {test['verdict']} by the minority test against {baseline}: " + {
                "minority": f"closer to the real minority ({fd}) and rarer than {baseline} in the data ({knn})",
                "inconclusive": f"closer to the real minority by the point estimate ({fd}), but not shown: the interval "
                                f"includes 0 or precision fell by more than {test['precision_margin']} "
                                f"({test['precision_all']:.2f} vs {test['baseline']['precision_all']:.2f})",
                "off-data": f"rarer by AvgkNN ({knn}) but farther from the real minority ({fd}): off the data, not rare in it",
                "typical": f"neither rarer by AvgkNN ({knn}) nor closer to the real minority ({fd})",
            }[test["verdict"]]
            noise = test["equal_rarity"]
            if test["verdict"] != "typical" and noise["noisy"] is not None:
                said += (f"; at equal AvgkNN, noise on {baseline} (sigma {noise['sigma']:.3f}) has precision "
                         f"{noise['noisy']['precision']:.2f} and coverage {noise['noisy']['coverage']:.2f}, {r.name} "
                         f"{noise['run']['precision']:.2f} and {noise['run']['coverage']:.2f}")
        if r.class_accuracy is not None and base.class_accuracy is not None:
            said += f"; class accuracy {r.class_accuracy:.2f} vs {base.class_accuracy:.2f}"
        sentences.append(said + ".")
    return sentences


def _interval(bounds: list[float]) -> str:
    return f"[{bounds[0]:+.2f}, {bounds[1]:+.2f}]"


def verdicts(rows: list[ArmEvidence], baseline: str) -> list[str]:
    """One line per arm for the top of a report: the minority test's verdict against ``baseline`` and the
    cost, precision (the share inside the real data's k-NN balls), the share outside every one, class accuracy."""
    lines = []
    for r in rows:
        verdict = "the baseline" if r.name == baseline else (
            f"{r.minority['verdict']} by the minority test against {baseline}" if r.minority else "too few samples to test")
        cost = [] if r.precision is None else [f"precision {r.precision:.2f}",
                                               f"{1 - r.precision:.0%} outside every real k-NN ball"]
        cost += [] if r.class_accuracy is None else [f"class accuracy {r.class_accuracy:.2f}"]
        lines.append(f"{r.name}: {verdict}" + (f" ({', '.join(cost)})" if cost else ""))
    return lines


def report_section(rows: list[ArmEvidence], reference: str, baseline: str) -> str:
    """The HTML section of a report: the table, what it is measured against, and the plain comparison."""
    space = FeatureSpace.parse(rows[0].feature_space)
    items = "".join(f"<li>{html.escape(s)}</li>" for s in compared(rows, baseline))
    return (f"<h2>Rare in the data?</h2><p>Each set measured against {html.escape(reference)}, in "
            f"{html.escape(space.description)}, k {DEFAULT_K} (larger = rarer; not through the JEPA-SCORE). "
            f"The minority test asks whether a set moved towards the real minority (the reference's rarest quarter) "
            f"or only off the data; a set is rarer than {html.escape(baseline)} only when its verdict is minority "
            "(docs/method.md, 'The minority test').</p>"
            f"{html_table(rows)}<ul>{items}</ul>")


def as_dicts(rows: list[ArmEvidence]) -> list[dict]:
    return [asdict(r) for r in rows]
