"""The main job against real parts: a local Ray cluster (2 actors), moto's S3 server on 127.0.0.1,
an MLflow sqlite store, tiny models saved locally and loaded through the product's code."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.feather as feather
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from guidance import jepa_score, jepa_scores
from jobs import generate as generate_job
from pipeline.generate.config import load_config
from pipeline.generate.job import run_generation
from pipeline.generate.preflight import preflight_generation
from pipeline.generate.sampler_stage import load_models
from pipeline.generate.work import Manifest
from pipeline.schema import DATA_DIR, DATA_FILE_PREFIX, FAILURES_DIR, MANIFEST_FILE, RUN_FILE, bucket_of
from tests.conftest import cpu_manifest
from tests.private_apis import compiled_in_place


def read_rows(filesystem: pafs.FileSystem, data_dir: str) -> list[dict]:
    files = [info.path for info in filesystem.get_file_info(pafs.FileSelector(data_dir, recursive=True))
             if info.base_name.startswith(DATA_FILE_PREFIX)]
    return pads.dataset(files, filesystem=filesystem, format="parquet").to_table().to_pylist()


def planned_ids(out: Path) -> list[str]:
    """Every sample id a run's stored manifest plans."""
    return Manifest.read(feather.read_table(out / MANIFEST_FILE)).table.column("sample_id").to_pylist()


def check_output(rows: list[dict], manifest_ids: list[str], encoder) -> None:
    ids = [row["sample_id"] for row in rows]
    assert sorted(ids) == sorted(manifest_ids) and len(set(ids)) == len(ids)
    for row in rows[:3]:
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert image.format == "PNG" and image.size == (row["width"], row["height"]) == (8, 8)
        assert row["image"]["path"] == f"{row['sample_id']}.png"
        pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float()[None] / 255
        again = jepa_score(encoder, encoder.resize(pixels)).item()
        assert row["jepa_score"] == pytest.approx(again, abs=0.02)  # fp32 noise of a near-null direction
        _, topk = jepa_scores(encoder, encoder.resize(pixels), 4)  # the config's guidance k
        assert row["topk_score"] == pytest.approx(topk.item(), abs=1e-4)
        assert len(row["embedding"]) == 32 and row["method"] == "jepa" and row["model"] == "pixel-unet"


def test_generates_to_local_storage_once_tracks_mlflow_and_loads_in_datasets(
        ray_cluster, write_config, tmp_path, tiny_encoder, capsys):
    path = write_config()
    assert generate_job.main([path]) == 0
    assert "12 of 12 committed (12 by this run), 0 failed" in capsys.readouterr().out  # 3 labels x 4
    config = load_config(path)
    out = tmp_path / "out"
    manifest = Manifest.read(feather.read_table(out / MANIFEST_FILE))
    assert manifest.planned == 12 and manifest.work.num_rows == 3  # one row per work entry, not per sample
    rows = read_rows(pafs.LocalFileSystem(), str(out / "data"))
    check_output(rows, manifest.table.column("sample_id").to_pylist(), tiny_encoder)
    assert {row["class_label"] for row in rows} == {0, 3, 7}
    assert all(pq.ParquetFile(f).metadata.num_rows <= 4 for f in (out / "data").rglob(f"{DATA_FILE_PREFIX}*.parquet"))
    assert not list((out / "data").rglob("_*"))

    run = json.loads((out / "_run.json").read_text())
    assert run["status"] == "complete" and run["counts"] == {"planned": 12, "committed": 12, "failed": 0,
                                                             "truncated_prompts": 0}
    assert set(run["provenance"]["versions"]) >= {"torch", "diffusers", "timm", "ray"}

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    mlflow_run = client.get_run(run["last_run_id"])
    assert mlflow_run.data.params["sampling.method"] == "jepa"
    assert mlflow_run.data.params["work.class_labels"] == "[0, 3, 7]"
    assert mlflow_run.data.metrics["generated"] == 12 and mlflow_run.data.metrics["failed"] == 0
    metrics, scores = mlflow_run.data.metrics, np.array([r["jepa_score"] for r in rows])
    assert metrics["jepa_score_mean"] == pytest.approx(scores.mean(), rel=1e-12)  # one streamed pass, as before
    assert metrics["jepa_score_std"] == pytest.approx(scores.std(), rel=1e-9)
    percents = (5, 25, 50, 75, 95)  # exact while the run fits the quantiles' sample (pipeline/generate/scores.py)
    assert [metrics[f"jepa_score_p{p:02d}"] for p in percents] == [np.quantile(scores, p / 100) for p in percents]
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert artifacts == {"_run.json", "jepa_score_histogram.png", "rarest_and_typical.png"}
    contexts = {tag.value for d in mlflow_run.inputs.dataset_inputs for tag in d.tags}
    assert contexts == {"work", "output"}

    # the same config again: nothing to do
    assert run_generation(preflight_generation(config)).generated == 0
    assert len(read_rows(pafs.LocalFileSystem(), str(out / "data"))) == 12

    import datasets

    loaded = datasets.load_dataset("parquet", data_files=sorted(map(str, (out / "data").rglob(f"{DATA_FILE_PREFIX}*.parquet"))),
                                   split="train")
    assert isinstance(loaded.features["image"], datasets.Image)
    assert loaded[0]["image"].size == (8, 8) and loaded.num_rows == 12


