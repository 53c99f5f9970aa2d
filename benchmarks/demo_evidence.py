"""Evidence for the demo models, as users of the paper would check it (results cited in the README).

1. Rarity / quality trade-off: one sweep over the guidance strength eta (and k at one strength), all
   at the same seeds: mean exact JEPA-SCORE, class accuracy of the requested class (an SVM trained on
   the real 8x8 digits, applied to samples mapped back to 8x8), and the mean distance to the nearest
   training digit. The demo default is the strongest eta whose accuracy stays within
   ``--accuracy-drop`` of unguided. A contact sheet shows the sweep, strong end included.
2. JEPA-SCORE of real digits against density proxies: Spearman correlation with the k-NN distance
   in pixel space and in the encoder's embedding space, and per-class mean score against the class
   frequency of an imbalanced subsample.

Run from the repository root: ``python -m benchmarks.demo_evidence``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy.stats import spearmanr
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors
from sklearn.svm import SVC

from benchmarks.paths import RESULTS, write_json
from guidance import GuidanceConfig, SamplingConfig, WorkItem, generate, jepa_score, load_encoder, load_model
from pipeline.demo.digits import DIGIT_LEVELS, digits, to_8x8

ENCODER = "vit_small_patch14_reg4_dinov2"


def sample_set(model, encoder, labels: list[int], per_class: int, sampling: SamplingConfig):
    items = [WorkItem(1000 + i, labels[i % len(labels)]) for i in range(per_class * len(labels))]
    rows = []
    for start in range(0, len(items), 20):
        rows += generate(model, items[start : start + 20], sampling, encoder)
    images = torch.stack([torch.from_numpy(r.image).permute(2, 0, 1).float() / 255 for r in rows])
    return items, rows, images


def measure(items, rows, images, classifier, train_8x8) -> dict:
    small = to_8x8(images)
    accuracy = float(np.mean(classifier.predict(small) == np.array([i.class_label for i in items])))
    nearest = NearestNeighbors(n_neighbors=1).fit(train_8x8).kneighbors(small)[0][:, 0] / DIGIT_LEVELS
    scores = np.array([r.jepa_score for r in rows])
    return {"jepa_score_mean": float(scores.mean()), "jepa_score_std": float(scores.std()),
            "class_accuracy": accuracy, "nearest_train_distance": float(nearest.mean())}


def sheet(rows_by_setting: dict[str, list], path: Path, per_row: int = 10) -> None:
    cell, label = 48, 110
    sheet = Image.new("RGB", (label + per_row * cell, len(rows_by_setting) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, rows) in enumerate(rows_by_setting.items()):
        draw.text((4, r * cell + cell // 2 - 6), name, fill="black")
        for c, row in enumerate(rows[:per_row]):
            sheet.paste(Image.fromarray(row.image).resize((cell, cell), Image.NEAREST), (label + c * cell, r * cell))
    sheet.save(path)


def density_proxies(encoder, images: torch.Tensor, labels: np.ndarray, count: int, seed: int) -> dict:
    """Exact JEPA-SCORE of real digits vs k-NN distances and class frequency."""
    rng = np.random.default_rng(seed)
    # an imbalanced subsample: class c kept with probability (c + 1) / 10
    keep = np.array([rng.random() < (label + 1) / 10 for label in labels])
    chosen = rng.choice(np.flatnonzero(keep), size=min(count, int(keep.sum())), replace=False)
    rgb = images[chosen].expand(-1, 3, -1, -1)
    scores = torch.cat([jepa_score(encoder, encoder.resize(part)) for part in rgb.split(32)]).numpy()
    with torch.no_grad():
        embeddings = torch.cat([encoder(encoder.resize(part)) for part in rgb.split(64)]).numpy()
    pixels = rgb[:, 0].flatten(1).numpy()

    def knn_distance(points: np.ndarray, k: int = 5) -> np.ndarray:
        return NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)[0][:, 1:].mean(1)

    sub_labels = labels[chosen]
    frequency = np.array([np.mean(sub_labels == c) for c in range(10)])
    class_mean = np.array([scores[sub_labels == c].mean() for c in range(10)])
    return {
        "images": len(chosen),
        "spearman_score_vs_pixel_knn_distance": float(spearmanr(scores, knn_distance(pixels)).statistic),
        "spearman_score_vs_embedding_knn_distance": float(spearmanr(scores, knn_distance(embeddings)).statistic),
        "spearman_class_mean_score_vs_class_frequency": float(spearmanr(class_mean, frequency).statistic),
        "class_frequency": frequency.round(3).tolist(),
        "class_mean_score": class_mean.round(2).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="models")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--etas", type=float, nargs="+", default=[0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5])
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 15])
    parser.add_argument("--accuracy-drop", type=float, default=0.03)
    parser.add_argument("--real-digits", type=int, default=600)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = load_model("pixel-unet", f"{args.models}/digits-ddpm")
    encoder = load_encoder(ENCODER, f"{args.models}/digits-vicreg-vit", input_size=56)
    images, labels = digits(16)
    all_8x8 = to_8x8(images.expand(-1, 3, -1, -1))
    train_x, test_x, train_y, test_y = train_test_split(all_8x8, labels.numpy(), test_size=0.3, random_state=0)
    classifier = SVC(gamma=0.001).fit(train_x, train_y)
    real_accuracy = float(classifier.score(test_x, test_y))

    settings = {"unguided": SamplingConfig(method="unguided", steps=args.steps)}
    settings |= {f"eta={eta:g}": SamplingConfig(steps=args.steps, guidance=GuidanceConfig(eta=eta)) for eta in args.etas}
    sweep, sheets = {}, {}
    for name, sampling in settings.items():
        start = time.perf_counter()
        items, rows, generated = sample_set(model, encoder, list(range(10)), args.per_class, sampling)
        sweep[name] = measure(items, rows, generated, classifier, train_x) | {"seconds": time.perf_counter() - start}
        sheets[name] = rows
        print(name, sweep[name], flush=True)
    unguided = sweep["unguided"]["class_accuracy"]
    within = [eta for eta in args.etas if sweep[f"eta={eta:g}"]["class_accuracy"] >= unguided - args.accuracy_drop]
    default = max(within) if within else None
    k_sweep = {}
    if default is not None:
        for k in args.ks:
            items, rows, generated = sample_set(model, encoder, list(range(10)), args.per_class,
                                                SamplingConfig(steps=args.steps, guidance=GuidanceConfig(eta=default, k=k)))
            k_sweep[f"k={k}"] = measure(items, rows, generated, classifier, train_x)
            print(f"k={k}", k_sweep[f"k={k}"], flush=True)
    proxies = density_proxies(encoder, images, labels.numpy(), args.real_digits, seed=0)
    print(proxies)

    write_json(RESULTS / "demo_evidence.json", {
        "settings": vars(args), "classifier_accuracy_on_real_test_digits": real_accuracy, "sweep": sweep,
        "default_eta": default, "k_sweep_at_default": k_sweep, "real_digits": proxies,
    })
    sheet(sheets, RESULTS / "demo_strength_sheet.png")
    print(f"default eta: {default}; wrote {RESULTS / 'demo_evidence.json'} and demo_strength_sheet.png")


if __name__ == "__main__":
    main()
