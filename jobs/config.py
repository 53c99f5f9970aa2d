"""jepa-minority config: every key of a generation config with its type, default and meaning."""

from __future__ import annotations

import argparse

from jobs.options import job_parser, run_as_program


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("config", __doc__)
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--defaults", action="store_true", help="print the defaults as a YAML config to start from")
    form.add_argument("--markdown", action="store_true", help="print the reference as Markdown (docs/config.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.generate.config_doc import as_markdown, as_text, as_yaml, config_reference

    render = as_yaml if args.defaults else as_markdown if args.markdown else as_text
    print(render(config_reference()), end="")
    return 0


if __name__ == "__main__":
    run_as_program(main)
