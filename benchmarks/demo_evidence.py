"""Evidence for the demo models: are JEPA-guided samples rare in the data, or only to the encoder?

At the same seeds: unguided, boost-and-skip, JEPA guidance as the demo configures it (its cheap step)
over a sweep of strengths (the demo's default among them), the paper's exact step at ``--exact-eta``
(the demo's default before the cheap step), and the rarest quarter per class of the default's samples
(what ``make demo`` keeps), and the same after the filter's fidelity gate against the held-out digits
(pipeline/curate/gate.py: only samples inside a real k-NN ball, before the rarest are taken). Beside every guided setting run its two controls at the same settings
(docs/method.md, 'Controls'): the reversed step (direction ascend) and a random direction of the same
norm; a setting's gain counts only as far as it beats them. The levers (``--tau-stop``, ``--project``, ``--encoder``)
change every guided setting at once; a lever run writes its own ``--output``. Each set is measured against the held-out real digits that no demo model trained on
(pipeline/demo/digits.py), in raw pixels (16 x 16 grey), by ``pipeline/evaluate/evidence.py``:
AvgkNN, LOF and Rarity Score, precision / recall, the class accuracy of an SVM on the training
digits, and the mean exact JEPA-SCORE (the objective, for comparison); and each set's minority test
against unguided, paired by seed (docs/method.md, 'The minority test'), with its fidelity at equal
rarity (unguided plus the noise that makes it as rare). Then the prior check itself (``check_prior``,
exact and top-k scores, nuisance ratios) on the held-out digits. A contact sheet shows the sweep.

Run from the repository root: ``python -m benchmarks.demo_evidence`` (``--per-class 2 --etas 0.03
--exact-eta 0`` for a smoke run).
"""

from __future__ import annotations

import argparse
import sys
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
from guidance.methods import PROJECTIONS, SgmsConfig
from pipeline.demo import DEMO_CONFIG
from pipeline.demo.digits import digit_classifier, held_out_images
from pipeline.curate.config import FilterConfig
from pipeline.curate.gate import Gate, pixel_space
from pipeline.evaluate.evidence import Arm, ArmEvidence, as_dicts, compared, markdown, measure
from pipeline.evaluate.minority import BASELINE
from pipeline.evaluate.config import PriorConfig
from pipeline.evaluate.prior import check_prior
from pipeline.generate.config import EncoderConfig
from pipeline.settings import TrackingConfig

BATCH = 20
CONTROLS = {"reversed": "ascend", "random direction": "random"}  # control name -> guidance.direction


def sample_arm(name: str, model, encoder, per_class: int, sampling: SamplingConfig) -> tuple[Arm, list]:
    items = [WorkItem(1000 + i, i % 10) for i in range(per_class * 10)]
    start = time.perf_counter()
    rows = [row for first in range(0, len(items), BATCH)
            for row in generate(model, items[first:first + BATCH], sampling, encoder)]
    seconds = (time.perf_counter() - start) / len(items)
    images = [Image.fromarray(row.image) for row in rows]
    return Arm(name, images, np.array([i.class_label for i in items]), np.array([r.jepa_score for r in rows]), seconds,
               np.array([i.seed for i in items])), rows


def with_controls(name: str, sampling: SamplingConfig, controls: bool = True) -> dict[str, SamplingConfig]:
    """The guided setting and, at the same settings, each control (docs/method.md, 'Controls'), unless not asked."""
    if not controls:
        return {name: sampling}
    return {name: sampling} | {f"{name}: {control}": replace(sampling, guidance=replace(sampling.guidance, direction=direction))
                               for control, direction in CONTROLS.items()}


def control_table(rows: list[ArmEvidence]) -> str:
    """The minority test's figures of every arm against the baseline, controls beside their setting."""
    head = ("setting", "minority test", "FD to minority ↓ (Δ vs unguided, 95% interval)", "nearest is minority ↑",
            "precision", "recall", "class accuracy", "s / sample", "equal rarity: noise sigma, its precision / the arm's")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        test = r.minority
        if test["verdict"] == BASELINE:
            fd, noise = f"{test['fd_minority']:.2f}", "—"
        else:
            low, high = test["intervals"]["fd_minority"]
            fd = f"{test['fd_minority']:.2f} ({test['fd_minority'] - test[BASELINE]['fd_minority']:+.2f}, [{low:+.2f}, {high:+.2f}])"
            matched = test["equal_rarity"]
            noise = ("unreachable" if matched["noisy"] is None else
                     f"{matched['sigma']:.3f}: {matched['noisy']['precision']:.2f} / {matched['run']['precision']:.2f}")
        lines.append("| " + " | ".join((r.name, test["verdict"], fd, f"{test['nearest_minority_share']:.2f}",
                                         f"{r.precision:.2f}", f"{r.recall:.2f}", f"{r.class_accuracy:.2f}",
                                         f"{r.seconds_per_sample:.2f}", noise)) + " |")
    return "\n".join(lines)


