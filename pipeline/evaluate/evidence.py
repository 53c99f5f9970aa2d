"""Rarity evidence for a few sampled arms against held-out real images, in one table.

Each arm (unguided, a guidance setting, a curated set) is measured in a feature space that does not
see the encoder (raw pixels by default; docs/method.md, 'Measuring rarity'): AvgkNN, LOF and Rarity
Score against the real reference (pipeline/evaluate/rarity.py), precision and recall with k-NN balls
(pipeline/evaluate/metrics.py), the class accuracy of a classifier the caller supplies, and the mean
exact JEPA-SCORE, the objective, for comparison. Used by the demo's report and its benchmark.
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
from pipeline.evaluate.metrics import manifold_metrics
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


def from_rows(name: str, table: pa.Table) -> Arm:
    """An arm from rows of the generated schema (``image``, ``class_label``, ``jepa_score``)."""
    images = [Image.open(io.BytesIO(png["bytes"])) for png in table.column("image").to_pylist()]
    return Arm(name, images, table.column("class_label").to_numpy(), table.column("jepa_score").to_numpy())


def features(images: list[Image.Image], space: FeatureSpace) -> np.ndarray:
    return np.stack([space.pixels(image) for image in images]).astype(np.float64)


def measure(arms: list[Arm], reference: list[Image.Image], classify: Classifier | None = None,
            space: str = DEFAULT_SPACE, k: int = DEFAULT_K) -> list[ArmEvidence]:
    """Every arm against the same real reference, in the pixel ``space``."""
    chosen = FeatureSpace.parse(space)
    if chosen.column != "pixels":
        raise ValueError(f"the evidence table measures in a pixels-N space, got {space!r}")
    real = features(reference, chosen)
    rows = []
    for arm in arms:
        mine = features(arm.images, chosen)
        rarity = RaritySummary.of(mine, real, chosen.name, k)
        manifold = manifold_metrics(real, mine, k) if len(mine) > k else {"precision": None, "recall": None}
        accuracy = float(np.mean(classify(arm.images) == np.asarray(arm.labels))) if classify else None
        rows.append(ArmEvidence(arm.name, len(arm.images), chosen.name, rarity.avg_knn, rarity.lof, rarity.rarity_score,
                                rarity.rarity_score_uncovered, manifold["precision"], manifold["recall"], accuracy,
                                float(np.mean(arm.jepa_scores)), arm.seconds_per_sample))
    return rows


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
    """One plain sentence per arm against ``baseline``: rarer in the data or not, by AvgkNN and Rarity Score."""
    base = next(r for r in rows if r.name == baseline)
    sentences = []
    for r in rows:
        if r is base:
            continue
        knn = "rarer" if r.avg_knn > base.avg_knn else "not rarer"
        said = f"{r.name}: {knn} than {baseline} by AvgkNN ({r.avg_knn:.3f} vs {base.avg_knn:.3f})"
        if r.rarity_score is not None and base.rarity_score is not None:
            said += (f", {'rarer' if r.rarity_score > base.rarity_score else 'not rarer'} by Rarity Score "
                     f"({r.rarity_score:.3f} vs {base.rarity_score:.3f})")
        if r.class_accuracy is not None and base.class_accuracy is not None:
            said += f"; class accuracy {r.class_accuracy:.2f} vs {base.class_accuracy:.2f}"
        sentences.append(said + ".")
    return sentences


def report_section(rows: list[ArmEvidence], reference: str, baseline: str) -> str:
    """The HTML section of a report: the table, what it is measured against, and the plain comparison."""
    space = FeatureSpace.parse(rows[0].feature_space)
    items = "".join(f"<li>{html.escape(s)}</li>" for s in compared(rows, baseline))
    return (f"<h2>Rare in the data?</h2><p>Each set measured against {html.escape(reference)}, in "
            f"{html.escape(space.description)}, k {DEFAULT_K} (larger = rarer; not through the JEPA-SCORE).</p>"
            f"{html_table(rows)}<ul>{items}</ul>")


def as_dicts(rows: list[ArmEvidence]) -> list[dict]:
    return [asdict(r) for r in rows]
