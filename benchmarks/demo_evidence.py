"""Evidence for the demo models: are JEPA-guided samples rare in the data, or only to the encoder?

At the same seeds: unguided, boost-and-skip, JEPA guidance as the demo configures it (its cheap step)
over a sweep of strengths (the demo's default among them), the paper's exact step at ``--exact-eta``
(the demo's default before the cheap step), and the rarest quarter per class of the default's samples
(what ``make demo`` keeps). Each set is measured against the held-out real digits that no demo model trained on
(pipeline/demo/digits.py), in raw pixels (16 x 16 grey), by ``pipeline/evaluate/evidence.py``:
AvgkNN, LOF and Rarity Score, precision / recall, the class accuracy of an SVM on the training
digits, and the mean exact JEPA-SCORE (the objective, for comparison); and each set's minority test
against unguided, paired by seed (docs/method.md, 'The minority test'). Then the prior check itself
(``check_prior``, exact and top-k scores) on the held-out digits. A contact sheet shows the sweep.

Run from the repository root: ``python -m benchmarks.demo_evidence`` (``--per-class 2 --etas 0.03``
for a smoke run).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw

from benchmarks.bench_guided_cost import EXACT
from benchmarks.paths import ROOT, RESULTS, write_json
from guidance import BoostSkipConfig, GuidanceConfig, SamplingConfig, WorkItem, generate, load_encoder, load_model
from pipeline.demo import DEMO_CONFIG
from pipeline.demo.digits import digit_classifier, held_out_images
from pipeline.evaluate.evidence import Arm, as_dicts, compared, markdown, measure
from pipeline.evaluate.prior import PriorConfig, check_prior
from pipeline.generate.config import EncoderConfig
from pipeline.settings import TrackingConfig

BATCH = 20


def sample_arm(name: str, model, encoder, per_class: int, sampling: SamplingConfig) -> tuple[Arm, list]:
    items = [WorkItem(1000 + i, i % 10) for i in range(per_class * 10)]
    start = time.perf_counter()
    rows = [row for first in range(0, len(items), BATCH)
            for row in generate(model, items[first:first + BATCH], sampling, encoder)]
    seconds = (time.perf_counter() - start) / len(items)
    images = [Image.fromarray(row.image) for row in rows]
    return Arm(name, images, np.array([i.class_label for i in items]), np.array([r.jepa_score for r in rows]), seconds,
               np.array([i.seed for i in items])), rows


def rarest(arm: Arm, fraction: float) -> Arm:
    """The lowest-scoring ``fraction`` of each class, as ``filter --per class_label`` keeps them."""
    keep = []
    for label in np.unique(arm.labels):
        index = np.flatnonzero(arm.labels == label)
        keep += list(index[np.argsort(arm.jepa_scores[index], kind="stable")][: max(1, int(fraction * len(index)))])
    keep = sorted(keep)
    return Arm(f"rarest {fraction:.0%} of {arm.name}", [arm.images[i] for i in keep], arm.labels[keep],
               arm.jepa_scores[keep], arm.seconds_per_sample, arm.seeds[keep])


def sheet(rows_by_setting: dict[str, list], path: Path, per_row: int = 10) -> None:
    cell, label = 48, 150
    canvas = Image.new("RGB", (label + per_row * cell, len(rows_by_setting) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, rows) in enumerate(rows_by_setting.items()):
        draw.text((4, r * cell + cell // 2 - 6), name, fill="black")
        for c, row in enumerate(rows[:per_row]):
            canvas.paste(Image.fromarray(row.image).resize((cell, cell), Image.NEAREST), (label + c * cell, r * cell))
    canvas.save(path)


def prior_on_held_out(encoder: dict, guidance_k: int, folder: Path) -> dict:
    """``check_prior`` on the held-out digits written as PNG files, with their labels."""
    images, labels = held_out_images()
    (folder / "real").mkdir(parents=True)
    for i, image in enumerate(images):
        image.save(folder / "real" / f"{i:04d}.png")
    (folder / "labels.csv").write_text("".join(f"{i:04d}.png,{label}\n" for i, label in enumerate(labels)))
    config = PriorConfig(reference=str(folder / "real"), encoder=EncoderConfig(**encoder), features="pixels-16-grey",
                         labels=str(folder / "labels.csv"), guidance_k=guidance_k, device="cpu",
                         tracking=TrackingConfig(tracking_uri=f"sqlite:///{folder}/mlflow.db"))
    summary = check_prior(config)
    return {key: summary[key] for key in ("images", "feature_space", "k", "spearman", "p_value", "verdict", "topk")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=20, help="samples per digit in every set")
    parser.add_argument("--etas", type=float, nargs="+", default=[0.03, 0.1, 0.2, 0.3],
                        help="strengths of the demo's guidance (its default's is always added)")
    parser.add_argument("--exact-eta", type=float, default=EXACT.eta,
                        help="the strength of the exact-step row (full gradient, pre-step, 2 power iterations)")
    parser.add_argument("--keep-fraction", type=float, default=0.25, help="the rarest share per class (the demo's)")
    args = parser.parse_args()
    torch.manual_seed(0)
    demo = yaml.safe_load((ROOT / DEMO_CONFIG).read_text())  # the demo's models and sampling settings
    encoder_config = demo["encoder"]
    model = load_model(demo["model"]["preset"], str(ROOT / demo["model"]["source"]))
    weights = str(ROOT / encoder_config["weights"])
    encoder = load_encoder(encoder_config["name"], weights, input_size=encoder_config["input_size"])
    base = demo["sampling"]
    steps, default = base["steps"], GuidanceConfig(**base["guidance"])

    def guided(eta: float) -> SamplingConfig:
        return SamplingConfig(method="jepa", steps=steps, guidance=GuidanceConfig(**(base["guidance"] | {"eta": eta})))

    settings = {"unguided": SamplingConfig(method="unguided", steps=steps),
                "boost-and-skip": SamplingConfig(method="bns", steps=steps, bns=BoostSkipConfig())}
    settings |= {f"JEPA eta {eta:g}" + (" (demo default)" if eta == default.eta else ""): guided(eta)
                 for eta in sorted(set(args.etas) | {default.eta})}
    settings[f"JEPA exact step, eta {args.exact_eta:g}"] = SamplingConfig(
        method="jepa", steps=steps, guidance=replace(EXACT, eta=args.exact_eta, k=default.k))
    arms, sheets = [], {}
    for name, sampling in settings.items():
        arm, rows = sample_arm(name, model, encoder, args.per_class, sampling)
        arms.append(arm)
        sheets[name] = rows
        print(f"{name}: {arm.seconds_per_sample:.2f} s/sample", flush=True)
    arms.append(rarest(next(a for a in arms if "(demo default)" in a.name), args.keep_fraction))
    reference, _ = held_out_images()
    rows = measure(arms, reference, digit_classifier(), baseline="unguided")
    table = markdown(rows)
    print(table)
    print("\n".join(compared(rows, "unguided")))
    with tempfile.TemporaryDirectory() as folder:
        prior = prior_on_held_out({**encoder_config, "weights": weights}, default.k, Path(folder))
    print(prior["verdict"], "|", prior["topk"]["verdict"])
    write_json(RESULTS / "demo_evidence.json", {
        "settings": vars(args) | {"steps": steps, "tau": default.tau, "k": default.k, "reference": "held-out digits",
                                  "reference_images": len(reference), "encoder": encoder_config["weights"],
                                  "demo_guidance": base["guidance"]},
        "arms": as_dicts(rows), "compared_with_unguided": compared(rows, "unguided"), "prior_check": prior,
        "markdown": table})
    sheet(sheets, RESULTS / "demo_strength_sheet.png")
    print(f"wrote {RESULTS / 'demo_evidence.json'} and demo_strength_sheet.png")


if __name__ == "__main__":
    main()
