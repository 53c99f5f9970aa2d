"""Train the demo's small models from scikit-learn's digits (CPU, minutes): the class-conditional
diffusion model and the SIGReg ViT encoder (the world prior). Reproducible from the seeds in pipeline/demo/train.py."""

from __future__ import annotations

import argparse

from jobs.options import run_as_program
from pipeline.demo.train import DiffusionTraining, EncoderTraining, train_diffusion, train_encoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jepa-minority train-demo-models", description=__doc__)
    parser.add_argument("which", choices=("diffusion", "encoder", "both"), nargs="?", default="both")
    parser.add_argument("--diffusion-steps", type=int, default=DiffusionTraining.steps)
    parser.add_argument("--encoder-steps", type=int, default=EncoderTraining.steps)
    parser.add_argument("--models", default="models", help="folder the models are saved under")
    args = parser.parse_args(argv)
    if args.which in ("diffusion", "both"):
        train_diffusion(DiffusionTraining(output=f"{args.models}/digits-ddpm", steps=args.diffusion_steps))
    if args.which in ("encoder", "both"):
        train_encoder(EncoderTraining(output=f"{args.models}/digits-sigreg-vit", steps=args.encoder_steps))
    return 0


if __name__ == "__main__":
    run_as_program(main)
