"""jepa-minority check-prior: does this encoder's JEPA-SCORE track rarity in your own data?

  jepa-minority check-prior real_images/ --encoder vit_small_patch14_reg4_dinov2 --weights dinov2.safetensors

Scores the reference (a folder of images, or Parquet in the generated schema) with the encoder's exact
JEPA-SCORE, measures each image's AvgkNN among the others in an independent feature space, and says
in one line whether the score falls with rarity there (negative Spearman), does not track it, or
rises with it. Writes prior_check.png and prior_check.json (last) to --output; logs both to MLflow.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from guidance import ENCODERS
from jobs.options import add_storage_and_tracking, storage_config, tracking_config
from pipeline.evaluate.features import DEFAULT_PIXELS
from pipeline.evaluate.prior import PriorConfig, check_prior
from pipeline.generate.config import EncoderConfig, build
from pipeline.schema import PRIOR_CHECK_FILE, PRIOR_CHECK_PLOT
from pipeline.storage import StorageError


def _encoder(args: argparse.Namespace) -> EncoderConfig:
    """The encoder: a generation config's encoder section, with --encoder / --weights / --input-size over it."""
    section = {}
    if args.config:
        path = Path(args.config).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"config not found: {path}")
        section = (yaml.safe_load(path.read_text()) or {}).get("encoder", {})
    given = {"name": args.encoder, "weights": args.weights, "input_size": args.input_size}
    return build(EncoderConfig, section | {key: value for key, value in given.items() if value is not None}, "encoder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jepa-minority check-prior", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", help="a local folder of images, or Parquet in the generated schema (local or s3://)")
    parser.add_argument("--labels", metavar="COLUMN_OR_FILE",
                        help="a Parquet column, or a .csv (file,label) / .json file mapping file name -> label: adds "
                             "the per-class mean score against class frequency")
    parser.add_argument("--features", metavar="SPACE",
                        help=f"where rarity is measured: inception, clip, pixels-N[-grey] or encoder (not independent); "
                             f"default inception if its weights are given, else clip if given, else {DEFAULT_PIXELS}")
    parser.add_argument("--output", metavar="DIR", help="write prior_check.png and prior_check.json (last) here")
    parser.add_argument("--config", metavar="YAML", help="a generation config: its encoder section")
    parser.add_argument("--encoder", choices=sorted(ENCODERS), help="default vit_small_patch14_reg4_dinov2")
    parser.add_argument("--weights", help="a .safetensors / .pth file, a timm model folder, 'hub[:TAG]' or 'random'")
    parser.add_argument("--input-size", type=int, help="encoder input resolution (default 224)")
    parser.add_argument("--k", type=int, default=PriorConfig.k, help="neighbours of AvgkNN (default 5)")
    parser.add_argument("--max-images", type=int, default=PriorConfig.max_images,
                        help="a uniform subsample (by --seed) above this many images (default 2000)")
    parser.add_argument("--seed", type=int, default=PriorConfig.seed, help="chooses the subsample (default 0)")
    parser.add_argument("--inception-weights", metavar="PATH", help="torch-fidelity's Inception .pth: the inception space")
    parser.add_argument("--clip-weights", metavar="PATH", help="an open_clip checkpoint: the clip space")
    parser.add_argument("--clip-arch", metavar="NAME", help="its open_clip architecture (e.g. ViT-B-32) or config .json")
    parser.add_argument("--batch-size", type=int, default=PriorConfig.batch_size, help="images per encoder call")
    parser.add_argument("--device", help="torch device (default cuda when available)")
    add_storage_and_tracking(parser)
    args = parser.parse_args(argv)
    try:
        config = PriorConfig(
            reference=args.reference, encoder=_encoder(args), features=args.features, labels=args.labels, k=args.k,
            max_images=args.max_images, seed=args.seed, inception_weights=args.inception_weights,
            clip_weights=args.clip_weights, clip_arch=args.clip_arch, batch_size=args.batch_size, device=args.device,
            output=args.output, storage=storage_config(args), tracking=tracking_config(args))
        summary = check_prior(config)
    except (ValueError, FileNotFoundError, StorageError) as error:
        print(f"jepa-minority check-prior: {error}", file=sys.stderr)
        return 2
    print(summary["verdict"])
    print(f"mlflow:  run {summary['run_id']} in {config.tracking.tracking_uri}")
    if config.output:
        print(f"output:  {config.output}/{PRIOR_CHECK_PLOT}, {config.output}/{PRIOR_CHECK_FILE}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
