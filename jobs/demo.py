"""jepa-minority demo: the main job on the embedded default (demo models, local Ray, local storage,
local MLflow store), unguided vs JEPA-guided at the same seeds, the rarest kept, and a visual report."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.options import job_parser, refusing, run_as_program
from pipeline.demo import DEMO_CONFIG


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("demo", __doc__)
    parser.add_argument("--config", default=DEMO_CONFIG, help="the guided generation config (YAML); with the "
                        "demo's own models the report also measures rarity against held-out digits")
    parser.add_argument("--root", default="outputs/demo", help="folder for the data and the report")
    parser.add_argument("--keep-fraction", type=float, default=0.25, help="rarest share kept per class")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set work.samples_per_label=2")
    parser.add_argument("--dry-run", action="store_true", help="run every check first and say what it would do; "
                                                               "write and sample nothing")
    return parser


def measures_digits(args: argparse.Namespace) -> bool:
    """The report's rarity section compares with held-out digits: only for the demo's own models."""
    return (Path(args.config).resolve() == Path(DEMO_CONFIG).resolve()
            and not any(o.startswith(("model.", "encoder.")) for o in args.overrides))


def digit_evidence(arms: dict) -> tuple[list[str], str]:
    """The report's rarity section: each arm against the held-out real digits, in pixels, and the minority
    test of the guided arms against the unguided one (paired by seed)."""
    from pipeline.demo.digits import digit_classifier, held_out_images
    from pipeline.evaluate.evidence import from_rows, measure, report_section, verdicts

    reference, _ = held_out_images()
    rows = measure([from_rows(name, table) for name, table in arms.items()], reference, digit_classifier(),
                   baseline="unguided")
    return verdicts(rows, "unguided"), report_section(
        rows, f"the {len(reference)} held-out real digits that no demo model trained on", "unguided")


@refusing("demo")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.demo.job import preflight_demo, run_demo  # torch, diffusers and Ray load after parsing
    from pipeline.settings import ui_command

    if args.dry_run:
        print(f"dry run: {preflight_demo(args.config, args.root, args.keep_fraction, args.overrides).describe()}")
        return 0
    evidence = digit_evidence if measures_digits(args) else None
    result = run_demo(args.config, args.root, args.keep_fraction, args.overrides, evidence)
    print(f"\nreport:  {result.report}")
    print(f"data:    {result.unguided.output_uri} (unguided), {result.guided.output_uri} (JEPA-guided), "
          f"{result.rarest_uri} (rarest {result.rows_kept})")
    print(f"mlflow:  {result.guided.tracking_uri} (runs {result.unguided.run_id}, {result.guided.run_id})")
    print(f"browse:  {ui_command(result.guided.tracking_uri, result.guided.run_id)}")
    return 0 if result.unguided.ok and result.guided.ok else 1


if __name__ == "__main__":
    run_as_program(main)
