"""Submit a job module to a Ray cluster as a Ray job, under a deterministic submission id.

The id hashes the job name, its arguments and the contents of every argument that names a local
file (the config), so submitting the same work twice is rejected by Ray instead of running twice.
"""

from __future__ import annotations

import hashlib
import shlex
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from jobs.commands import COMMANDS, SUBMITTABLE
from pipeline.settings import UserError

UPLOAD_EXCLUDES = [".venv", ".git", "outputs", "mlruns", "benchmarks/results"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT = 120  # seconds to wait for a starting head's job agent


class DuplicateSubmission(RuntimeError):
    """The same work was submitted before; the message names the earlier job and its status."""


@dataclass(frozen=True)
class Submission:
    job: str  # a command name from jobs.commands.SUBMITTABLE
    args: tuple[str, ...]
    address: str  # the cluster's dashboard / job API, e.g. http://127.0.0.1:8265
    working_dir: str = "."

    def __post_init__(self):
        if self.job not in SUBMITTABLE:
            raise UserError(f"unknown job {self.job!r}; choose one of {', '.join(SUBMITTABLE)}")
        address = urlparse(self.address)
        if address.scheme not in ("http", "https") or not address.hostname:
            raise UserError(f"address {self.address!r} is not the URL of a Ray cluster's job API: give "
                             "http(s)://HOST:PORT (the dashboard's port, 8265 by default) with --address or RAY_ADDRESS")
        if not Path(self.working_dir).is_dir():
            raise UserError(f"working directory {self.working_dir!r} is not a folder: give the folder to upload as the "
                             "job's working directory with --working-dir (default: the current one)")

    @property
    def entrypoint(self) -> str:
        return shlex.join(["python", "-m", COMMANDS[self.job].module, *self.args])

    @property
    def submission_id(self) -> str:
        digest = hashlib.sha256(self.job.encode())
        for arg in self.args:
            digest.update(b"\0" + arg.encode())
            path = Path(arg)
            if path.is_file():
                digest.update(path.read_bytes())
        if self.job == "refresh" and "--version" not in self.args:  # the version defaults to today's date
            digest.update(datetime.now(timezone.utc).strftime("%Y-%m-%d").encode())
        return f"jepa-{self.job}-{digest.hexdigest()[:16]}"


def submit(submission: Submission) -> str:
    """Submit; returns the submission id. Raises DuplicateSubmission when it was submitted before."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(submission.address)
    job_id = submission.submission_id
    deadline = time.monotonic() + AGENT_WAIT
    while True:
        try:
            return client.submit_job(
                entrypoint=submission.entrypoint, submission_id=job_id,
                runtime_env={"working_dir": submission.working_dir, "excludes": UPLOAD_EXCLUDES},
            )
        except RuntimeError as error:
            if "already exists" in str(error):
                status = client.get_job_status(job_id)
                raise DuplicateSubmission(f"this work was already submitted as {job_id} (status {status}); "
                                          "change the config or arguments to submit new work") from error
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)  # a starting cluster's job agent is not up yet


def wait(address: str, job_id: str, timeout: float) -> str:
    """Poll until the job ends; returns its final status."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout
    while (status := str(client.get_job_status(job_id))) not in TERMINAL:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(1)
    return status
