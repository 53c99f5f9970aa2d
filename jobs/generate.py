"""jepa-minority generate: the main job. Samples every work item on Ray into Parquet, tracked in MLflow.

Submit to a cluster with: ray job submit --working-dir . -- python -m jobs.generate CONFIG
(``ray.init()`` attaches to RAY_ADDRESS when set and starts a local cluster otherwise).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from jobs.options import config_flag, job_parser, refusing, run_as_program
from pipeline.configs import field_docs
from pipeline.generate.config import ConsoleConfig, RayConfig

if TYPE_CHECKING:
    from pipeline.generate.job import GenerationSummary


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("generate", __doc__)
    parser.add_argument("config", nargs="?",
                        help="a YAML config (sections: model, encoder, sampling, work, output, storage, ray, tracking; "
                             "every key in docs/config.md). Left out, the defaults of 'jepa-minority config' run, and "
                             "they name no model weights: give --set model.source=FOLDER")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one value, e.g. --set sampling.steps=20 (repeatable)")
    parser.add_argument("--output", help="output URI (same as --set output.uri=...)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every check a real run makes first (config, model and encoder files, prompts, "
                             "output) and say what it would do; write and sample nothing")
    console, ray = field_docs(ConsoleConfig), field_docs(RayConfig)
    config_flag(parser, "--status-every", console["status_every"], type=float, metavar="SECONDS",
                help="seconds between status lines when stderr is not a terminal (console.status_every)")
    parser.add_argument("--verbose", action="store_true", help=f"{console['verbose'].meaning} (console.verbose)")
    parser.add_argument("--dashboard", action="store_true", help=f"{ray['dashboard'].meaning} (ray.dashboard)")
    return parser


@refusing("generate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.generate.config import load_config  # no torch, diffusers or Ray: they load only for work to do
    from pipeline.generate.preflight import preflight_generation
    from pipeline.settings import ui_command

    overrides = args.overrides + ([f"output.uri={args.output}"] if args.output else [])
    overrides += [f"console.status_every={args.status_every}"] if args.status_every is not None else []
    overrides += ["console.verbose=true"] * args.verbose + ["ray.dashboard=true"] * args.dashboard
    try:
        config = load_config(args.config, overrides)
        if args.dry_run:
            print(f"dry run: {preflight_generation(config).describe()}")
            return 0
        from pipeline.generate.job import run_generation

        summary = run_generation(preflight_generation(config))
    except KeyboardInterrupt as interrupted:  # job.Interrupted says what sampling committed; elsewhere nothing is half-done
        print(str(interrupted) or "interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"output:    {summary.output_uri}")
    print(f"samples:   {summary.committed} of {summary.planned} committed ({summary.generated} by this run), "
          f"{summary.failed} failed")
    if summary.truncated_prompts:
        print(f"prompts:   {summary.truncated_prompts} truncated to work.max_prompt_chars")
    if summary.common_error:
        print(f"failures:  {summary.common_error_count} of {summary.failed} failed with: {summary.common_error} "
              "(every record in _failures/)")
    print(f"status:    {_status(summary)}")
    if summary.run_id:
        print(f"mlflow:    run {summary.run_id} in {summary.tracking_uri}")
        print(f"browse:    {ui_command(summary.tracking_uri, summary.run_id)}")
    return 0 if summary.ok else 1


def _status(summary: GenerationSummary) -> str:
    """Complete, or what to do: a rerun retries the failed samples, which helps unless most share one error."""
    if summary.complete:
        return "complete"
    if summary.common_error:
        return "INCOMPLETE: most failures share the error above; a rerun would fail the same way until it is fixed"
    return "INCOMPLETE: rerun the same command to resume"


if __name__ == "__main__":
    run_as_program(main)