def against_controls(rows: list[ArmEvidence]) -> list[str]:
    """One sentence per guided setting: its verdict and FD to the minority beside its controls' (point estimates)."""
    by_name = {r.name: r for r in rows}
    sentences = []
    for name, r in by_name.items():
        controls = [by_name[f"{name}: {control}"] for control in CONTROLS if f"{name}: {control}" in by_name]
        if not controls:
            continue
        fds = ", ".join(f"{c.name.removeprefix(name + ': ')} {c.minority['fd_minority']:.2f} ({c.minority['verdict']})"
                        for c in controls)
        beats = r.minority["fd_minority"] < min(c.minority["fd_minority"] for c in controls)
        sentences.append(f"{name}: {r.minority['verdict']}, FD to minority {r.minority['fd_minority']:.2f} vs controls "
                         f"{fds}: {'closer than' if beats else 'not closer than'} both controls.")
    return sentences


def rarest(arm: Arm, fraction: float) -> Arm:
    """The lowest-scoring ``fraction`` of each class, as ``filter --per class_label`` keeps them."""
    keep = []
    for label in np.unique(arm.labels):
        index = np.flatnonzero(arm.labels == label)
        keep += list(index[np.argsort(arm.jepa_scores[index], kind="stable")][: max(1, int(fraction * len(index)))])
    keep = sorted(keep)
    return Arm(f"rarest {fraction:.0%} of {arm.name}", [arm.images[i] for i in keep], arm.labels[keep],
               arm.jepa_scores[keep], arm.seconds_per_sample, arm.seeds[keep])


def gated(arm: Arm, gate: Gate) -> tuple[Arm, int]:
    """The samples inside the filter's fidelity gate, and how many it dropped."""
    inside = gate.inside(np.stack([gate.space.vector(image) for image in arm.images]))
    keep = np.flatnonzero(inside)
    return Arm(f"{arm.name}, gated", [arm.images[i] for i in keep], arm.labels[keep], arm.jepa_scores[keep],
               arm.seconds_per_sample, arm.seeds[keep]), int((~inside).sum())


