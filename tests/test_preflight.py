"""Every check before the expensive part: bad input refused by --dry-run in one line, writing nothing;
what a run would do said up front; the run's identity (what resumes, what is another run); and MLflow
runs a person can find (names, experiment, the `mlflow ui` command)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from jobs import demo as demo_job
from jobs import filter as filter_job
from jobs import generate as generate_job
from jobs import refresh as refresh_job
from pipeline.generate.config import load_config
from pipeline.rows import sample_ranges
from pipeline.schema import DATA_DIR, DATA_FILE_PREFIX, MANIFEST_FILE, OUTPUT_SCHEMA, RUN_FILE, SAMPLE_RANGES_KEY
from pipeline.tracking import folder_name, run_name, source_name
from tests.services import free_port
from tests.test_bad_input import cli_refuses
from tests.conftest import cpu_manifest
from tests.test_curation import fake_generation


def broken_weights(tmp_path, tiny_vit_folder):
    """The tiny encoder folder with its safetensors header cut short."""
    folder = tmp_path / "encoder"
    shutil.copytree(tiny_vit_folder, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    return {"weights": str(folder)}, f"encoder.weights: could not read encoder weights {weights}"


@pytest.mark.parametrize("case", ["output is a file", "another config's run", "unreadable encoder weights",
                                  "unreachable S3 endpoint"])
def test_dry_run_refuses_each_bad_input_in_one_line_and_writes_nothing(case, write_config, tiny_vit_folder, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "out"
    sections = {}
    if case == "output is a file":
        out.write_text("not a folder")
        message = f"jepa-minority generate: {out} is a file, not a folder"
    elif case == "another config's run":
        out.mkdir()
        unguided = cpu_manifest(load_config(write_config(), ["sampling.method=unguided"]))
        feather.write_feather(unguided.table, out / MANIFEST_FILE)
        message = f'jepa-minority generate: {out} holds another run (sampling.method "unguided" -> "jepa")'

    elif case == "unreadable encoder weights":
        sections["encoder"], message = broken_weights(tmp_path, tiny_vit_folder)
        message = f"jepa-minority generate: {message}"
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE00")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        sections |= {"output": {"uri": "s3://runs/x"}, "storage": {"endpoint_url": f"http://127.0.0.1:{free_port()}"}}
        message = "jepa-minority generate: cannot reach s3://runs/x: the storage endpoint did not answer"
    config = write_config(**sections)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    line = cli_refuses(["generate", config, "--dry-run"], tmp_path)
    assert line.startswith(message), line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, not even an empty folder


def test_dry_run_says_what_a_run_would_do(write_config, tmp_path, capsys):
    path, out = write_config(), tmp_path / "out"
    assert generate_job.main([path, "--dry-run"]) == 0
    assert capsys.readouterr().out == f"dry run: 12 samples planned into {out}, 0 already committed: starts\n"
    manifest = cpu_manifest(load_config(path)).table
    out.mkdir()
    feather.write_feather(manifest, out / MANIFEST_FILE)
    rows = [{"sample_id": sample_id} for sample_id in manifest.column("sample_id").to_pylist()[:5]]
    (out / DATA_DIR).mkdir()
    record = {SAMPLE_RANGES_KEY: sample_ranges(np.arange(5))}  # the sink's footer record of samples 0..4
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA.with_metadata(OUTPUT_SCHEMA.metadata | record)),
                   out / DATA_DIR / f"{DATA_FILE_PREFIX}a.parquet")  # this version's columns, nulls but the id
    assert generate_job.main([path, "--dry-run"]) == 0
    assert capsys.readouterr().out == f"dry run: 12 samples planned into {out}, 5 already committed: resumes\n"
    assert sorted(p.name for p in out.rglob("*")) == sorted([MANIFEST_FILE, DATA_DIR, f"{DATA_FILE_PREFIX}a.parquet"])


@pytest.mark.parametrize("change", ["model.compile=true", "sampling.guidance.micro_batch=1", "ray.batch_size=3",
                                    "ray.actors=1", "output.max_rows_per_file=2", "model.dtype=float32"])
def test_speed_only_levers_resume_the_run(change, write_config, tmp_path, capsys):
    """Each leaves the samples as they are, so it leaves the run's identity as it is (auto is float32 on CPU)."""
    path = write_config()
    (tmp_path / "out").mkdir()
    feather.write_feather(cpu_manifest(load_config(path)).table, tmp_path / "out" / MANIFEST_FILE)
    assert generate_job.main([path, "--dry-run", "--set", change]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.endswith("0 already committed: resumes\n")


@pytest.mark.parametrize("change,named", [
    ("eta", "sampling.guidance.eta 0.5 -> 0.25"),
    ("dtype", 'model.dtype "float32" -> "bfloat16"'),
    ("model weights", "model.weights: unet/diffusion_pytorch_model.safetensors changed (path, size or modification time)"),
    ("encoder weights", "encoder.files: model.safetensors changed (path, size or modification time)"),
])
def test_what_changes_the_samples_is_another_run_named_by_what_differs(change, named, write_config, class_unet,
                                                                       tiny_vit_folder, tmp_path, capsys):
    model, encoder = tmp_path / "model", tmp_path / "encoder"
    shutil.copytree(class_unet, model)
    shutil.copytree(tiny_vit_folder, encoder)
    path = write_config(model={"source": str(model)}, encoder={"weights": str(encoder)})
    (tmp_path / "out").mkdir()
    feather.write_feather(cpu_manifest(load_config(path)).table, tmp_path / "out" / MANIFEST_FILE)
    overrides = []
    if change == "eta":
        overrides = ["--set", "sampling.guidance.eta=0.25"]
    elif change == "dtype":
        overrides = ["--set", "model.dtype=bfloat16"]
    else:  # retrained in place: same names, new bytes (here the same bytes, rewritten later)
        weights = (model / "unet" / "diffusion_pytorch_model.safetensors" if change == "model weights"
                   else encoder / "model.safetensors")
        stat = weights.stat()
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert generate_job.main([path, "--dry-run", *overrides]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"jepa-minority generate: {tmp_path / 'out'} holds another run ({named}); choose a new "
                    "output.uri, or rerun with the config that made it to resume")


@pytest.mark.parametrize("method,change", [
    ("unguided", "sampling.guidance.eta=0.1"), ("unguided", "sampling.guidance.oversample=5"),
    ("unguided", "model.guidance_decoder=madebyollin/taesd"), ("unguided", "sampling.bns.gamma=1.5"),
    ("bns", "sampling.guidance.tau=0.5"), ("jepa", "sampling.bns.skip=1"),
])
def test_settings_the_method_does_not_read_resume_its_run(method, change, write_config, tmp_path, capsys):
    """The demo's unguided arm stays the same run when only the guided arm's settings change."""
    path = write_config(sampling={"method": method, "steps": 3, "guidance": {"tau": 1.0, "k": 4}})
    (tmp_path / "out").mkdir()
    feather.write_feather(cpu_manifest(load_config(path)).table, tmp_path / "out" / MANIFEST_FILE)
    assert generate_job.main([path, "--dry-run", "--set", change]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.endswith("0 already committed: resumes\n")


def test_the_stored_top_k_score_keeps_guidance_k_in_every_methods_identity(write_config, tmp_path, capsys):
    path = write_config(sampling={"method": "unguided"})
    (tmp_path / "out").mkdir()
    feather.write_feather(cpu_manifest(load_config(path)).table, tmp_path / "out" / MANIFEST_FILE)
    assert generate_job.main([path, "--dry-run", "--set", "sampling.guidance.k=3"]) == 2
    assert "holds another run (sampling.guidance.k 4 -> 3)" in capsys.readouterr().err


def test_a_run_of_an_earlier_version_is_said_to_be_one(write_config, tmp_path, capsys):
    path = write_config()
    table = cpu_manifest(load_config(path)).table
    (tmp_path / "out").mkdir()
    feather.write_feather(table.replace_schema_metadata({"config_digest": "0123456789abcdef"}),
                          tmp_path / "out" / MANIFEST_FILE)
    assert generate_job.main([path, "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        f"jepa-minority generate: {tmp_path / 'out'} holds a run made by an earlier version, which stored only its "
        "digest (0123456789ab), so the settings that differ cannot be named; resume it with that version, or choose "
        "a new output.uri\n")


def test_other_work_under_the_same_settings_is_another_run(write_config, tmp_path, capsys):
    path = write_config()
    (tmp_path / "out").mkdir()
    feather.write_feather(cpu_manifest(load_config(path)).table, tmp_path / "out" / MANIFEST_FILE)
    assert generate_job.main([path, "--dry-run", "--set", "work.class_labels=[0,3,8]"]) == 2
    assert "holds another run (the same settings over other work rows" in capsys.readouterr().err


@pytest.mark.parametrize("method,k,refused", [("jepa", 31, True), ("jepa", 30, False), ("unguided", 33, True),
                                              ("unguided", 32, False), ("bns", 33, True)])
def test_guidance_k_is_checked_against_the_encoders_embedding_size(method, k, refused, write_config,
                                                                    tiny_vit_folder, tmp_path, capsys):
    """The tiny encoder has D = 32: guided methods sketch k + oversample (2) columns, every method stores the
    exact top-k score at k."""
    path = write_config(sampling={"method": method, "steps": 3, "guidance": {"tau": 1.0, "k": k}})
    assert generate_job.main([path, "--dry-run"]) == (2 if refused else 0)
    err = capsys.readouterr().err
    if refused:
        assert err.startswith(f"jepa-minority generate: guidance.k: encoder vit_small_patch14_reg4_dinov2 "
                              f"({tiny_vit_folder}) has D = 32 embedding dimensions: k + oversample = {k} + "
                              f"{2 if method == 'jepa' else 0} exceeds min(D, N) = min(32, 2352) = 32"), err
        assert ("stores its top-k score at guidance.k" in err) == (method != "jepa")
    else:
        assert err == ""


def test_a_demo_over_one_made_with_another_config_says_how_to_start_over(write_config, tmp_path, capsys):
    path, root = write_config(), tmp_path / "demo"
    (root / "unguided").mkdir(parents=True)
    feather.write_feather(cpu_manifest(load_config(path)).table, root / "unguided" / MANIFEST_FILE)  # not the demo's arm
    assert demo_job.main(["--config", path, "--root", str(root), "--dry-run"]) == 2
    assert capsys.readouterr().err == (f"jepa-minority demo: {root / 'unguided'} holds a demo made with another config; "
                                       f"delete {root} to start the demo over, or pass --root with a new folder\n")


def test_refresh_and_demo_refuse_a_bad_curation_rule_before_generating(write_config, tmp_path, capsys):
    path = write_config()
    assert refresh_job.main([path, "--root", str(tmp_path / "root"), "--keep-fraction", "0"]) == 2
    assert capsys.readouterr().err == "jepa-minority refresh: keep_fraction must be in (0, 1], got 0.0\n"
    assert demo_job.main(["--config", path, "--root", str(tmp_path / "demo"), "--keep-fraction", "2"]) == 2
    assert capsys.readouterr().err == "jepa-minority demo: keep_fraction must be in (0, 1], got 2.0\n"
    assert not list(tmp_path.rglob(MANIFEST_FILE)) and not (tmp_path / "mlruns").exists()


def test_refresh_and_demo_dry_runs_check_every_arm_and_write_nothing(write_config, tiny_vit_folder, tmp_path, capsys):
    path = write_config()
    assert refresh_job.main([path, "--root", str(tmp_path / "root"), "--version", "v1", "--dry-run"]) == 0
    assert capsys.readouterr().out == (
        f"dry run: version v1: 12 samples planned into {tmp_path}/root/versions/v1/generated, 0 already committed: "
        f"starts; then the rarest (0.1 per run) into {tmp_path}/root/versions/v1/rarest\n")
    assert demo_job.main(["--config", path, "--root", str(tmp_path / "demo"), "--dry-run"]) == 0
    assert "unguided: 12 samples planned" in capsys.readouterr().out
    encoder, message = broken_weights(tmp_path, tiny_vit_folder)
    broken = write_config(encoder=encoder)
    assert demo_job.main(["--config", broken, "--root", str(tmp_path / "demo"), "--dry-run"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"jepa-minority demo: {message} (truncated, corrupted or not safetensors?)")
    assert not (tmp_path / "root").exists() and not (tmp_path / "demo").exists()


def test_filter_by_hand_logs_beside_its_input_run_and_says_how_to_browse(ray_cluster, tmp_path, monkeypatch, capsys):
    """Without --experiment / --tracking-uri, the filter's run lands where the input's _run.json says the
    generation was tracked; its name says what ran; the last line is the exact `mlflow ui` command and its runs page."""
    store = f"sqlite:///{tmp_path}/store/mlflow.db"
    gen = tmp_path / "digits-run"
    fake_generation(gen, [3.0, 1.0, 2.0, 4.0])
    (gen / RUN_FILE).write_text(json.dumps({
        "status": "complete", "last_run_id": "gen-run",
        "config": {"model": {"preset": "pixel-unet", "source": "models/digits-ddpm"}, "sampling": {"method": "jepa"}},
        "tracking": {"tracking_uri": store, "artifact_location": str(tmp_path / "store" / "artifacts"),
                     "experiment": "digits-study"},
    }))
    monkeypatch.chdir(tmp_path)  # the default store would be ./mlruns here: it must stay unused
    assert filter_job.main(["--input", str(gen), "--output", str(tmp_path / "rarest"), "--keep", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("digits-study").experiment_id
    assert lines[-1] == (f"browse:    mlflow ui --backend-store-uri {store}, then open "
                         f"http://127.0.0.1:5000/#/experiments/{experiment}/runs")
    (run,) = client.search_runs([experiment])
    assert run.info.run_name == "rarest: filter jepa digits-ddpm" and run.info.status == "FINISHED"
    assert not (tmp_path / "mlruns").exists()
    assert filter_job.main(["--input", str(gen), "--output", str(tmp_path / "other"), "--keep", "1",
                            "--experiment", "by-hand"]) == 0  # a flag given wins, in the input's store
    assert client.get_experiment_by_name("by-hand") is not None


def test_run_names_tell_outputs_and_versions_apart():
    assert folder_name("s3://bucket/digits/versions/2026-11-28/generated/") == "2026-11-28/generated"
    assert folder_name("outputs/demo/rarest") == "rarest"
    assert run_name("generate", "jepa", source_name("models/digits-ddpm"), folder_name("outputs/demo/jepa")) == \
        "jepa: generate jepa digits-ddpm"
