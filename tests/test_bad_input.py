"""Bad input to the main job: each refused with a message that names what is wrong and how to fix
it, and nothing written that could pass for output. (More cases live in test_generation.py:
invalid UTF-8, empty prompts, missing bucket, wrong credentials; and in test_encoders.py: truncated
and pickled encoder weights.)"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pyarrow.feather as feather
import pytest
import safetensors.torch
import yaml
from PIL import Image

from benchmarks.bad_input_table import CASES, Scene, build_assets, run_case
from jobs import check_prior as check_prior_job
from jobs import cli
from jobs import evaluate as evaluate_job
from jobs import filter as filter_job
from jobs import generate as generate_job
from jobs import submit as submit_job
from pipeline.schema import FAILURES_DIR, MANIFEST_FILE
from tests.conftest import build_tiny_vit
from tests.services import free_port
from tests.test_curation import fake_generation
from tests.tiny_diffusion import misfit_copy, truncated_copy


def run_refused(args: list[str], capsys) -> str:
    assert generate_job.main(args) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("changes,message", [
    (["sampling.guidance.eta=.nan"], "sampling.guidance.eta must be a finite number, got nan"),
    (["sampling.guidance.eta=-0.5"], "guidance.eta must be a finite number >= 0, got -0.5"),
    (["sampling.cfg_scale=.inf"], "sampling.cfg_scale must be a finite number, got inf"),
    (["sampling.ddim_eta=1.5"], "ddim_eta must be in [0, 1]"),
    (["sampling.steps=-3"], "steps must be an integer >= 1, got -3"),
    (["sampling.guidance.k=0"], "k"),
    (["work.samples_per_label=0"], "work.samples_per_label must be >= 1, got 0"),
    (["work.class_labels=[-1, 2]"], "work.class_labels must be >= 0"),
    (["work.base_seed=1.5"], "work.base_seed must be an integer"),
    (["ray.actors=0"], "ray.actors must be a pool size >= 1 or a range [min, max] with 1 <= min <= max, got 0"),
    (["ray.cpus_per_actor=-1"], "ray.cpus_per_actor and ray.gpus_per_actor must be >= 0"),
    (["output.max_failure_fraction=.nan"], "output.max_failure_fraction must be a finite number, got nan"),
    (["output.max_failure_fraction=2"], "output.max_failure_fraction must be in [0, 1], got 2.0"),
    (["encoder.input_size=-14"], "encoder.input_size must be a positive multiple of 14, got -14"),
    (["sampler.steps=3"], "unknown key sampler; valid keys here: model, encoder, sampling"),
    (["sampling.guidance.etaa=1"], "unknown key sampling.guidance.etaa; valid keys here: eta, schedule, normalize"),
    (["work.clas_labels=[1]"], "unknown key work.clas_labels; valid keys here: prompts, repeats, class_labels"),
    (["sampling.steps=many"], "sampling.steps must be an integer"),
    (["model.dtype=fp8"], "model.dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"),
    (["sampling.guidance.tau=1.5"], "tau must be in [0, 1]"),
    (["encoder.name=dino"], "encoder.name: unknown encoder 'dino'"),
    (["model.preset=sd", "work.prompts=/nowhere/prompts.txt", "work.class_labels=null"],
     "file not found: /nowhere/prompts.txt"),
    (["work.prompts=/nowhere/prompts.txt", "work.class_labels=null"], "preset 'pixel-unet' is not a text-to-image"),
    (["output.uri=ftp://host/x"], "unsupported storage URI"),
    (["work.class_labels=[0, 42]"], "work.class_labels [42] out of range: this model has classes 0..9"),
    (["work.class_labels=null", "work.count=3"], "work.count: preset 'pixel-unet' needs class_labels"),
    (["model.source=/nowhere/model"], "model.source: cannot read the model's config"),
    (["model.compile=fast"], "model.compile must be true or false, got 'fast'"),
    (["ray.actors=[2, 1]"], "ray.actors must be a pool size >= 1 or a range [min, max] with 1 <= min <= max, got [2, 1]"),
    (["ray.actors=[0, 2]"], "ray.actors must be a pool size >= 1 or a range [min, max]"),
    (["ray.actors=[1, 2, 3]"], "ray.actors must be a pool size >= 1 or a range [min, max]"),
    (["ray.actors=two"], "ray.actors must be an integer or a list, got 'two'"),
    (["console.status_every=0"], "console.status_every must be > 0 seconds"),
])
def test_nan_negative_and_unknown_values_are_refused_before_anything_runs(write_config, tmp_path, capsys,
                                                                           changes, message):
    assert message in run_refused([write_config(), *sum((["--set", c] for c in changes), [])], capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("text,message", [
    ("model: [1, 2\n", "is not valid YAML"),
    ("- model\n- work\n", "must hold a mapping of sections, got list"),
    ("model: pixel-unet\n", "model must be a mapping"),
])
def test_malformed_config_files_are_refused(tmp_path, capsys, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert message in run_refused([str(config)], capsys)


def test_unreachable_storage_is_refused_before_sampling(s3, write_config, tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    err = run_refused([write_config(output={"uri": "s3://runs/x"}, storage={"endpoint_url": dead})], capsys)
    assert "storage endpoint did not answer" in err and "check storage.endpoint_url" in err
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("suffix,body,message", [
    (".parquet", b"PAR1 this is not parquet", "is not a readable Parquet file"),
    (".csv", b"prompt\na \xff\xfe cat\n", "is not valid UTF-8 (line 2"),
    (".jsonl", b'{"prompt": 42}\n', "line 1: empty or non-text prompt 42"),
    (".txt", b"   \n\t\n", "holds no prompts"),
])
def test_undecodable_prompt_files_name_the_file_and_line(write_config, sd_folder, tmp_path, capsys,  # noqa: F811
                                                         suffix, body, message):
    prompts = tmp_path / f"prompts{suffix}"
    prompts.write_bytes(body)
    path = write_config(model={"preset": "sd", "source": str(sd_folder)},
                        work={"prompts": str(prompts), "class_labels": None})
    err = run_refused([path], capsys)
    assert message in err and str(prompts) in err
    assert not (tmp_path / "out").exists()


def test_over_long_prompts_are_truncated_and_reported(write_config, sd_folder, tmp_path, capsys):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n" + "a very long dog " * 20 + "\n")
    path = write_config(model={"preset": "sd", "source": str(sd_folder)},
                        work={"prompts": str(prompts), "class_labels": None, "max_prompt_chars": 30})
    assert generate_job.main([path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 samples planned" in out and "(1 prompts truncated)" in out


def test_a_truncated_model_checkpoint_is_refused_before_anything_is_written(write_config, class_unet, tmp_path, capsys):
    broken = truncated_copy(class_unet, tmp_path / "broken_unet")
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    path = write_config(model={"source": str(broken)}, work={"class_labels": [0], "samples_per_label": 2})
    (line,) = run_refused([path], capsys).strip().splitlines()
    assert line.startswith(f"jepa-minority generate: model: could not read unet weights {weights}: truncated")
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlruns").exists()


def test_weights_that_pass_the_check_but_not_the_load_fail_in_one_line_and_nothing_looks_done(
        ray_cluster, write_config, class_unet, tmp_path, capsys):
    """The preflight reads configs and headers only: weights whose shapes do not fit the UNet's config
    fail when the sampler loads them, in one line, with only the manifest written."""
    broken = misfit_copy(class_unet, tmp_path / "misfit_unet")
    path = write_config(model={"source": str(broken)}, work={"class_labels": [0], "samples_per_label": 2},
                        ray={"actors": 1, "cpus_per_actor": 0.5, "batch_size": 2})
    err = run_refused([path], capsys)
    (line,) = [line for line in err.splitlines() if line.startswith("jepa-minority generate: ")]
    assert "the sampler could not load its models" in line and str(broken) in line
    out = tmp_path / "out"
    assert not (out / "_run.json").exists() and not list((out / "data").rglob("*.parquet"))
    assert feather.read_table(out / MANIFEST_FILE)["samples"].to_pylist() == [2]  # the config's own work: a rerun resumes
    assert not (out / FAILURES_DIR).exists()  # nothing was sampled, so nothing is recorded as failed


def cli_refuses(args: list[str], cwd) -> str:
    """Run the real command in a fresh process; it must exit 2 without a traceback, its error the last line."""
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=os.environ | {"PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.fixture
def refuses(tmp_path, monkeypatch, capsys, caplog):
    """``cli_refuses`` in this process, run in ``tmp_path``: the command's main must return 2 without a
    traceback in its stderr or its logs, its error the last line on stderr."""
    monkeypatch.chdir(tmp_path)

    def run(args: list[str]) -> str:
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err + caplog.text
        return err.strip().splitlines()[-1]

    return run


def test_generate_without_a_config_names_the_missing_model_source(tmp_path):
    line = cli_refuses(["generate", "--dry-run"], tmp_path)
    assert line.startswith("jepa-minority generate: model.source: preset 'pixel-unet' has no default weights")
    assert "--set model.source=" in line


def test_submit_checks_the_config_locally_before_the_cluster(tmp_path, refuses):
    (tmp_path / "bad.yaml").write_text("sampling:\n  steps: -3\n")
    dead = f"http://127.0.0.1:{free_port()}"
    line = refuses(["submit", "--address", dead, "--", "generate", "bad.yaml"])
    assert line == ("jepa-minority submit: generate: sampling: steps must be an integer >= 1, got -3 "
                    "(checked locally; nothing was submitted)")
    line = refuses(["submit", "--address", dead, "--", "generate", "bad.yaml", "--dryrun"])
    assert line.endswith("generate rejects its arguments: jepa-minority generate: error: unrecognized arguments: --dryrun")


def test_submit_without_a_cluster_names_the_address(tmp_path, refuses):
    (tmp_path / "good.yaml").write_text("work:\n  count: 2\n")
    dead = f"http://127.0.0.1:{free_port()}"
    line = refuses(["submit", "--address", dead, "--", "generate", "good.yaml"])
    assert line.startswith(f"jepa-minority submit: no Ray cluster answered at {dead}") and "--address" in line


def test_serve_refuses_a_bad_config_before_ray_starts(tmp_path, refuses):
    (tmp_path / "bad.yaml").write_text("sampling:\n  steps: -3\n")
    assert refuses(["serve", "bad.yaml"]) == \
        "jepa-minority serve: sampling: steps must be an integer >= 1, got -3"


def test_serve_refuses_unreadable_model_and_encoder_weights_before_ray_starts(tmp_path, refuses, class_unet, tiny_vit_folder):
    """The replicas would load them; a broken file is found first, in one line naming the key."""
    broken = truncated_copy(class_unet, tmp_path / "broken_unet")
    encoder = {"name": "vit_small_patch14_reg4_dinov2", "weights": str(tiny_vit_folder), "input_size": 28}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": {"source": str(broken)}, "encoder": encoder}))
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    assert refuses(["serve", "model.yaml"]).startswith(
        f"jepa-minority serve: model: could not read unet weights {weights}: truncated")
    (tmp_path / "bad.safetensors").write_bytes(b"not weights")
    encoder["weights"] = str(tmp_path / "bad.safetensors")
    (tmp_path / "encoder.yaml").write_text(yaml.safe_dump({"model": {"source": str(class_unet)}, "encoder": encoder}))
    assert refuses(["serve", "encoder.yaml"]).startswith(
        f"jepa-minority serve: encoder.weights: could not read encoder weights {tmp_path / 'bad.safetensors'}")


def corrupt_run(folder) -> Path:
    """A completed generation run whose second data file is not Parquet; returns that file."""
    fake_generation(folder, [1.0, 2.0, 3.0], files=2)
    (folder / "_run.json").write_text(json.dumps({"config": {"encoder": {}, "sampling": {"method": "jepa"}}}))
    broken = sorted((folder / "data").glob("*.parquet"))[1]
    broken.write_bytes(b"PAR1 cut short by a full disk")
    return broken


@pytest.mark.parametrize("job", ["filter", "evaluate", "generate"])
def test_a_corrupt_data_file_is_named_with_the_fix_before_ray_starts(job, write_config, tmp_path, capsys):
    broken = corrupt_run(tmp_path / "run")
    main, args = {
        "filter": (filter_job.main, ["--input", str(tmp_path / "run"), "--output", str(tmp_path / "cur"), "--keep", "1"]),
        "evaluate": (evaluate_job.main, ["--generated", str(tmp_path / "run")]),
        "generate": (generate_job.main, [write_config(output={"uri": str(tmp_path / "run")})]),
    }[job]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"jepa-minority {job}: {broken} is not a readable Parquet file (Parquet magic bytes not found in "
                    "footer. Either the file is corrupted or this is not a parquet file.): remove it, or restore it "
                    "from a copy")
    assert not (tmp_path / "mlruns").exists() and not [p for p in tmp_path.glob("cur/**/*") if p.is_file()]


def png_claiming(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels (what a decompression bomb looks like unopened)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # and its CRC
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("job", ["evaluate", "check-prior"])
@pytest.mark.parametrize("side", [10_000, 20_000])  # past PIL's warning limit; past its error limit
def test_a_decompression_bomb_in_a_reference_folder_is_named_in_one_line(job, side, tmp_path, capsys):
    fake_generation(tmp_path / "run", [1.0, 2.0, 3.0])
    (tmp_path / "run" / "_run.json").write_text(json.dumps({"config": {"encoder": {}, "sampling": {"method": "jepa"}}}))
    (tmp_path / "real").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / "real" / f"img{i}.png")
    bomb = tmp_path / "real" / "img1.png"
    png_claiming(bomb, side, side)
    main, args = {"evaluate": (evaluate_job.main, ["--generated", str(tmp_path / "run"), "--reference", str(tmp_path / "real")]),
                  "check-prior": (check_prior_job.main, [str(tmp_path / "real"), "--weights", "random"])}[job]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"jepa-minority {job}: reference image {bomb} is too large to decode safely (")
    assert line.endswith(f"shrink it below {Image.MAX_IMAGE_PIXELS} pixels or remove it")


def test_encoder_weights_holding_nan_are_refused_before_anything_is_written(write_config, tmp_path, capsys):
    """Every sample would fail with a NaN score; the preflight reads the tensors and says so instead."""
    state = build_tiny_vit().state_dict()
    state["norm.weight"][0] = float("nan")
    weights = tmp_path / "diverged.safetensors"
    safetensors.torch.save_file(state, weights)
    path = write_config(encoder={"weights": str(weights)})
    (line,) = run_refused([path], capsys).strip().splitlines()
    assert line == (f"jepa-minority generate: encoder.weights: encoder weights {weights} hold NaN or infinite values "
                    "in 1 tensor(s) (norm.weight): the checkpoint is broken; use another one")
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("address", ["127.0.0.1:8265", "ftp://head:8265", "http://", "not a url"])
def test_submit_refuses_an_address_that_is_not_a_url_before_any_check(address, capsys):
    assert submit_job.main(["--address", address, "--", "generate", "missing.yaml"]) == 2
    assert capsys.readouterr().err == (
        f"jepa-minority submit: address {address!r} is not the URL of a Ray cluster's job API: give "
        "http(s)://HOST:PORT (the dashboard's port, 8265 by default) with --address or RAY_ADDRESS\n")


@pytest.fixture(scope="module")
def bad_input_assets(tmp_path_factory) -> Path:
    assets = tmp_path_factory.mktemp("bad_input_assets")
    build_assets(assets)
    return assets


@pytest.mark.parametrize("case", [case for case in CASES if not case.known], ids=lambda case: case.id)
def test_each_case_of_the_bad_input_table_is_refused_in_one_line(case, bad_input_assets, tmp_path, request):
    """Every row of the bad-input table (benchmarks/bad_input_table.py, RELIABILITY.md): the CLI's main refuses it
    with exit 2 and one line of its own that says what is wrong, before Ray starts, writing and changing nothing."""
    endpoint = request.getfixturevalue("s3").endpoint if case.s3 else None
    result = run_case(case, Scene(bad_input_assets, endpoint), tmp_path / "case")
    assert result["outcome"] == "refused", result
    assert case.expect in result["line"], result["line"]
