"""Security: credentials never leave the environment, checkpoints never run code, files stay under
the output root. Serve's request bounds (body size, pixel count, n -> 4xx) are tested in test_serve.py."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from guidance import load_encoder, load_model
from jobs import generate as generate_job
from pipeline.curate.config import RefreshConfig
from pipeline.schema import FAILURES_DIR, MANIFEST_FILE, RUN_FILE
from tests.conftest import ENCODER_NAME, TINY_ARGS, TINY_SIZE
from tests.tiny_diffusion import save_pixel_unet


def leaks(blob: bytes | str, secrets: list[str]) -> list[str]:
    text = blob.decode("utf-8", "replace") if isinstance(blob, bytes) else blob
    return [secret for secret in secrets if secret in text]


def readable(path: Path) -> str:
    """A file's text as a person or a program would read it: Parquet decoded (its pages may be compressed)."""
    if path.suffix == ".parquet":
        return repr(pq.read_table(path).to_pylist())
    return path.read_bytes().decode("utf-8", "replace")


def test_no_credential_appears_in_logs_tracking_or_outputs(ray_cluster, s3, write_config, nan_class_unet,
                                                           tmp_path, monkeypatch, capsys, caplog):
    import ray

    secrets = [s3.access_key, s3.secret_key]  # the run's real keys, in the AWS environment only
    s3.client().create_bucket(Bucket="secrets")
    path = write_config(model={"source": str(nan_class_unet)},  # class 9 fails: its record is scanned too
                        work={"class_labels": [0, 9], "samples_per_label": 1},
                        output={"uri": "s3://secrets/run", "max_failure_fraction": 0.5},
                        storage={"endpoint_url": s3.endpoint, "region": "us-east-1"})
    driver = subprocess.run([sys.executable, "-m", "jobs.generate", path], capture_output=True, text=True,
                            env=os.environ | {"RAY_ADDRESS": ray_cluster}, timeout=600)
    assert driver.returncode == 0, driver.stderr[-3000:]
    found = {"driver output": leaks(driver.stdout + driver.stderr, secrets)}

    objects = tmp_path / "objects"
    for item in s3.client().list_objects_v2(Bucket="secrets", Prefix="run/")["Contents"]:
        if item["Key"].endswith("/"):  # a folder marker
            continue
        target = objects / item["Key"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3.client().get_object(Bucket="secrets", Key=item["Key"])["Body"].read())
    written = {p.relative_to(objects).as_posix() for p in objects.rglob("*") if p.is_file()}
    assert {f"run/{RUN_FILE}", f"run/{MANIFEST_FILE}"} <= written and any(k.startswith(f"run/{FAILURES_DIR}/") for k in written)
    for file in objects.rglob("*"):
        if file.is_file():
            found[f"s3 {file.relative_to(objects)}"] = leaks(readable(file), secrets)

    mlruns = tmp_path / "mlruns"
    (run,) = MlflowClient(f"sqlite:///{mlruns}/mlflow.db").search_runs(["1"])
    found["mlflow params and tags"] = leaks(repr(run.data.params) + repr(run.data.tags), secrets)
    for file in mlruns.rglob("*"):  # the sqlite store itself and every artifact
        if file.is_file():
            found[f"mlflow {file.relative_to(mlruns)}"] = leaks(file.read_bytes(), secrets)
    context = ray.get_runtime_context()  # Ray's log folder: <temp dir>/<session name>/logs
    ray_logs = Path(context.get_temp_dir()) / context.get_session_name() / "logs"
    assert ray_logs.is_dir(), f"no Ray log folder at {ray_logs}"
    for file in ray_logs.rglob("*"):
        if file.is_file():
            found[f"ray log {file.name}"] = leaks(file.read_bytes(), secrets)
    assert not any(found.values()), {where: hits for where, hits in found.items() if hits}
    assert len(found) > 10  # the scan really read the run's files

    # A refused run: the wrong secret must not be echoed back either.
    wrong = "Wr0ng+Secret/Value=ZZqq8"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with caplog.at_level("DEBUG"):
        assert generate_job.main([path, "--set", "output.uri=s3://secrets/refused"]) == 2
    err = capsys.readouterr().err
    assert "credentials were refused" in err
    assert not leaks(err + caplog.text, [wrong, s3.secret_key])


@pytest.mark.parametrize("key", ["storage.endpoint_url", "tracking.tracking_uri"])
def test_credentials_inside_a_uri_are_refused_without_echoing_them(write_config, tmp_path, capsys, key):
    secret = "s3cr3t-in-a-url"
    assert generate_job.main([write_config(), "--set", f"{key}=http://AKIAUSER:{secret}@127.0.0.1:9000"]) == 2
    err = capsys.readouterr().err
    assert f"{key} carries credentials" in err and secret not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlruns").exists()


class Trap:
    """Unpickling this creates a file: proof that a loader ran code from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_encoder_pickles_are_never_unpickled(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": Trap(marker)}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="not weights-only"):
        load_encoder(ENCODER_NAME, tmp_path / "weights.pth", input_size=TINY_SIZE, model_args=TINY_ARGS)
    assert not marker.exists()


def test_diffusion_pickles_are_never_unpickled(tmp_path):
    marker = tmp_path / "code-ran"
    folder = save_pixel_unet(tmp_path / "unet", num_classes=10)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": Trap(marker)}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match="Unable to load weights"):
        load_model("pixel-unet", folder)
    assert not marker.exists()


def test_files_stay_under_the_output_root(ray_cluster, write_config, sd_folder, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("../../escaped\n/etc/passwd\nC:\\Windows\\x\n..\n")
    before = {p for p in tmp_path.rglob("*")}
    path = write_config(model={"preset": "sd", "source": str(sd_folder)},
                        sampling={"method": "unguided", "steps": 1},
                        work={"prompts": str(prompts), "class_labels": None})
    assert generate_job.main([path]) == 0
    created = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in created if not any(p.is_relative_to(tmp_path / root) for root in ("out", "mlruns"))]
    assert outside == [tmp_path / "config.yaml"]
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert sorted(r["prompt"] for r in rows) == sorted(prompts.read_text().splitlines())
    assert all(r["image"]["path"] == f"{r['sample_id']}.png" for r in rows)  # names from ids, never prompts


@pytest.mark.parametrize("version", ["..", ".hidden"])  # "../x", "a/b", "": test_refresh.py
def test_refresh_versions_cannot_name_a_folder_outside_the_root(version):
    with pytest.raises(ValueError, match="must be a plain folder name"):
        RefreshConfig(config="c.yaml", root="/data/root", version=version)


def test_the_secret_scan_would_see_a_leak(tmp_path):
    leaky = tmp_path / "leaky.parquet"
    pq.write_table(pa.table({"note": [f"key={chr(65)}KIA-LEAKED"]}), leaky, compression="zstd")
    assert leaks(readable(leaky), ["AKIA-LEAKED"]) == ["AKIA-LEAKED"]
    assert leaks(b"...AKIA-LEAKED...", ["AKIA-LEAKED", "other"]) == ["AKIA-LEAKED"]
