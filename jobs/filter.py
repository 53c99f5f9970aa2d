"""jepa-minority filter: keep the rarest samples of a generated dataset (lowest JEPA-SCORE, or top-k score, first)."""

from __future__ import annotations

import argparse

from jobs.options import (add_storage_and_tracking, build_config, job_parser, refusing, run_as_program, storage_config,
                          tracking_config)
from pipeline.configs import field_docs
from pipeline.curate.config import GROUP_COLUMNS, FilterConfig
from pipeline.curate.dedup import SEARCHES
from pipeline.curate.diversity import SELECTIONS
from pipeline.curate.filter import preflight_filter, run_filter  # no Ray yet
from pipeline.schema import SCORE_COLUMNS, SELECTION_FILE
from pipeline.settings import ui_command


def build_parser() -> argparse.ArgumentParser:
    fields = field_docs(FilterConfig)
    parser = job_parser("filter", __doc__)
    parser.add_argument("--input", required=True, help="a completed generation output (local path, file:// or s3://)")
    parser.add_argument("--output", required=True, help="where the curated dataset goes")
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--keep-fraction", type=float, help="keep this fraction of the valid rows (per group with --per)")
    amount.add_argument("--keep", type=int, help="keep this many rows (per group with --per)")
    parser.add_argument("--per", choices=GROUP_COLUMNS, help="choose the rarest within each class label or prompt")
    parser.add_argument("--by", choices=SCORE_COLUMNS, default=SCORE_COLUMNS[0],
                        help="the score to rank by: the exact JEPA-SCORE (the paper's metric) or the exact top-k "
                             "log-volume at the run's guidance k (default: %(default)s)")
    parser.add_argument("--max-score", type=float, help="never keep a row scoring above this (in the --by score)")
    parser.add_argument("--allow-empty-groups", action="store_true",
                        help=fields["allow_empty_groups"].meaning)
    parser.add_argument("--gate-reference", help=fields["gate_reference"].meaning + ", before the rarest are taken: "
                        "the quotas count only the rows that pass")
    parser.add_argument("--gate-space", default=FilterConfig.gate_space, help=fields["gate_space"].meaning)
    parser.add_argument("--gate-k", type=int, default=FilterConfig.gate_k, help=fields["gate_k"].meaning)
    parser.add_argument("--dedup-threshold", type=float, help=fields["dedup_threshold"].meaning + "; each cluster "
                        "keeps its rarest row (default: off)")
    parser.add_argument("--dedup-search", choices=SEARCHES, default=FilterConfig.dedup_search,
                        help=fields["dedup_search"].meaning)
    parser.add_argument("--select", choices=SELECTIONS, default=FilterConfig.select, help=fields["select"].meaning)
    parser.add_argument("--candidates", type=int, default=FilterConfig.candidates, help=fields["candidates"].meaning)
    parser.add_argument("--similarity-space", default=FilterConfig.similarity_space,
                        help=fields["similarity_space"].meaning)
    parser.add_argument("--balance-by", choices=GROUP_COLUMNS, help=fields["balance_by"].meaning)
    parser.add_argument("--dominant-share", type=float, default=FilterConfig.dominant_share,
                        help=fields["dominant_share"].meaning)
    add_storage_and_tracking(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="check the input, the rule and the output; write nothing")
    parser.add_argument("--verbose", action="store_true", help=fields["verbose"].meaning)
    return parser


@refusing("filter")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = build_config(
        FilterConfig, input=args.input, output=args.output, keep_fraction=args.keep_fraction, keep=args.keep, per=args.per,
        max_score=args.max_score, by=args.by, allow_empty_groups=args.allow_empty_groups,
        gate_reference=args.gate_reference, gate_space=args.gate_space, gate_k=args.gate_k,
        dedup_threshold=args.dedup_threshold, dedup_search=args.dedup_search, select=args.select,
        candidates=args.candidates, similarity_space=args.similarity_space, balance_by=args.balance_by,
        dominant_share=args.dominant_share, storage=storage_config(args),
        tracking=tracking_config(args, args.input), verbose=args.verbose,
    )
    if args.dry_run:
        _, _, quotas, gate = preflight_filter(config)
        print(f"dry run: the rarest of {config.input} (up to {sum(quotas.values())} rows in {len(quotas)} "
              f"group{'s' if len(quotas) != 1 else ''}) into {config.output}, tracked in experiment "
              f"{config.tracking.experiment!r} of {config.tracking.tracking_uri}")
        if gate:
            print(f"gate: only rows inside the {config.gate_k}-NN balls of {len(gate.reference)} reference images "
                  f"in {config.gate_space}")
        return 0
    report = run_filter(config)
    print(f"kept {report['rows_kept']} of {report['rows_in']} rows "
          f"({report['invalid_scores']} without a finite score, {report['failed_in_input']} failed in the input)")
    gate = report["gate"]
    if gate:
        groups = "".join(f"; {config.per} {key}: {n}" for key, n in gate["groups"].items())
        print(f"gate:      dropped {gate['dropped']} rows outside every {gate['k']}-NN ball of {gate['reference']} "
              f"in {gate['space']} (before the rarest were taken{groups})")
    if report["dedup"]:
        print(f"dedup:     removed {report['dedup']['removed']} near-duplicates (cosine >= "
              f"{report['dedup']['threshold']} in {report['dedup']['space']}, the rarest of each cluster kept)")
    print(f"threshold: {report['threshold']} ({config.by})")
    print(f"output:    {config.output}  ({SELECTION_FILE} beside the data)")
    print(f"mlflow:    run {report['filter_run_id']} in experiment {config.tracking.experiment!r}")
    print(f"browse:    {ui_command(config.tracking.tracking_uri, report['filter_run_id'])}")
    return 0


if __name__ == "__main__":
    run_as_program(main)
