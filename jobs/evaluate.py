"""jepa-minority evaluate: are the rare samples rare, and good? One table row per generated run.

Rarity (JEPA-SCORE), Frechet distance and precision / recall / density / coverage in the encoder's
embedding space against a reference; Inception FID / sFID and CLIP score from local weights files.
"""

from __future__ import annotations

import argparse
import sys

from jobs.options import add_storage_and_tracking, run_as_program, storage_config, tracking_config
from pipeline.evaluate.job import EvaluateConfig, markdown, run_evaluation
from pipeline.schema import EVALUATION_FILE, EVALUATION_TABLE_FILE
from pipeline.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jepa-minority evaluate", description=__doc__)
    parser.add_argument("--generated", action="append", required=True, metavar="URI",
                        help="a completed generation output (local path, file:// or s3://); repeat for one row per run")
    parser.add_argument("--reference", metavar="URI_OR_FOLDER",
                        help="real images in a local folder (embedded with the runs' encoder), or Parquet in the "
                             "generated schema (a run folder, a folder of .parquet files or one file)")
    parser.add_argument("--output", metavar="DIR", help="write evaluation.md and evaluation.json (last) here")
    parser.add_argument("--max-samples", type=int, default=EvaluateConfig.max_samples,
                        help="per set, for precision / recall / density / coverage: a uniform subsample (default 10000)")
    parser.add_argument("--nearest-k", type=int, default=EvaluateConfig.nearest_k, help="k of the k-NN metrics (default 5)")
    parser.add_argument("--seed", type=int, default=EvaluateConfig.seed, help="chooses the k-NN subsample (default 0)")
    parser.add_argument("--inception-weights", metavar="PATH",
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth: adds FID and sFID")
    parser.add_argument("--clip-weights", metavar="PATH", help="an open_clip checkpoint: adds CLIP score (prompted runs)")
    parser.add_argument("--clip-arch", metavar="NAME", help="its open_clip architecture (e.g. ViT-B-32) or config .json")
    parser.add_argument("--batch-size", type=int, default=EvaluateConfig.batch_size, help="images per model call")
    parser.add_argument("--actors", type=int, default=EvaluateConfig.actors, help="Ray actors that run the models")
    parser.add_argument("--cpus-per-actor", type=float, default=EvaluateConfig.cpus_per_actor)
    add_storage_and_tracking(parser)
    args = parser.parse_args(argv)
    try:
        config = EvaluateConfig(
            generated=tuple(args.generated), reference=args.reference, output=args.output,
            max_samples=args.max_samples, nearest_k=args.nearest_k, seed=args.seed,
            inception_weights=args.inception_weights, clip_weights=args.clip_weights, clip_arch=args.clip_arch,
            batch_size=args.batch_size, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
            storage=storage_config(args), tracking=tracking_config(args),
        )
        report = run_evaluation(config)
    except (ValueError, FileNotFoundError, StorageError) as error:
        print(f"jepa-minority evaluate: {error}", file=sys.stderr)
        return 2
    print(markdown(report))
    print(f"mlflow:  run {report['evaluation_run_id']} in {config.tracking.tracking_uri}")
    if config.output:
        print(f"output:  {config.output}/{EVALUATION_TABLE_FILE}, {config.output}/{EVALUATION_FILE}")
    return 0


if __name__ == "__main__":
    run_as_program(main)