def test_prompts_from_object_storage_rows_to_object_storage(ray_cluster, s3, write_config, sd_folder, tiny_encoder):
    s3.client().create_bucket(Bucket="runs")
    s3.client().put_object(Bucket="runs", Key="prompts.txt", Body="a photo of a cat\n\na red car\n")
    path = write_config(
        model={"preset": "sd", "source": str(sd_folder)},
        sampling={"method": "unguided", "steps": 2, "cfg_scale": 2.0},
        work={"prompts": "s3://runs/prompts.txt", "repeats": 2, "class_labels": None},
        output={"uri": "s3://runs/job1", "max_rows_per_file": 3},
        storage={"endpoint_url": s3.endpoint, "region": "us-east-1"},
    )
    assert generate_job.main([path]) == 0
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="runs", Prefix="job1/")["Contents"]}
    assert {f"job1/{MANIFEST_FILE}", f"job1/{RUN_FILE}"} <= keys
    assert sum(k.startswith(f"job1/{DATA_DIR}/{bucket_of(0)}/{DATA_FILE_PREFIX}") for k in keys) == 2  # 4 rows, 3 per file
    s3fs = pafs.S3FileSystem(endpoint_override=s3.endpoint.removeprefix("http://"), scheme="http",
                             access_key=s3.access_key, secret_key=s3.secret_key, region="us-east-1")
    rows = read_rows(s3fs, "runs/job1/data")
    assert sorted(r["prompt"] for r in rows) == ["a photo of a cat"] * 2 + ["a red car"] * 2
    assert all(Image.open(io.BytesIO(r["image"]["bytes"])).size == (16, 16) for r in rows)


def test_a_killed_run_resumes_without_duplicates_or_gaps(ray_cluster, write_config, tmp_path, tiny_encoder):
    path = write_config(work={"class_labels": [1, 2, 4, 5, 8, 9], "samples_per_label": 4},
                        ray={"actors": 1, "cpus_per_actor": 0.5, "batch_size": 2},
                        output={"max_rows_per_file": 2})
    data = tmp_path / "out" / "data"
    env = os.environ | {"RAY_ADDRESS": ray_cluster}
    driver = subprocess.Popen([sys.executable, "-m", "jobs.generate", path], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(data.rglob(f"{DATA_FILE_PREFIX}*.parquet")):
        assert driver.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "no data file was committed in time"
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    partial = len(read_rows(pafs.LocalFileSystem(), str(data)))
    assert 0 < partial < 24 and not (tmp_path / "out" / "_run.json").exists()

    summary = run_generation(preflight_generation(load_config(path)))
    assert summary.complete and summary.generated == 24 - partial
    manifest = planned_ids(tmp_path / "out")
    check_output(read_rows(pafs.LocalFileSystem(), str(data)), manifest, tiny_encoder)


def test_failed_samples_are_recorded_counted_and_fail_the_job(ray_cluster, write_config, nan_class_unet, tmp_path):
    path = write_config(model={"source": str(nan_class_unet)},
                        work={"class_labels": [0, 9], "samples_per_label": 2})  # class 9 turns to NaN
    assert generate_job.main([path]) == 1
    out = tmp_path / "out"
    failures = sorted((out / FAILURES_DIR / bucket_of(0)).glob("*.json"))  # the samples' bucket
    records = [json.loads(f.read_text()) for f in failures]
    assert len(records) == 2 and all(r["class_label"] == 9 for r in records)
    assert all("NaN or infinite" in r["error"] or "non-finite" in r["error"] for r in records)
    assert {r["class_label"] for r in read_rows(pafs.LocalFileSystem(), str(out / "data"))} == {0}
    assert not (out / "_run.json").exists()  # incomplete: never marked done

    # Tolerated failures complete the run: resumed with room for them, the class-9 samples are retried and fail
    # again, 2 of 4 (the bound is inclusive). The stage's failure path itself: tests/test_sampler_stage.py.
    assert generate_job.main([path, "--set", "output.max_failure_fraction=0.5"]) == 0
    run = json.loads((out / "_run.json").read_text())
    assert run["counts"]["failed"] == 2 and run["counts"]["committed"] == 2


def test_sample_ids_are_stable_per_config_and_seeds_shared_across_methods(write_config):
    path = write_config()
    first, again = cpu_manifest(load_config(path)), cpu_manifest(load_config(path))
    unguided = cpu_manifest(load_config(path, ["sampling.method=unguided"]))
    assert first.table.equals(again.table)
    assert set(first.table.column("sample_id").to_pylist()).isdisjoint(unguided.table.column("sample_id").to_pylist())
    assert first.table.column("seed").equals(unguided.table.column("seed"))
    assert len(set(first.table.column("seed").to_pylist())) == 12


def test_dry_run_writes_nothing(write_config, tmp_path, capsys):
    assert generate_job.main([write_config(), "--dry-run"]) == 0
    assert "12 samples planned" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_another_config_on_the_same_output_is_refused(write_config, tmp_path, capsys):
    path = write_config()
    (tmp_path / "out").mkdir()
    feather.write_feather(cpu_manifest(load_config(path, ["sampling.method=unguided"])).table,
                          tmp_path / "out" / MANIFEST_FILE)
    assert generate_job.main([path]) == 2
    assert "holds another run" in capsys.readouterr().err


def test_model_compile_reaches_the_actors_network(write_config):
    """``model.compile`` is what the actor loads with (the compiled sampling itself: tests/test_samplers.py)."""
    compiled, _ = load_models(load_config(write_config(model={"compile": True})), "cpu")
    plain, _ = load_models(load_config(write_config()), "cpu")
    assert compiled_in_place(compiled.network)
    assert not compiled_in_place(plain.network)


def test_model_dtype_is_what_the_actor_loads_with(write_config):
    """``model.dtype`` names a torch dtype; auto is float32 on CPU and bfloat16 on a GPU."""
    half, encoder = load_models(load_config(write_config(model={"dtype": "bfloat16"})), "cpu")
    auto = load_config(write_config()).model
    assert half.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in encoder.parameters())
    assert (auto.torch_dtype("cpu"), auto.torch_dtype("cuda")) == (torch.float32, torch.bfloat16)


