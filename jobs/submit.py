"""jepa-minority submit: run a job on a Ray cluster (ray job submit) under a deterministic id.

  jepa-minority submit --address http://HEAD:8265 -- generate configs/run.yaml --set work.count=1000000

Submitting the same job with the same arguments and config again is refused, not run twice.
"""

from __future__ import annotations

import argparse
import os
import sys

from jobs.options import run_as_program
from pipeline.commands import SUBMITTABLE
from pipeline.submission import DuplicateSubmission, Submission, submit, wait


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jepa-minority submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                        help="the cluster's job API (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    parser.add_argument("--working-dir", default=".", help="uploaded as the job's working directory")
    parser.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the job to end, at most this long")
    parser.add_argument("job", choices=SUBMITTABLE)
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the job's own arguments")
    args = parser.parse_args(argv)
    submission = Submission(args.job, tuple(a for a in args.args if a != "--"), args.address, args.working_dir)
    try:
        job_id = submit(submission)
    except DuplicateSubmission as error:
        print(f"jepa-minority submit: {error}", file=sys.stderr)
        return 3
    print(f"submitted {job_id}: {submission.entrypoint}")
    if args.wait is None:
        return 0
    status = wait(args.address, job_id, args.wait)
    print(f"{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    run_as_program(main)
