"""jepa-minority submit: run a job on a Ray cluster (ray job submit) under a deterministic id.

  jepa-minority submit --address http://HEAD:8265 -- generate configs/run.yaml --set work.count=1000000

Submitting the same job with the same arguments and config again is refused, not run twice.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
from pathlib import Path

from jobs.options import job_parser, refusing, run_as_program
from jobs.commands import COMMANDS, SUBMITTABLE
from jobs.submission import DuplicateSubmission, Submission, submit, wait
from pipeline.settings import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("submit", __doc__)
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                        help="the cluster's job API (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    parser.add_argument("--working-dir", default=".", help="uploaded as the job's working directory")
    parser.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the job to end, at most this long")
    parser.add_argument("job", choices=SUBMITTABLE, help="the job to run on the cluster")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the job's own arguments")
    return parser


def check_locally(submission: Submission) -> None:
    """Refuse before contacting the cluster: the job's own parser must accept the arguments, and a generation
    config it names must load (the path as seen from the uploaded working directory)."""
    parser = importlib.import_module(COMMANDS[submission.job].module).build_parser()
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            job_args = parser.parse_args(list(submission.args))
    except SystemExit:
        raise UserError(f"{submission.job} rejects its arguments: {errors.getvalue().strip().splitlines()[-1]}") from None
    config = getattr(job_args, "config", None)
    if config is None or submission.job == "score":
        return
    from pipeline.generate.config import load_config  # torch loads only for jobs that take a config

    path = Path(submission.working_dir) / config
    try:
        load_config(path, getattr(job_args, "overrides", []))
    except UserError as error:
        raise UserError(f"{submission.job}: {error} (checked locally; nothing was submitted)") from error


@refusing("submit")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.wait is not None and not args.wait > 0:
        raise UserError(f"--wait must be a number of seconds > 0, got {args.wait}; leave it out to return once submitted")
    submission = Submission(args.job, tuple(a for a in args.args if a != "--"), args.address, args.working_dir)
    check_locally(submission)
    try:
        job_id = submit(submission)
    except DuplicateSubmission as error:
        print(f"jepa-minority submit: {error}", file=sys.stderr)
        return 3
    except ConnectionError as error:
        print(f"jepa-minority submit: no Ray cluster answered at {args.address} ({str(error).splitlines()[0]}); "
              "start one (ray start --head) or pass --address / RAY_ADDRESS", file=sys.stderr)
        return 2
    print(f"submitted {job_id}: {submission.entrypoint}")
    if args.wait is None:
        return 0
    status = wait(args.address, job_id, args.wait)
    print(f"{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    run_as_program(main)
