"""What a curation refuses before Ray starts or an MLflow run opens: folders it did not write (a run, another
curation, the user's files), an output nested with its input, a rule whose groups would keep nothing, a group
column the run lacks. Each refusal is one line, exit 2, and leaves every file as it was."""

from __future__ import annotations

import json

import pytest

from jobs import demo as demo_job
from jobs import filter as filter_job
from jobs import refresh as refresh_job
from pipeline.curate.config import FilterConfig
from pipeline.curate.filter import claim_folder
from pipeline.schema import CURATION_FILE, DATA_DIR, DATA_FILE_PREFIX, MANIFEST_FILE, RUN_FILE
from pipeline.storage import StorageConfig, resolve
from tests.test_curation import fake_generation


def snapshot(folder) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def refused(main, args: list[str], capsys) -> str:
    """The job exits 2 with exactly one line on stderr, which is returned."""
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


def filter_args(tmp_path, output, *more: str) -> list[str]:
    return ["--input", str(tmp_path / "gen"), "--output", str(output), "--keep", "1",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db", *more]


@pytest.fixture
def gen(tmp_path):
    fake_generation(tmp_path / "gen", [float(i) for i in range(10)], labels=[0] * 6 + [1] * 4)
    return tmp_path / "gen"


def test_an_output_holding_a_run_is_refused_and_left_whole(gen, tmp_path, capsys):
    other = tmp_path / "other-run"
    fake_generation(other, [1.0, 2.0])
    before = snapshot(other)
    for args in (filter_args(tmp_path, other), filter_args(tmp_path, other, "--dry-run")):
        line = refused(filter_job.main, args, capsys)
        assert line == (f"jepa-minority filter: {other} holds a generation run ({RUN_FILE}), which is never written "
                        "into; choose another --output")
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / MANIFEST_FILE).write_bytes(b"manifest")  # a run begun, not finished
    assert f"holds a generation run ({MANIFEST_FILE})" in refused(filter_job.main, filter_args(tmp_path, tmp_path / "started"), capsys)
    assert snapshot(other) == before and not (tmp_path / "mlruns").exists()


def test_an_output_holding_the_users_files_is_refused_and_left_whole(gen, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / DATA_DIR).mkdir(parents=True)
    (mine / DATA_DIR / "x.parquet").write_bytes(b"the user's own data")
    line = refused(filter_job.main, filter_args(tmp_path, mine), capsys)
    assert line == (f"jepa-minority filter: {mine / DATA_DIR} holds files this curation did not write (x.parquet), "
                    "which it would mix with or delete; choose another --output")
    (mine / DATA_DIR / f"{DATA_FILE_PREFIX}0.parquet").write_bytes(b"named like ours, but no marker claims it")
    assert "did not write (train-0.parquet, x.parquet)" in refused(filter_job.main, filter_args(tmp_path, mine), capsys)
    (mine / "notes.txt").write_text("beside the data")
    assert f"{mine} holds files this curation did not write (notes.txt)" in refused(
        filter_job.main, filter_args(tmp_path, mine), capsys)
    assert snapshot(mine) == {f"{DATA_DIR}/x.parquet": b"the user's own data", "notes.txt": b"beside the data",
                              f"{DATA_DIR}/{DATA_FILE_PREFIX}0.parquet": b"named like ours, but no marker claims it"}


def test_a_claimed_folder_still_refuses_files_not_named_like_its_own(gen, tmp_path, capsys):
    """The marker claims only the sink's names: a user's file dropped in beside them is never deleted."""
    config = FilterConfig(input=str(gen), output=str(tmp_path / "cur"), keep=1)
    claim_folder(config, resolve(config.output, config.storage))
    (tmp_path / "cur" / DATA_DIR).mkdir()
    (tmp_path / "cur" / DATA_DIR / "x.parquet").write_bytes(b"mine")
    assert "did not write (x.parquet)" in refused(filter_job.main, filter_args(tmp_path, tmp_path / "cur"), capsys)
    assert (tmp_path / "cur" / DATA_DIR / "x.parquet").read_bytes() == b"mine"


