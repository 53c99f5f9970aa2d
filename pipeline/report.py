"""Pictures of a run: the JEPA-SCORE histogram and contact sheets of samples with their scores."""

from __future__ import annotations

import io
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


def _png(figure) -> bytes:
    """A finished figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def score_histogram(scores: np.ndarray, title: str) -> bytes:
    """A PNG histogram of JEPA-SCOREs (lower = rarer)."""
    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    axis.hist(scores, bins=min(50, max(5, len(scores) // 4)), color="#4c72b0")
    return _score_figure_png(figure, axis, title)


def contact_sheet(rows: list[tuple[str, list[bytes], list[float]]], cell: int = 96) -> bytes:
    """A PNG grid: one labelled row of images per (label, PNG bytes, scores) entry."""
    columns = max(1, *(len(images) for _, images, _ in rows))
    label_height = 16
    labels = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label) for label, _, _ in rows)
    width = max(columns * cell, int(labels) + 8)  # a row of two images still shows its whole label
    sheet = Image.new("RGB", (width, len(rows) * (cell + 2 * label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images, scores) in enumerate(rows):
        top = r * (cell + 2 * label_height)
        draw.text((4, top + 2), label, fill="black")
        for c, (png, score) in enumerate(zip(images, scores)):
            image = Image.open(io.BytesIO(png)).convert("RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(image, (c * cell, top + label_height))
            draw.text((c * cell + 4, top + label_height + cell + 2), f"{score:.1f}", fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def overlaid_histograms(series: dict[str, np.ndarray], title: str) -> bytes:
    """A PNG with one histogram per named score series on shared bins."""
    values = np.concatenate(list(series.values()))
    bins = np.linspace(values.min(), values.max(), 30)
    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    for name, scores in series.items():
        axis.hist(scores, bins=bins, alpha=0.55, label=f"{name} (mean {scores.mean():.1f})")
    axis.legend()
    return _score_figure_png(figure, axis, title)


def _score_figure_png(figure, axis, title: str) -> bytes:
    """The score axes labelled and titled, then the figure as PNG bytes (and closed)."""
    axis.set_xlabel("exact JEPA-SCORE (lower = rarer)")
    axis.set_ylabel("samples")
    axis.set_title(title)
    return _png(figure)


def score_against_rarity(avg_knn: np.ndarray, scores: np.ndarray, binned: list[dict], title: str, space: str) -> bytes:
    """A PNG scatter of JEPA-SCORE against AvgkNN, with the mean score per AvgkNN bin over it."""
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=100)
    axis.scatter(avg_knn, scores, s=8, alpha=0.4, color="#4c72b0", label="images")
    axis.plot([b["avg_knn"] for b in binned], [b["jepa_score"] for b in binned], "o-", color="#c44e52",
              label="binned mean")
    axis.set_xlabel(f"AvgkNN among the others, {space} features (larger = rarer)")
    axis.set_ylabel("exact JEPA-SCORE (lower = rarer)")
    axis.set_title(textwrap.fill(title, 90), fontsize=8)
    axis.legend()
    return _png(figure)