def save_arms(path: Path, arms: list[Arm]) -> None:
    """Every sampled set as arrays, keyed by its index: ``names``, ``images_I`` (n, H, W[, C] uint8),
    ``labels_I``, ``jepa_scores_I``."""
    arrays = {"names": np.array([arm.name for arm in arms])}
    for i, arm in enumerate(arms):
        arrays |= {f"images_{i}": np.stack([np.asarray(image) for image in arm.images]),
                   f"labels_{i}": arm.labels, f"jepa_scores_{i}": arm.jepa_scores}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


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
    ratios = {name: {score: entry[score]["ratio"] for score in ("jepa_score", "topk_score")}
              for name, entry in summary["nuisance"]["nuisances"].items()}
    return {key: summary[key] for key in ("images", "feature_space", "k", "spearman", "p_value", "verdict", "topk")} | {
        "nuisance_ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=20, help="samples per digit in every set")
    parser.add_argument("--etas", type=float, nargs="+", default=[0.03, 0.1, 0.2, 0.3],
                        help="strengths of the demo's guidance (its default's is always added)")
    parser.add_argument("--exact-eta", type=float, default=EXACT.eta,
                        help="the strength of the exact-step row (full gradient, pre-step, 2 power iterations); 0: none")
    parser.add_argument("--tau-stop", type=float, default=None,
                        help="lever: every guided setting stops guiding at this noise level (default: the demo's)")
    parser.add_argument("--project", choices=PROJECTIONS, default=None,
                        help="lever: every guided setting's projection (docs/method.md, 'Manifold-constrained step'; "
                             "default: the demo's)")
    parser.add_argument("--encoder", default=None,
                        help="lever: the encoder weights folder every guided setting uses (default: the demo's)")
    parser.add_argument("--output", type=Path, default=RESULTS / "demo_evidence.json",
                        help="the results JSON; the contact sheet goes beside it (NAME_sheet.png)")
    parser.add_argument("--prior", action=argparse.BooleanOptionalAction, default=True,
                        help="run the prior check on the held-out digits (--no-prior: skip it, the encoder unchanged)")
    parser.add_argument("--keep-fraction", type=float, default=0.25, help="the rarest share per class (the demo's)")
    parser.add_argument("--sgms-strength", type=float, default=SgmsConfig.strength,
                        help="the strength of the self-guided minority sampling row (pixel distance: LPIPS is not "
                             "built; docs/method.md, 'Self-guided minority sampling'); 0: none")
    parser.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True,
                        help="run the controls beside every guided setting (--no-controls: the settings alone)")
    parser.add_argument("--save-arms", type=Path, default=None,
                        help="also write every sampled set (uint8 images, labels, JEPA-SCOREs) to this .npz, "
                             "for benchmarks that reuse the samples (benchmarks/downstream.py)")
    args = parser.parse_args()
    if args.project == "renoise" and args.exact_eta:
        parser.error("--project renoise needs the posterior-mean placement, and the exact step is pre-step: "
                     "add --exact-eta 0")
    torch.manual_seed(0)
    demo = yaml.safe_load((ROOT / DEMO_CONFIG).read_text())  # the demo's models and sampling settings
    encoder_config = demo["encoder"] | ({"weights": args.encoder} if args.encoder else {})
    model = load_model(demo["model"]["preset"], str(ROOT / demo["model"]["source"]))
    weights = str(ROOT / encoder_config["weights"])
    encoder = load_encoder(encoder_config["name"], weights, input_size=encoder_config["input_size"])
    base = demo["sampling"]
    lever = ({} if args.tau_stop is None else {"tau_stop": args.tau_stop}) | (
        {} if args.project is None else {"project": args.project})
    steps, default = base["steps"], GuidanceConfig(**base["guidance"])

    def guided(eta: float) -> SamplingConfig:
        return SamplingConfig(method="jepa", steps=steps, guidance=GuidanceConfig(**(base["guidance"] | lever | {"eta": eta})))

    settings = {"unguided": SamplingConfig(method="unguided", steps=steps),
                "boost-and-skip": SamplingConfig(method="bns", steps=steps, bns=BoostSkipConfig())}
    if args.sgms_strength:
        settings[f"SGMS (pixels), strength {args.sgms_strength:g}"] = SamplingConfig(
            method="sgms", steps=steps, sgms=SgmsConfig(strength=args.sgms_strength))
    for eta in sorted(set(args.etas) | {default.eta}):
        settings |= with_controls(f"JEPA eta {eta:g}" + (" (demo default)" if eta == default.eta else ""), guided(eta),
                                  args.controls)
    if args.exact_eta:
        settings |= with_controls(f"JEPA exact step, eta {args.exact_eta:g}", SamplingConfig(
            method="jepa", steps=steps, guidance=replace(EXACT, eta=args.exact_eta, k=default.k, **lever)), args.controls)
    arms, sheets = [], {}
    for name, sampling in settings.items():
        arm, rows = sample_arm(name, model, encoder, args.per_class, sampling)
        arms.append(arm)
        sheets[name] = rows
        print(f"{name}: {arm.seconds_per_sample:.2f} s/sample", flush=True)
    if args.save_arms:
        save_arms(args.save_arms, arms)
    reference, _ = held_out_images()
    demo_arm = next(a for a in arms if "(demo default)" in a.name)
    gate_space = pixel_space(FilterConfig.gate_space)
    gate = Gate.build(gate_space, np.stack([gate_space.vector(image) for image in reference]), FilterConfig.gate_k)
    passed, dropped = gated(demo_arm, gate)
    arms += [rarest(demo_arm, args.keep_fraction), rarest(passed, args.keep_fraction)]
    rows = measure(arms, reference, digit_classifier(), baseline="unguided")
    table, controls = markdown(rows), control_table(rows)
    print(table, controls, *compared(rows, "unguided"), *against_controls(rows), sep="\n")
    prior = None
    if args.prior:
        with tempfile.TemporaryDirectory() as folder:
            prior = prior_on_held_out({**encoder_config, "weights": weights}, default.k, Path(folder))
        print(prior["verdict"], "|", prior["topk"]["verdict"])
    contact = args.output.with_name(f"{args.output.stem}_sheet.png")
    write_json(args.output, {
        "command": " ".join(["python -m benchmarks.demo_evidence", *sys.argv[1:]]),
        "gate": {"reference": "held-out digits", "space": FilterConfig.gate_space, "k": FilterConfig.gate_k,
                 "of": demo_arm.name, "samples": len(demo_arm.images), "dropped": dropped},
        "settings": vars(args) | {"output": str(args.output), "save_arms": args.save_arms and str(args.save_arms), "steps": steps, "tau": default.tau,
                                  "k": default.k, "reference": "held-out digits", "reference_images": len(reference),
                                  "encoder": encoder_config["weights"], "demo_guidance": base["guidance"] | lever},
        "arms": as_dicts(rows), "compared_with_unguided": compared(rows, "unguided"),
        "against_controls": against_controls(rows), "prior_check": prior, "markdown": table,
        "markdown_controls": controls})
    sheet(sheets, contact)
    print(f"wrote {args.output} and {contact.name}")


if __name__ == "__main__":
    main()
