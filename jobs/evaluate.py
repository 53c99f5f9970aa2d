"""jepa-minority evaluate: are the rare samples rare, and good? One table row per generated run.

Rarity against a reference in a named feature space (AvgkNN, LOF, Rarity Score; never through the
JEPA-SCORE) and the reference's prior check; the JEPA-SCORE as the guidance objective; Frechet
distance and precision / recall / density / coverage in the encoder's embedding space; with a
baseline run, the minority test (closer to the reference's rare part, or only off the data); Inception
FID / sFID (and both against the reference's minority, cFID), CLIP score and PickScore from local weights files.
"""

from __future__ import annotations

import argparse

from jobs.options import (add_storage_and_tracking, build_config, config_flag, given, job_parser, refusing,
                          run_as_program, storage_config, tracking_config)
from pipeline.configs import field_docs
from pipeline.evaluate.neighbours import MODES
from pipeline.evaluate.config import EvaluateConfig

FLAGS = ("reference", "output", "max_samples", "nearest_k", "seed", "inception_weights", "clip_weights", "clip_arch",
         "pickscore_weights", "pickscore_processor", "rarity_features", "rarity_k", "neighbours", "baseline", "minority_quantile", "minority_per_class", "batch_size", "actors", "cpus_per_actor", "verbose")  # EvaluateConfig fields, one flag each


def build_parser() -> argparse.ArgumentParser:
    doc = field_docs(EvaluateConfig)
    parser = job_parser("evaluate", __doc__)
    parser.add_argument("--generated", action="append", required=True, metavar="URI",
                        help="a completed generation output (local path, file:// or s3://); repeat for one row per run")
    parser.add_argument("--reference", metavar="URI_OR_FOLDER",
                        help="real images in a local folder (embedded with the runs' encoder), or Parquet in the "
                             "generated schema (a run folder, a folder of .parquet files or one file)")
    parser.add_argument("--output", metavar="DIR", help="write evaluation.md and evaluation.json (last) here")
    config_flag(parser, "--max-samples", doc["max_samples"], type=int)
    config_flag(parser, "--nearest-k", doc["nearest_k"], type=int)
    config_flag(parser, "--seed", doc["seed"], type=int)
    parser.add_argument("--inception-weights", metavar="PATH",
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth: adds FID and sFID, against "
                             "the reference and against its minority (cFID)")
    parser.add_argument("--clip-weights", metavar="PATH", help="an open_clip checkpoint: adds CLIP score (prompted runs)")
    parser.add_argument("--clip-arch", metavar="NAME", help="its open_clip architecture (e.g. ViT-B-32) or config .json")
    parser.add_argument("--pickscore-weights", metavar="FOLDER", help=doc["pickscore_weights"].meaning)
    parser.add_argument("--pickscore-processor", metavar="FOLDER", help=doc["pickscore_processor"].meaning)
    parser.add_argument("--rarity-features", metavar="SPACE",
                        help="where rarity is measured: inception, clip (their weights flags), pixels-N[-grey] (raw "
                             "pixels at N x N) or encoder (the runs' own embedding: NOT independent of the guidance); "
                             "default inception if its weights are given, else clip if given, else pixels-32")
    config_flag(parser, "--rarity-k", doc["rarity_k"], type=int)
    config_flag(parser, "--neighbours", doc["neighbours"], choices=MODES)
    parser.add_argument("--baseline", metavar="URI", help="one of the --generated runs (as given): every other run "
                        "gets the minority test against it (docs/method.md, 'The minority test'), e.g. the unguided run")
    config_flag(parser, "--minority-quantile", doc["minority_quantile"], type=float)
    parser.add_argument("--minority-per-class", action="store_true", help=doc["minority_per_class"].meaning)
    config_flag(parser, "--batch-size", doc["batch_size"], type=int)
    config_flag(parser, "--actors", doc["actors"], type=int)
    config_flag(parser, "--cpus-per-actor", doc["cpus_per_actor"], type=float)
    parser.add_argument("--verbose", action="store_true", help=doc["verbose"].meaning)
    add_storage_and_tracking(parser)
    return parser


@refusing("evaluate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.evaluate.job import run_evaluation  # torch and Ray load after parsing
    from pipeline.evaluate.table import markdown
    from pipeline.schema import EVALUATION_FILE, EVALUATION_TABLE_FILE
    from pipeline.settings import ui_command

    config = build_config(EvaluateConfig, generated=args.generated, storage=storage_config(args),
                          tracking=tracking_config(args, args.generated[0]), **given(args, *FLAGS))
    report = run_evaluation(config)
    print(markdown(report))
    print(f"mlflow:  run {report['evaluation_run_id']} in {config.tracking.tracking_uri}")
    if config.output:
        print(f"output:  {config.output}/{EVALUATION_TABLE_FILE}, {config.output}/{EVALUATION_FILE}")
    print(f"browse:  {ui_command(config.tracking.tracking_uri, report['evaluation_run_id'])}")
    return 0


if __name__ == "__main__":
    run_as_program(main)
