"""jepa-minority score: rank image files by world-prior rarity (lowest JEPA-SCORE = rarest)."""

from __future__ import annotations

import argparse
import sys

from guidance import ENCODERS
from jobs.options import run_as_program
from pipeline.evaluate.scoring import SCORE_METHODS, ScoreConfig, score_images, write_scores


def parse_args(argv: list[str] | None = None) -> ScoreConfig:
    """Flags left out take ScoreConfig's defaults."""
    parser = argparse.ArgumentParser(prog="jepa-minority score", description=__doc__)
    parser.add_argument("paths", nargs="+", help="PNG / JPEG files or folders (searched recursively)")
    parser.add_argument("--encoder", choices=sorted(ENCODERS), help="default vit_small_patch14_reg4_dinov2")
    parser.add_argument("--weights", help="a .safetensors / .pth file, a timm model folder, 'hub[:TAG]' or 'random'")
    parser.add_argument("--method", choices=SCORE_METHODS,
                        help="exact JEPA-SCORE (default; D backward passes per image) or top-k log-volume")
    parser.add_argument("--k", type=int, help="top-k singular values (method topk, default 9)")
    parser.add_argument("--oversample", type=int, help="extra sketch columns (method topk, default 2)")
    parser.add_argument("--power-iters", type=int, help="subspace iterations (method topk, default 2)")
    parser.add_argument("--seed", type=int, help="sketch seed (method topk, default 0)")
    parser.add_argument("--input-size", type=int, help="encoder input resolution (default 224)")
    parser.add_argument("--batch-size", type=int, help="images per encoder call (default 4)")
    parser.add_argument("--device", help="torch device (default cuda when available)")
    parser.add_argument("--output", help="also write the table to this .csv or .parquet file")
    args = vars(parser.parse_args(argv))
    paths = tuple(args.pop("paths"))
    try:
        return ScoreConfig(paths=paths, **{key: value for key, value in args.items() if value is not None})
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    rows = score_images(config)
    print(f"{'rank':>4}  {'score':>12}  path")
    for rank, row in enumerate(rows, start=1):
        print(f"{rank:>4}  {row.score:>12.4f}  {row.path}")
    if config.output:
        write_scores(rows, config.output, config.method)
        print(f"wrote {len(rows)} scores to {config.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_as_program(main)
