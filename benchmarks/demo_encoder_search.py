"""Choose the demo's world prior by the prior check on held-out real digits (results in models/README.md).

Each candidate recipe (objective, embedding size, expander, augmentation strength) trains an encoder
on the training digits only (pipeline/demo/digits.py, ``split_indices``), is saved and loaded back
through ``load_encoder``, and scores the held-out digits. From one exact SVD per image come the
exact JEPA-SCORE and the top-k log-volume at every k of ``--ks``; each is correlated with the image's
leave-one-out AvgkNN (k 5) among the held-out digits in pixel space (16 x 16 grey), by the prior
check's own ``prior_summary``. A score that tracks rarity has a negative Spearman correlation.
Also reported: the share of the 10% lowest-scoring images that are among the 10% rarest by AvgkNN
(chance: 0.10).

Run from the repository root: ``python -m benchmarks.demo_encoder_search`` (about 4 minutes per
candidate on 2 cores); ``--only NAME ...`` runs those candidates and adds them to the results,
``--steps`` shortens training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.paths import RESULTS, write_json
from guidance import load_encoder
from guidance.jepa_score import LOG_FLOOR, SIGMA_FLOOR, encoder_singular_values
from pipeline.demo.digits import digits, held_out_images
from pipeline.demo.train import EncoderTraining, train_encoder
from pipeline.evaluate.features import FeatureSpace
from pipeline.evaluate.prior import prior_summary

PIXELS = FeatureSpace.parse("pixels-16-grey")
VICREG = dict(objective="vicreg", expander=256, sigreg_weight=0.05)  # the weight is unused by VICReg
SIGREG = dict(objective="sigreg", expander=0, sigreg_weight=0.05)  # LeJEPA's lambda, on the embedding itself
CANDIDATES = {  # every field that differs between them, written out (EncoderTraining's defaults are the winner's)
    "vicreg-d64": EncoderTraining(**VICREG),
    "sigreg-d64-expander": EncoderTraining(**SIGREG | {"expander": 256}),
    "sigreg-d64": EncoderTraining(**SIGREG),
    "sigreg-d32": EncoderTraining(**SIGREG, embed_dim=32),
    "sigreg-d64-mild-views": EncoderTraining(**SIGREG, augment_strength=0.5),
    "vicreg-d64-no-expander": EncoderTraining(**VICREG | {"expander": 0}),
    "sigreg-d64-lambda-0.2": EncoderTraining(**SIGREG | {"sigreg_weight": 0.2}),
    "sigreg-d64-lambda-0.5": EncoderTraining(**SIGREG | {"sigreg_weight": 0.5}),
    "sigreg-d64-noise-views": EncoderTraining(**SIGREG, augment_strength=0.25),
    "sigreg-d64-lambda-0.8": EncoderTraining(**SIGREG | {"sigreg_weight": 0.8}),
    "sigreg-d16-lambda-0.5": EncoderTraining(**SIGREG | {"sigreg_weight": 0.5}, embed_dim=16),
}


def scores_by_k(sigma: torch.Tensor, ks: list[int]) -> dict[str, np.ndarray]:
    """The exact JEPA-SCORE ('full') and the exact top-k log-volume at each k, from the singular values."""
    out = {"full": sigma.clamp_min(SIGMA_FLOOR).log().sum(-1).numpy()}
    out |= {f"top-{k}": sigma[:, :k].clamp_min(LOG_FLOOR).log().sum(-1).numpy() for k in ks if k <= sigma.shape[1]}
    return out


def lowest_tenth_rarest(score: np.ndarray, rarity: np.ndarray) -> float:
    """Share of the 10% lowest-score images that are among the 10% largest AvgkNN."""
    tenth = max(1, len(score) // 10)
    return len(set(np.argsort(score)[:tenth]) & set(np.argsort(-rarity)[:tenth])) / tenth


def evaluate_candidate(folder: Path, recipe: EncoderTraining, images: torch.Tensor, ks: list[int]) -> dict:
    encoder = load_encoder(recipe.name, str(folder), input_size=recipe.input_size)
    rgb = encoder.resize(images.expand(-1, 3, -1, -1))
    sigma = encoder_singular_values(encoder, rgb)
    pixels = np.stack([PIXELS.pixels(image) for image in held_out_images()[0]])  # the same digits as images
    result = {}
    for name, score in scores_by_k(sigma, ks).items():
        summary, rarity = prior_summary(score, pixels, PIXELS)
        result[name] = {"spearman": summary["spearman"], "p_value": summary["p_value"],
                        "lowest_tenth_rarest": lowest_tenth_rarest(score, rarity)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(CANDIDATES), help="run these candidates only")
    parser.add_argument("--steps", type=int, default=EncoderTraining.steps, help="training steps per candidate")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 6, 9, 16])
    parser.add_argument("--keep", metavar="DIR", help="save the trained candidates under DIR/<name>")
    args = parser.parse_args()
    torch.manual_seed(0)
    held_out, _ = digits(16, "held_out")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="encoder-search-"))
    out = RESULTS / "demo_encoder_search.json"
    results = json.loads(out.read_text())["candidates"] if args.only and out.exists() else {}  # --only adds rows
    for name in args.only or CANDIDATES:
        recipe = dataclasses.replace(CANDIDATES[name], output=str(root / name), steps=args.steps)
        start = time.perf_counter()
        train_encoder(recipe)
        trained = time.perf_counter() - start
        results[name] = {"recipe": dataclasses.asdict(recipe) | {"output": None}, "train_seconds": round(trained),
                         "scores": evaluate_candidate(root / name, recipe, held_out, args.ks)}
        row = results[name]["scores"]
        print(name, " ".join(f"{k} {v['spearman']:+.2f}/{v['lowest_tenth_rarest']:.2f}" for k, v in row.items()),
              flush=True)
    write_json(out, {
        "settings": vars(args) | {"held_out_images": len(held_out), "feature_space": PIXELS.name, "avg_knn_k": 5},
        "candidates": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
