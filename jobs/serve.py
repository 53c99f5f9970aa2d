"""jepa-minority serve: the samplers and JEPA-SCORE over HTTP on Ray Serve, with a page of a dataset's rarest samples."""

from __future__ import annotations

import argparse

from jobs.options import build_config, config_flag, given, job_parser, refusing, run_as_program
from pipeline import configs
from pipeline.generate.config import ConsoleConfig
from pipeline.serve.config import ServeConfig, ServeLimits

LIMITS = ("max_n", "max_steps", "max_body_bytes", "max_pixels")  # ServeLimits fields, one flag each


def build_parser() -> argparse.ArgumentParser:
    limits = configs.field_docs(ServeLimits)
    parser = job_parser("serve", __doc__)
    parser.add_argument("config", help="a generation config (YAML): the model, encoder and default sampling settings served")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set sampling.guidance.eta=0.05 (repeatable)")
    parser.add_argument("--dataset", help="a refresh root or a finished output folder to browse on GET /")
    parser.add_argument("--host", default="127.0.0.1", help="the HTTP address (0.0.0.0 to listen on every interface)")
    parser.add_argument("--port", type=int, default=8000, help="the HTTP port")
    parser.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, each with its own models")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs reserved per replica")
    parser.add_argument("--gpus-per-replica", type=float, help="GPUs per replica (default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="score requests batched together")
    config_flag(parser, "--generate-batch-samples", configs.field_docs(ServeConfig)["generate_batch_samples"],
                type=int)
    parser.add_argument("--verbose", action="store_true",
                        help=f"{configs.field_docs(ConsoleConfig)['verbose'].meaning} (console.verbose)")
    for name in LIMITS:
        config_flag(parser, f"--{name.replace('_', '-')}", limits[name], type=int)
    return parser


@refusing("serve")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.serve.service import run_serve  # Ray Serve and torch load only when serving

    try:
        service = build_config(
            ServeConfig, config=args.config, overrides=(*args.overrides, *["console.verbose=true"] * args.verbose),
            dataset=args.dataset, host=args.host, port=args.port, replicas=args.replicas,
            cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
            max_batch_size=args.max_batch_size,
            **given(args, "generate_batch_samples"),
            limits=given(args, *LIMITS),
        )
        run_serve(service, blocking=True)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    run_as_program(main)