def test_outputs_nested_with_their_input_are_refused(gen, tmp_path, capsys):
    inner = refused(filter_job.main, filter_args(tmp_path, gen / "rarest"), capsys)
    assert inner == (f"jepa-minority filter: output {gen / 'rarest'} lies inside {gen}: readers of the outer folder "
                     "would read its rows too and count them twice; choose another --output")
    outer = refused(filter_job.main, filter_args(tmp_path, tmp_path), capsys)
    assert outer.startswith(f"jepa-minority filter: input {gen} lies inside {tmp_path}: readers")
    assert refused(filter_job.main, filter_args(tmp_path, f"{gen}/./"), capsys) == (
        "jepa-minority filter: output must differ from input: the curated set is a new dataset")
    assert not (gen / "rarest").exists()


def test_outputs_nested_with_their_input_are_refused_on_s3(s3, gen, tmp_path, capsys):
    client = s3.client()
    client.create_bucket(Bucket="nested")
    for path in gen.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "nested", f"gen/{path.relative_to(gen)}")
    storage = ["--endpoint-url", s3.endpoint, "--region", "us-east-1", "--dry-run",
               "--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db"]
    for output, line in (("s3://nested/gen/rarest", "output s3://nested/gen/rarest lies inside s3://nested/gen"),
                         ("s3://nested", "input s3://nested/gen lies inside s3://nested")):
        args = ["--input", "s3://nested/gen", "--output", output, "--keep", "1", *storage]
        assert refused(filter_job.main, args, capsys).startswith(f"jepa-minority filter: {line}: readers")
    sibling = ["--input", "s3://nested/gen", "--output", "s3://nested/generated", "--keep", "1", *storage]
    assert filter_job.main(sibling) == 0  # a prefix that merely starts alike is apart


def test_a_curation_begun_with_another_input_or_rule_is_refused_naming_what_differs(gen, tmp_path, capsys):
    fake_generation(tmp_path / "gen2", [1.0, 2.0])
    begun = FilterConfig(input=str(tmp_path / "gen2"), output=str(tmp_path / "cur"), keep_fraction=0.5)
    claim_folder(begun, resolve(begun.output, begun.storage))
    line = refused(filter_job.main, filter_args(tmp_path, tmp_path / "cur", "--by", "topk_score"), capsys)
    assert line == (f"jepa-minority filter: {tmp_path / 'cur'} holds a curation made with another input, keep_fraction, "
                    f"keep, by (input {tmp_path / 'gen2'}, here {gen}; keep_fraction 0.5, here None; keep None, here 1; "
                    "by jepa_score, here topk_score); choose another --output, or rerun with the rule that made it to "
                    "finish it")
    assert json.loads((tmp_path / "cur" / CURATION_FILE).read_text())["rule"]["keep_fraction"] == 0.5


