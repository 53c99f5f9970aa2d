"""jepa-minority export: a complete generation run or curated set as WebDataset tar shards (image + json per
sample, optionally the embedding), locally or on S3, for training."""

from __future__ import annotations

import argparse

from jobs.options import build_config, config_flag, given, job_parser, refusing, run_as_program, storage_config
from pipeline.configs import field_docs
from pipeline.curate.export import EXPORT_FILE, ExportConfig, preflight_export, run_export
from pipeline.storage import StorageConfig


def build_parser() -> argparse.ArgumentParser:
    doc, storage = field_docs(ExportConfig), field_docs(StorageConfig)
    parser = job_parser("export", __doc__)
    parser.add_argument("--input", required=True, help=doc["input"].meaning + " (local path, file:// or s3://)")
    parser.add_argument("--output", required=True, help=doc["output"].meaning)
    config_flag(parser, "--shard-size", doc["shard_size"], type=int)
    parser.add_argument("--embeddings", action="store_true", help=doc["embeddings"].meaning)
    parser.add_argument("--endpoint-url", help=f"{storage['endpoint_url'].meaning}; credentials come from the AWS "
                                               "environment")
    parser.add_argument("--region", help=storage["region"].meaning)
    parser.add_argument("--dry-run", action="store_true", help="check the input and the output; write nothing")
    return parser


@refusing("export")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = build_config(ExportConfig, input=args.input, output=args.output, embeddings=args.embeddings,
                          storage=storage_config(args),
                          **given(args, "shard_size"))
    plan = preflight_export(config)
    if args.dry_run:
        print(f"dry run: {plan.describe()}")
        return 0
    index = run_export(plan)
    print(f"exported {index['samples']} samples into {len(index['shards'])} shards")
    print(f"output:  {config.output}  ({EXPORT_FILE}: the index, written last)")
    return 0


if __name__ == "__main__":
    run_as_program(main)
