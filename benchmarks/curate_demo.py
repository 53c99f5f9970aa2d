"""The curated set on the demo: plain top-k against near-duplicate removal and diverse-rarest selection.

One JEPA-guided run of the demo's config (its models, guidance and seeds; ``--per-class`` samples per
digit) is generated on local Ray, then curated twice with ``filter``, keeping the same share of each
class: the rarest (the demo's rule) and, with ``--dedup-threshold`` on the stored embedding,
``--select diverse-rarest`` (docs/method.md, 'Curating a rare set'). Both kept sets are measured
against the held-out real digits in raw pixels (pipeline/evaluate/evidence.py): AvgkNN, precision,
recall and coverage, the class accuracy, and the minority test of the diverse set against the top-k
set (unpaired: the two sets hold different seeds). The whole guided run is measured beside them.

Run from the repository root: ``python -m benchmarks.curate_demo`` (``--per-class 8`` for a smoke run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.paths import RESULTS, ROOT, write_json
from pipeline.curate.config import FilterConfig
from pipeline.curate.filter import run_filter
from pipeline.demo import DEMO_CONFIG
from pipeline.demo.digits import digit_classifier, held_out_images
from pipeline.evaluate.evidence import DEFAULT_SPACE, as_dicts, features, from_rows, markdown, measure
from pipeline.evaluate.features import FeatureSpace
from pipeline.evaluate.metrics import manifold_metrics
from pipeline.evaluate.rarity import DEFAULT_K
from pipeline.generate.config import load_config
from pipeline.generate.job import run_generation
from pipeline.generate.preflight import preflight_generation
from pipeline.rows import read_committed
from pipeline.storage import StorageConfig, resolve

TOP_K = "rarest (top-k)"
COLUMNS = ["seed", "class_label", "image", "jepa_score"]


def kept_rows(uri: str):
    return read_committed(resolve(uri, StorageConfig()), COLUMNS).sort_by([("class_label", "ascending"),
                                                                           ("seed", "ascending")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=40, help="guided samples per digit")
    parser.add_argument("--keep-fraction", type=float, default=0.25, help="the share of each class kept (the demo's)")
    parser.add_argument("--dedup-threshold", type=float, default=0.95,
                        help="the cosine similarity in the embedding at which a less rare row is a near-duplicate")
    parser.add_argument("--output", type=Path, default=RESULTS / "curate_demo.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        tracking = [f"tracking.tracking_uri=sqlite:///{work}/mlflow.db", f"tracking.artifact_location={work}/artifacts"]
        config = load_config(str(ROOT / DEMO_CONFIG), [
            f"model.source={ROOT / 'models' / 'digits-ddpm'}", f"encoder.weights={ROOT / 'models' / 'digits-sigreg-vit'}",
            f"work.samples_per_label={args.per_class}", f"output.uri={work / 'guided'}", *tracking])
        start = time.perf_counter()
        summary = run_generation(preflight_generation(config))
        seconds = time.perf_counter() - start
        print(f"generated {summary.committed} guided samples in {seconds:.0f} s", flush=True)

        rules = {TOP_K: {}, f"diverse-rarest, dedup {args.dedup_threshold:g}": {
            "dedup_threshold": args.dedup_threshold, "select": "diverse-rarest"}}
        selections, arms = {}, [from_rows("guided (all)", kept_rows(config.output.uri))]
        for index, (name, rule) in enumerate(rules.items()):
            kept = str(work / f"kept{index}")
            selections[name] = run_filter(FilterConfig(
                input=config.output.uri, output=kept, keep_fraction=args.keep_fraction, per="class_label",
                tracking=config.tracking, **rule))
            arms.append(from_rows(name, kept_rows(kept)))

    reference, _ = held_out_images()
    rows = measure(arms, reference, digit_classifier(), baseline=TOP_K)
    space = FeatureSpace.parse(DEFAULT_SPACE)
    real = features(reference, space)
    coverage = {arm.name: manifold_metrics(real, features(arm.images, space), DEFAULT_K)["coverage"] for arm in arms}
    table = markdown(rows)
    coverage_line = "coverage of the held-out digits: " + ", ".join(f"{n} {c:.3f}" for n, c in coverage.items())
    print(table, coverage_line, sep="\n")
    write_json(args.output, {
        "command": " ".join(["python -m benchmarks.curate_demo", *sys.argv[1:]]),
        "settings": vars(args) | {"output": str(args.output), "reference": "held-out digits",
                                  "reference_images": len(reference), "space": DEFAULT_SPACE, "k": DEFAULT_K},
        "generation_seconds": seconds,
        "selections": {name: {key: report[key] for key in ("rows_kept", "rule", "dedup", "balance")}
                       for name, report in selections.items()},
        "coverage": coverage, "arms": as_dicts(rows), "markdown": table})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