def test_undecodable_prompt_file_names_the_line(write_config, sd_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a cat\na \xff dog\n")
    path = write_config(model={"preset": "sd", "source": str(sd_folder)},
                        work={"prompts": str(prompts), "class_labels": None})
    assert generate_job.main([path]) == 2
    assert "not valid UTF-8 (line 2" in capsys.readouterr().err


def test_missing_bucket_and_wrong_credentials_fail_before_sampling(s3, write_config, monkeypatch, capsys):
    path = write_config(output={"uri": "s3://no-such-bucket/run"}, storage={"endpoint_url": s3.endpoint})
    assert generate_job.main([path]) == 2
    assert "bucket 'no-such-bucket'" in capsys.readouterr().err
    s3.client().create_bucket(Bucket="guarded")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    path = write_config(output={"uri": "s3://guarded/run"}, storage={"endpoint_url": s3.endpoint})
    assert generate_job.main([path]) == 2
    err = capsys.readouterr().err
    assert "credentials were refused" in err and "not-the-secret" not in err
    assert "Contents" not in s3.client().list_objects_v2(Bucket="guarded")


@pytest.mark.parametrize("suffix,body", [
    (".txt", "a cat\n\na dog\n"),
    (".jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog"}\n'),
    (".csv", "prompt,note\na cat,x\na dog,y\n"),
])
def test_prompt_files_of_every_format(write_config, tmp_path, suffix, body):
    prompts = tmp_path / f"prompts{suffix}"
    prompts.write_text(body)
    manifest = cpu_manifest(load_config(write_config(work={"prompts": str(prompts), "class_labels": None,
                                                             "repeats": 2})))
    assert manifest.table.column("prompt").to_pylist() == ["a cat", "a cat", "a dog", "a dog"]


def test_parquet_prompts_and_truncation_report(write_config, tmp_path):
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["short", "x" * 50]}), prompts)
    manifest = cpu_manifest(load_config(write_config(
        work={"prompts": str(prompts), "class_labels": None, "max_prompt_chars": 10})))
    assert manifest.table.column("prompt").to_pylist() == ["short", "x" * 10]
    assert manifest.truncated_prompts == 1


@pytest.mark.parametrize("suffix,body,message", [
    (".csv", "text\na cat\n", "needs a header row with a 'prompt' column"),
    (".jsonl", '{"text": "a cat"}\n', 'line 1 must be an object with a "prompt" key'),
    (".jsonl", "not json\n", "line 1 is not JSON"),
    (".txt", "\n\n", "holds no prompts"),
    (".csv", "prompt\na cat\n\"\"\n", "line 3: empty or non-text prompt"),
    (".md", "a cat", "must end in one of"),
])
def test_bad_prompt_files_are_refused(write_config, tmp_path, suffix, body, message):
    prompts = tmp_path / f"prompts{suffix}"
    prompts.write_text(body)
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace("[", "\\[")):
        cpu_manifest(load_config(write_config(work={"prompts": str(prompts), "class_labels": None})))


def test_an_mlflow_server_works_like_the_local_store(ray_cluster, write_config, tmp_path_factory):
    from tests.services import start_mlflow_server

    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        path = write_config(work={"class_labels": [4], "samples_per_label": 2},
                            tracking={"tracking_uri": server.uri, "experiment": "served"})
        assert generate_job.main([path]) == 0
        client = MlflowClient(tracking_uri=server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("served").experiment_id])
        assert run.data.metrics["generated"] == 2 and run.data.params["work.class_labels"] == "[4]"
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
            "_run.json", "jepa_score_histogram.png", "rarest_and_typical.png"}
    finally:
        server.stop()
