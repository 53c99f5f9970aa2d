"""Ray Jobs: a generate job submitted to a head started with `ray start --head` on 127.0.0.1,
under a deterministic submission id that turns a retried submission away."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import submit as submit_job
from jobs.commands import COMMANDS
from jobs.submission import Submission

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    from tests.services import start_ray_head

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "token")  # the head uses token auth; the client reads ~/.ray/auth_token
        head = start_ray_head(tmp_path_factory.mktemp("ray_head") / "head.log")
        yield head
        head.stop()


def test_a_generate_job_runs_on_the_cluster_once(ray_head, write_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    config = write_config(work={"class_labels": [2, 5], "samples_per_label": 2},
                          ray={"actors": 1, "cpus_per_actor": 0.5, "batch_size": 2})
    args = ["--address", ray_head.address, "--working-dir", str(REPO), "--wait", "400", "generate", config]
    assert submit_job.main(args) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out
    run = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert run["counts"]["committed"] == 4
    assert submit_job.main(args) == 3  # the same work again is refused
    assert "already submitted as jepa-generate-" in capsys.readouterr().err


def test_submission_ids_follow_the_work(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("work: {count: 2}\n")
    first = Submission("generate", (str(config),), "http://x")
    first_id = first.submission_id
    assert first_id == Submission("generate", (str(config),), "http://y").submission_id
    assert first_id != Submission("generate", (str(config), "--set", "work.count=3"), "http://x").submission_id
    config.write_text("work: {count: 5}\n")
    assert first_id != Submission("generate", (str(config),), "http://x").submission_id
    assert first.entrypoint == f"python -m jobs.generate {config}"
    with pytest.raises(ValueError, match="unknown job 'train'"):
        Submission("train", (), "http://x")


def test_submit_refuses_a_job_outside_the_table_and_lists_the_table(capsys):
    """Refused before any cluster is contacted (nothing listens on the address), naming every job it can run."""
    with pytest.raises(SystemExit) as refused:
        submit_job.main(["--address", "http://127.0.0.1:9", "train"])
    assert refused.value.code == 2
    choices = capsys.readouterr().err.rpartition("invalid choice: 'train'")[2]
    assert [name for name in COMMANDS if repr(name) in choices] == [name for name in COMMANDS
                                                                    if name not in ("submit", "config")]
    for tool in ("submit", "config"):  # submit itself and the local config reference are not jobs
        with pytest.raises(ValueError, match=f"unknown job '{tool}'; choose one of demo, generate"):
            Submission(tool, (), "http://x")
