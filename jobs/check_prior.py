"""jepa-minority check-prior: does this encoder's JEPA-SCORE track rarity in your own data?

  jepa-minority check-prior real_images/ --encoder vit_small_patch14_reg4_dinov2 --weights dinov2.safetensors

Scores the reference (a folder of images, or Parquet in the generated schema) with the encoder's exact
JEPA-SCORE and the top-k log-volume guidance descends (at --guidance-k), measures each image's AvgkNN
among the others in an independent feature space, and says in one line per score whether it falls
with rarity there (negative Spearman), does not track it, or rises with it. Then, on --nuisance-images
of them, how far both scores move under small nuisance changes of the same image (brightness,
contrast, blur, noise, stroke width) against their spread across images: a line for each nuisance
that guidance will push. Writes prior_check.png and prior_check.json (last) to --output; logs both to
MLflow.
"""

from __future__ import annotations

import argparse

from jobs.options import (add_storage_and_tracking, build_config, config_flag, given, job_parser, refusing,
                          run_as_program, storage_config, tracking_config)
from guidance.methods import GuidanceConfig
from pipeline import configs
from pipeline.evaluate.neighbours import MODES
from pipeline.evaluate.config import PriorConfig
from pipeline.generate.config import EncoderConfig

FLAGS = ("features", "labels", "k", "neighbours", "guidance_k", "max_images", "seed", "nuisances", "nuisance_images", "inception_weights",
         "clip_weights", "clip_arch", "batch_size", "device", "output")  # PriorConfig fields, one flag each


def _nuisances(text: str) -> tuple[str, ...]:
    """A comma-separated list of nuisance names; 'none' for none (PriorConfig checks the names)."""
    return () if text.strip() == "none" else tuple(name.strip() for name in text.split(",") if name.strip())


def build_parser() -> argparse.ArgumentParser:
    doc, encoder = configs.field_docs(PriorConfig), configs.field_docs(EncoderConfig)
    parser = job_parser("check-prior", __doc__)
    parser.add_argument("reference", help=doc["reference"].meaning)
    parser.add_argument("--labels", metavar="COLUMN_OR_FILE",
                        help=f"{doc['labels'].meaning}: adds the per-class mean score against class frequency")
    parser.add_argument("--features", metavar="SPACE",
                        help="where rarity is measured: inception, clip, pixels-N[-grey] or encoder (not independent); "
                             "default inception if its weights are given, else clip if given, else pixels-32")
    parser.add_argument("--output", metavar="DIR", help=doc["output"].meaning)
    parser.add_argument("--config", metavar="YAML", help="a generation config: its encoder section")
    config_flag(parser, "--encoder", encoder["name"])
    config_flag(parser, "--weights", encoder["weights"])
    config_flag(parser, "--input-size", encoder["input_size"], type=int)
    config_flag(parser, "--k", doc["k"], type=int)
    config_flag(parser, "--neighbours", doc["neighbours"], choices=MODES)
    guidance_k = GuidanceConfig.k
    parser.add_argument("--guidance-k", type=int, metavar="K",
                        help=f"{doc['guidance_k'].meaning} (default: --config's sampling.guidance.k, else {guidance_k})")
    config_flag(parser, "--max-images", doc["max_images"], type=int)
    config_flag(parser, "--seed", doc["seed"], type=int)
    parser.add_argument("--nuisances", type=_nuisances, metavar="NAMES",
                        help=f"{doc['nuisances'].meaning}: comma-separated, or none to skip the measurement "
                             f"(default: {','.join(doc['nuisances'].default)})")
    config_flag(parser, "--nuisance-images", doc["nuisance_images"], type=int)
    parser.add_argument("--inception-weights", metavar="PATH", help="torch-fidelity's Inception .pth: the inception space")
    parser.add_argument("--clip-weights", metavar="PATH", help="an open_clip checkpoint: the clip space")
    parser.add_argument("--clip-arch", metavar="NAME", help="its open_clip architecture (e.g. ViT-B-32) or config .json")
    config_flag(parser, "--batch-size", doc["batch_size"], type=int)
    config_flag(parser, "--device", doc["device"])
    add_storage_and_tracking(parser)
    return parser


def _from_config(args: argparse.Namespace) -> dict:
    """The generation config given by --config, as YAML (empty without one)."""
    from pipeline.generate.config import read_config_file

    return read_config_file(args.config) if args.config else {}


def _encoder(args: argparse.Namespace, section: dict):
    """The encoder: a generation config's encoder section, with --encoder / --weights / --input-size over it."""
    chosen = {"name": args.encoder, "weights": args.weights, "input_size": args.input_size}
    return configs.parse(EncoderConfig, section | {key: value for key, value in chosen.items() if value is not None},
                         "encoder")


@refusing("check-prior")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.evaluate.prior import check_prior  # torch loads after parsing
    from pipeline.schema import PRIOR_CHECK_FILE, PRIOR_CHECK_PLOT
    from pipeline.settings import ui_command

    generation = _from_config(args)
    guidance_k = (generation.get("sampling") or {}).get("guidance", {}).get("k")
    options = ({"guidance_k": guidance_k} if guidance_k is not None else {}) | given(args, *FLAGS)
    config = build_config(PriorConfig, reference=args.reference, encoder=_encoder(args, generation.get("encoder", {})),
                          storage=storage_config(args), tracking=tracking_config(args, args.reference), **options)
    summary = check_prior(config)
    print(summary["verdict"])
    if "topk" in summary:
        print(summary["topk"]["verdict"])
    for line in summary.get("nuisance", {}).get("verdicts", []):
        print(line)
    print(f"mlflow:  run {summary['run_id']} in {config.tracking.tracking_uri}")
    if config.output:
        print(f"output:  {config.output}/{PRIOR_CHECK_PLOT}, {config.output}/{PRIOR_CHECK_FILE}")
    print(f"browse:  {ui_command(config.tracking.tracking_uri, summary['run_id'])}")
    return 0


if __name__ == "__main__":
    run_as_program(main)
