"""jepa-minority score: rank image files by world-prior rarity (lowest JEPA-SCORE = rarest).

Files that cannot be decoded or exceed --max-pixels are skipped, one line each, and the rest are scored:
exit 0 when at least one image was scored (a last line says how many were skipped), 2 when none could be,
and 2 with one line for a missing path, a folder without images, or unusable weights.
"""

from __future__ import annotations

import argparse
import sys

from jobs.options import config_flag, given, job_parser, refusing, run_as_program
from pipeline.configs import field_docs, parse
from pipeline.evaluate.config import ScoreConfig

FLAGS = ("weights", "encoder", "encoder_output", "method", "k", "oversample", "power_iters", "seed", "input_size", "batch_size",
         "max_pixels", "device", "output")  # ScoreConfig fields, one flag each


def build_parser() -> argparse.ArgumentParser:
    doc = field_docs(ScoreConfig)
    parser = job_parser("score", __doc__)
    parser.add_argument("paths", nargs="+", help="PNG / JPEG files or folders (searched recursively)")
    parser.add_argument("--weights",
                        help="required: a .safetensors / .pth file, a timm model folder or an open_clip checkpoint; "
                             "'hub' or 'hub:TAG' to download timm weights; 'random' for an untrained encoder (plumbing only)")
    config_flag(parser, "--encoder", doc["encoder"], help="a DINOv2 name, timm:<ViT architecture> or "
                                                          "open_clip:<architecture or config .json> (a wrong one says why)")
    config_flag(parser, "--encoder-output", doc["encoder_output"], help="cls: the CLS token after the final norm; "
                                                                        "pool: the mean of the patch tokens")
    config_flag(parser, "--method", doc["method"])
    for name, kind in (("k", int), ("oversample", int), ("power_iters", int), ("seed", int), ("input_size", int),
                       ("batch_size", int), ("max_pixels", int)):
        config_flag(parser, f"--{name.replace('_', '-')}", doc[name], type=kind)
    config_flag(parser, "--device", doc["device"])
    config_flag(parser, "--output", doc["output"], help="also write the table to this .csv or .parquet file")
    return parser


@refusing("score")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.evaluate.scoring import score_images, write_scores  # torch loads after parsing

    config = parse(ScoreConfig, {"paths": args.paths, **given(args, *FLAGS)})
    result = score_images(config)
    for path, why in result.skipped:
        print(f"jepa-minority score: skipped {path}: {why}", file=sys.stderr)
    if not result.rows:
        print(f"jepa-minority score: none of the {len(result.skipped)} files could be scored; pass PNG / JPEG files "
              "that decode (within --max-pixels)", file=sys.stderr)
        return 2
    print(f"{'rank':>4}  {'score':>12}  path")
    for rank, row in enumerate(result.rows, start=1):
        print(f"{rank:>4}  {row.score:>12.4f}  {row.path}")
    if config.output:
        write_scores(result.rows, config.output, config.method)
        print(f"wrote {len(result.rows)} scores to {config.output}", file=sys.stderr)
    if result.skipped:
        print(f"jepa-minority score: scored {len(result.rows)}, skipped {len(result.skipped)} that could not be "
              "decoded or were too large (listed above)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_as_program(main)