def test_groups_that_would_keep_nothing_are_refused_unless_allowed(gen, tmp_path, capsys):
    """floor(0.2 x 4) = 0: class 1 would keep nothing. The dry run computes every quota."""
    base = ["--input", str(gen), "--output", str(tmp_path / "cur"), "--per", "class_label", "--keep-fraction", "0.2",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db"]
    for args in (base, [*base, "--dry-run"]):
        assert refused(filter_job.main, args, capsys) == (
            f"jepa-minority filter: class_label 1 (4 rows) of {gen} would keep nothing (keep_fraction 0.2 keeps "
            "floor(fraction x n) of a group's n, so each needs 5): generate more samples, raise the keep fraction, "
            "or pass --allow-empty-groups to curate them empty")
    assert filter_job.main([*base, "--dry-run", "--allow-empty-groups"]) == 0
    assert f"the rarest of {gen} (up to 1 rows in 2 groups)" in capsys.readouterr().out
    whole = [*base[:4], "--keep-fraction", "0.05", "--dry-run", *base[-2:]]
    assert f"all 10 rows of {gen} would keep nothing" in refused(filter_job.main, whole, capsys)
    assert not (tmp_path / "cur").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("per, other", [("prompt", "class_label"), ("class_label", "prompt")])
def test_a_group_the_run_lacks_is_refused_before_an_mlflow_run_opens(tmp_path, capsys, per, other):
    kind = {"labels": [0, 1]} if per == "prompt" else {"prompts": ["a cat", "a dog"]}
    fake_generation(tmp_path / "gen", [1.0, 2.0], **kind)
    line = refused(filter_job.main, filter_args(tmp_path, tmp_path / "cur", "--per", per), capsys)
    assert line == (f"jepa-minority filter: 2 of the 2 rows of {tmp_path / 'gen'} have no {per}: curate them without "
                    f"--per, or with --per {other}")
    assert not (tmp_path / "cur").exists() and not (tmp_path / "mlruns").exists()


def test_refresh_roots_holding_a_run_or_other_files_are_refused(write_config, tmp_path, capsys):
    path = write_config(work={"class_labels": [1], "samples_per_label": 10})
    run = tmp_path / "run"
    fake_generation(run, [1.0])
    before = snapshot(run)
    assert refresh_job.main([path, "--root", str(run), "--dry-run"]) == 2
    assert capsys.readouterr().err == (f"jepa-minority refresh: {run} holds a generation run ({RUN_FILE}), which is "
                                       "never written into; choose another --root\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.parquet").write_bytes(b"mine")
    assert refresh_job.main([path, "--root", str(tmp_path / "mine"), "--version", "v1"]) == 2
    assert f"{tmp_path / 'mine'} holds files a refresh did not write (x.parquet)" in capsys.readouterr().err
    assert snapshot(run) == before and snapshot(tmp_path / "mine") == {"x.parquet": b"mine"}


def test_refresh_refuses_a_version_whose_groups_would_keep_nothing(write_config, tmp_path, capsys):
    """At refresh's default 0.1, fewer than 10 samples keep nothing: refused before a sample is drawn."""
    path = write_config(work={"class_labels": [1, 2], "samples_per_label": 9})
    args = [path, "--root", str(tmp_path / "root"), "--version", "v1", "--per", "class_label"]
    line = refused(refresh_job.main, [*args, "--dry-run"], capsys)
    assert line.startswith(f"jepa-minority refresh: class_label 1 (9 samples planned), class_label 2 (9 samples "
                           f"planned) of {tmp_path}/root/versions/v1/generated would keep nothing (keep_fraction 0.1 "
                           "keeps floor(fraction x n) of a group's n, so each needs 10)")
    assert refused(refresh_job.main, args, capsys) == line
    assert refresh_job.main([*args, "--dry-run", "--allow-empty-groups"]) == 0
    assert not (tmp_path / "root").exists()


def test_demo_roots_holding_a_run_or_other_files_are_refused(write_config, tmp_path, capsys):
    path = write_config()
    run = tmp_path / "run"
    fake_generation(run, [1.0])
    start_over = "delete {} to start the demo over, or pass --root with a new folder"
    assert refused(demo_job.main, ["--config", path, "--root", str(run), "--dry-run"], capsys) == (
        f"jepa-minority demo: {run} holds a generation run ({RUN_FILE}), which is never written into; "
        + start_over.format(run))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("mine")
    assert refused(demo_job.main, ["--config", path, "--root", str(tmp_path / "home"), "--dry-run"], capsys) == (
        f"jepa-minority demo: {tmp_path / 'home'} holds files the demo did not write (thesis.tex), which it would "
        "mix with or delete; " + start_over.format(tmp_path / "home"))
    line = refused(demo_job.main, ["--config", path, "--root", str(tmp_path / "demo"), "--keep-fraction", "0.2",
                                   "--dry-run"], capsys)
    assert line.startswith("jepa-minority demo: class_label 0 (4 samples planned), class_label 3 (4 samples planned), "
                           "class_label 7 (4 samples planned) of ")
    assert snapshot(tmp_path / "home") == {"thesis.tex": b"mine"} and not (tmp_path / "demo").exists()


def test_a_demo_curated_with_another_fraction_is_refused(write_config, tmp_path, capsys):
    path = write_config()
    root = tmp_path / "demo"
    begun = FilterConfig(input=str(root / "jepa"), output=str(root / "rarest"), keep_fraction=0.5, per="class_label")
    claim_folder(begun, resolve(begun.output, StorageConfig()))
    line = refused(demo_job.main, ["--config", path, "--root", str(root), "--dry-run"], capsys)
    assert line.startswith(f"jepa-minority demo: {root / 'rarest'} holds a curation made with another keep_fraction "
                           f"(keep_fraction 0.5, here 0.25); delete {root} to start the demo over")
