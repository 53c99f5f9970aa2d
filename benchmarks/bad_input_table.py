"""The bad-input table (RELIABILITY.md, "Bad input"; issue #26): what each job answers to the bad input a new
user gives it, re-recorded by one command.

Each case is a row of ``CASES``: the job, the input in words, the command line (built in a fresh folder by a
``Scene`` of the demo's small models, a finished run in the real schema and a few images) and a fragment of the
one line it must answer with. ``run_case`` calls the CLI's ``main(argv)`` in this process and classifies the answer:

- ``refused``: exit 2, no traceback, one line, the job's own (argparse's error after its usage), nothing written
  or changed, no Ray started;
- ``accepted``: exit 0 (the bad input went through);
- ``traceback``: an exception escaped, or a traceback was printed;
- ``late``: refused, but only after Ray started or something was written;
- ``lost``: a file that was there before is gone or changed;
- ``unclear``: anything else (several lines, another exit code).

Run from the repository root: ``python -m benchmarks.bad_input_table`` writes benchmarks/results/bad_input.json and
prints the markdown table; ``--mutations`` also removes a sample of checks one at a time (a temporary edit of the
product), runs the table's test for the case each guards, and records which test failed.
tests/test_bad_input.py::test_each_case_of_the_bad_input_table_is_refused_in_one_line runs every case but the
``known`` ones.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml
from PIL import Image

from benchmarks.paths import DIGITS_DDPM, DIGITS_ENCODER, RESULTS, ROOT, write_json
from tests.services import free_port

CASE_TIMEOUT_S = 120  # a case still running after this is recorded as hung
LINE_SHOWN = 110  # characters of each answer in the markdown table
TABLE_TEST = "test_each_case_of_the_bad_input_table_is_refused_in_one_line"


class Scene:
    """What the cases point at: shared assets built once (read-only), and a fresh working folder per case."""

    def __init__(self, assets: Path, s3_endpoint: str | None = None):
        self.assets = assets
        self.s3_endpoint = s3_endpoint
        self.work = assets

    def enter(self, work: Path) -> None:
        self.work = work

    def path(self, name: str) -> str:
        return str(self.work / name)

    def asset(self, name: str) -> str:
        return str(self.assets / name)

    def config(self, **sections) -> str:
        """The demo job shrunk to 2 classes x 2 samples, writing under the case's folder, with ``sections`` merged in."""
        config = {
            "model": {"preset": "pixel-unet", "source": str(DIGITS_DDPM)},
            "encoder": {"name": "vit_small_patch14_reg4_dinov2", "weights": str(DIGITS_ENCODER), "input_size": 56},
            "sampling": {"method": "jepa", "steps": 2, "guidance": {"k": 4}},
            "work": {"class_labels": [0, 1], "samples_per_label": 2},
            "output": {"uri": self.path("out")},
            "ray": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 2},
            "tracking": {"tracking_uri": f"sqlite:///{self.work}/mlruns/mlflow.db",
                         "artifact_location": self.path("mlruns/artifacts")},
        }
        for section, values in sections.items():
            config[section] = config.get(section, {}) | values if isinstance(values, dict) else values
        path = self.work / f"config{len(list(self.work.glob('config*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    def text(self, name: str, body: str | bytes) -> str:
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
        return str(path)

    def run(self, name: str = "run", rows: int = 20, **kwargs) -> str:
        """A finished generation run in the real schema: ``rows`` rows over classes 0 and 1 (or ``kwargs``)."""
        from tests.test_curation import fake_generation

        folder = self.work / name
        kwargs.setdefault("labels", [i % 2 for i in range(rows)])
        fake_generation(folder, [float(i) for i in range(rows)], **kwargs)
        (folder / "_run.json").write_text(json.dumps({"status": "complete", "last_run_id": "gen-run", "config": {
            "encoder": {}, "sampling": {"method": "jepa"}}}))
        return str(folder)

    def corrupt_run(self) -> str:
        folder = Path(self.run())
        sorted((folder / "data").glob("*.parquet"))[1].write_bytes(b"PAR1 cut short by a full disk")
        return str(folder)

    def user_files(self, name: str) -> str:
        """A folder holding a user's own data (the filter and refresh must never delete it)."""
        self.text(f"{name}/data/x.parquet", b"the user's own data")
        self.text(f"{name}/notes.txt", "mine")
        return self.path(name)

    def images(self, name: str = "images", count: int = 8) -> str:
        folder = self.work / name
        folder.mkdir()
        for i in range(count):
            Image.new("RGB", (16, 16), (i * 30, 255 - i * 30, i * 7)).save(folder / f"img{i}.png")
        return str(folder)

    def s3(self) -> str:
        return self.s3_endpoint or f"http://127.0.0.1:{free_port()}"


def build_assets(folder: Path) -> None:
    """Broken copies of the demo's models and images no decoder should open, made once for every case."""
    import safetensors.torch
    import torch

    from tests.test_bad_input import png_claiming
    from tests.tiny_diffusion import misfit_copy, truncated_copy

    truncated_copy(DIGITS_DDPM, folder / "ddpm_truncated")
    misfit_copy(DIGITS_DDPM, folder / "ddpm_misfit")
    state = safetensors.torch.load_file(DIGITS_ENCODER / "model.safetensors")
    weights = (DIGITS_ENCODER / "model.safetensors").read_bytes()
    (folder / "encoder_truncated.safetensors").write_bytes(weights[: len(weights) // 2])
    nan = {name: tensor.clone() for name, tensor in state.items()}
    nan["norm.weight"][0] = float("nan")
    safetensors.torch.save_file(nan, folder / "encoder_nan.safetensors")
    shapes = {name: tensor[..., :-1].contiguous() if name == "norm.weight" else tensor for name, tensor in state.items()}
    safetensors.torch.save_file(shapes, folder / "encoder_shapes.safetensors")
    torch.save({"weights": torch.zeros(2)}, folder / "encoder_other.pth")
    (folder / "not_weights.safetensors").write_bytes(b"these are not weights")
    (folder / "empty").mkdir()
    (folder / "text_only").mkdir()
    (folder / "text_only" / "notes.txt").write_text("no images here")
    (folder / "broken_images").mkdir()
    (folder / "broken_images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (folder / "bomb").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(folder / "bomb" / f"img{i}.png")
    png_claiming(folder / "bomb" / "img1.png", 20_000, 20_000)
    (folder / "a_file").write_text("not a folder")


@dataclass(frozen=True)
class Case:
    id: str  # the test id: unique, short
    job: str
    input: str  # what is wrong, in words
    argv: Callable[[Scene], list[str]]  # the command line, its files made in the case's folder
    expect: str  # a fragment of the one line the job must answer with
    s3: bool = False  # needs the S3 test server (tests/services.py)
    known: str = ""  # why the answer is not a one-line refusal before the expensive part; its test is left out


def gen(*changes: str, **sections) -> Callable[[Scene], list[str]]:
    """``generate --dry-run`` on the scene's config with ``sections`` merged in and ``--set`` ``changes``."""
    return lambda s: ["generate", s.config(**sections), "--dry-run", *sum((["--set", c] for c in changes), [])]


def cmd(*args: str | Callable[[Scene], str]) -> Callable[[Scene], list[str]]:
    """The command line ``args``, each a string or a function of the scene that makes a file and returns its path."""
    return lambda s: [arg(s) if callable(arg) else arg for arg in args]


def filt(*args, input=lambda s: s.run(), output=lambda s: s.path("cur")) -> Callable[[Scene], list[str]]:
    return cmd("filter", "--input", input, "--output", output, "--dry-run", *args)


CASES: list[Case] = [
    # The command line itself
    Case("cli-unknown-command", "cli", "a command that does not exist", cmd("genrate"), "unknown command 'genrate'"),
    Case("cli-unknown-flag", "generate", "a flag that does not exist", cmd("generate", "--dryrun"),
         "unrecognized arguments: --dryrun"),
    # generate: the config file
    Case("gen-config-missing", "generate", "a config file that does not exist", cmd("generate", "nowhere.yaml", "--dry-run"),
         "config file not found: nowhere.yaml"),
    Case("gen-config-folder", "generate", "a folder given as the config", cmd("generate", lambda s: s.asset("empty"), "--dry-run"),
         "config file not found: "),
    Case("gen-yaml-syntax", "generate", "YAML that does not parse", cmd("generate", lambda s: s.text("bad.yaml", "model: [1, 2\n")),
         "is not valid YAML"),
    Case("gen-yaml-list", "generate", "a YAML list, not a mapping", cmd("generate", lambda s: s.text("bad.yaml", "- model\n")),
         "must hold a mapping of sections, got list"),
    Case("gen-yaml-section", "generate", "a section that is not a mapping",
         cmd("generate", lambda s: s.text("bad.yaml", "model: pixel-unet\n")), "model must be a mapping"),
    Case("gen-yaml-empty", "generate", "an empty config file (no model weights named)",
         cmd("generate", lambda s: s.text("bad.yaml", ""), "--dry-run"), "has no default weights"),
    Case("gen-yaml-binary", "generate", "a binary file given as the config",
         cmd("generate", lambda s: s.text("bad.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"), "--dry-run"), "is not UTF-8 text (byte 0): give a YAML file"),
    Case("gen-unknown-section", "generate", "an unknown section (typo)", gen("sampler.steps=3"), "unknown key sampler"),
    Case("gen-unknown-key", "generate", "an unknown key (typo)", gen("sampling.guidance.etaa=1"),
         "unknown key sampling.guidance.etaa"),
    Case("gen-unknown-key-file", "generate", "an unknown key in the file", gen(work={"clas_labels": [1]}),
         "unknown key work.clas_labels"),
    Case("gen-set-no-equals", "generate", "--set without =", gen("sampling.steps"), "--set expects key=value"),
    Case("gen-set-empty-key", "generate", "--set with an empty key", gen("=3"), "--set expects key=value (e.g. sampling.steps=20), got '=3'"),
    # generate: values
    Case("gen-steps-negative", "generate", "sampling.steps -3", gen("sampling.steps=-3"), "steps must be an integer >= 1, got -3"),
    Case("gen-steps-zero", "generate", "sampling.steps 0", gen("sampling.steps=0"), "steps must be an integer >= 1, got 0"),
    Case("gen-steps-text", "generate", "sampling.steps a word", gen("sampling.steps=many"), "sampling.steps must be an integer"),
    Case("gen-steps-float", "generate", "sampling.steps 2.5", gen("sampling.steps=2.5"), "sampling.steps must be an integer"),
    Case("gen-eta-nan", "generate", "guidance.eta NaN", gen("sampling.guidance.eta=.nan"),
         "sampling.guidance.eta must be a finite number, got nan"),
    Case("gen-eta-negative", "generate", "guidance.eta -0.5", gen("sampling.guidance.eta=-0.5"),
         "guidance.eta must be a finite number >= 0, got -0.5"),
    Case("gen-eta-text", "generate", "guidance.eta a word", gen("sampling.guidance.eta=strong"), "guidance.eta must be a finite number, got 'strong'"),
    Case("gen-cfg-inf", "generate", "sampling.cfg_scale inf", gen("sampling.cfg_scale=.inf"),
         "sampling.cfg_scale must be a finite number, got inf"),
    Case("gen-ddim-eta", "generate", "sampling.ddim_eta 1.5", gen("sampling.ddim_eta=1.5"), "ddim_eta must be in [0, 1]"),
    Case("gen-tau", "generate", "guidance.tau 1.5", gen("sampling.guidance.tau=1.5"), "tau must be in [0, 1]"),
    Case("gen-k-zero", "generate", "guidance.k 0", gen("sampling.guidance.k=0"), "k must be an integer >= 1, got 0"),
    Case("gen-k-too-big", "generate", "guidance.k above the encoder's embedding size", gen("sampling.guidance.k=5000"),
         "has D = 64 embedding dimensions"),
    Case("gen-oversample", "generate", "guidance.oversample -1", gen("sampling.guidance.oversample=-1"), "oversample must be an integer >= 0, got -1"),
    Case("gen-power-iters", "generate", "guidance.power_iters -1", gen("sampling.guidance.power_iters=-1"), "power_iters must be an integer >= 0, got -1"),
    Case("gen-interval", "generate", "guidance.interval 0", gen("sampling.guidance.interval=0"), "guidance.interval must be an integer >= 1, got 0"),
    Case("gen-method", "generate", "an unknown sampling.method", gen("sampling.method=magic"), "method must be one of unguided, bns, jepa"),
    Case("gen-sampler", "generate", "an unknown sampling.sampler", gen("sampling.sampler=euler9"), "sampler must be one of ddpm, ddim, got 'euler9'"),
    Case("gen-spacing", "generate", "an unknown timestep_spacing", gen("sampling.timestep_spacing=odd"), "timestep_spacing must be one of"),
    Case("gen-gradient", "generate", "an unknown guidance.gradient", gen("sampling.guidance.gradient=magic"),
         "guidance.gradient must be one of full, tweedie"),
    Case("gen-samples-zero", "generate", "work.samples_per_label 0", gen("work.samples_per_label=0"),
         "work.samples_per_label must be >= 1, got 0"),
    Case("gen-label-negative", "generate", "a negative class label", gen("work.class_labels=[-1, 1]"),
         "work.class_labels must be >= 0"),
    Case("gen-label-range", "generate", "a class label the model lacks", gen("work.class_labels=[0, 42]"),
         "work.class_labels [42] out of range: this model has classes 0..9"),
    Case("gen-label-text", "generate", "class labels as a word", gen("work.class_labels=three"), "work.class_labels must be a list, got 'three'"),
    Case("gen-label-empty", "generate", "an empty class label list", gen("work.class_labels=[]"), "work.class_labels is empty"),
    Case("gen-seed-float", "generate", "work.base_seed 1.5", gen("work.base_seed=1.5"), "work.base_seed must be an integer"),
    Case("gen-count-no-labels", "generate", "work.count on a class model without labels",
         gen("work.class_labels=null", "work.count=3"), "needs class_labels"),
    Case("gen-prompts-class-model", "generate", "a prompt file for a class model",
         lambda s: ["generate", s.config(work={"prompts": s.text("p.txt", "a cat\n"), "class_labels": None}), "--dry-run"],
         "is not a text-to-image"),
    Case("gen-prompts-missing", "generate", "a prompt file that does not exist (text model)",
         gen("model.preset=sd", "work.prompts=/nowhere/prompts.txt", "work.class_labels=null"),
         "file not found: /nowhere/prompts.txt"),
    Case("gen-actors-zero", "generate", "ray.actors 0", gen("ray.actors=0"), "ray.actors must be a pool size >= 1"),
    Case("gen-actors-range", "generate", "ray.actors [2, 1]", gen("ray.actors=[2, 1]"), "got [2, 1]"),
    Case("gen-actors-text", "generate", "ray.actors a word", gen("ray.actors=two"), "ray.actors must be an integer or a list"),
    Case("gen-cpus-negative", "generate", "ray.cpus_per_actor -1", gen("ray.cpus_per_actor=-1"),
         "ray.cpus_per_actor and ray.gpus_per_actor must be >= 0"),
    Case("gen-batch-zero", "generate", "ray.batch_size 0", gen("ray.batch_size=0"), "ray.batch_size must be >= 1, got 0"),
    Case("gen-failure-nan", "generate", "output.max_failure_fraction NaN", gen("output.max_failure_fraction=.nan"),
         "output.max_failure_fraction must be a finite number, got nan"),
    Case("gen-failure-range", "generate", "output.max_failure_fraction 2", gen("output.max_failure_fraction=2"),
         "output.max_failure_fraction must be in [0, 1], got 2.0"),
    Case("gen-rows-per-file", "generate", "output.max_rows_per_file 0", gen("output.max_rows_per_file=0"), "output.max_rows_per_file and output.row_group_size must be >= 1"),
    Case("gen-row-group", "generate", "output.row_group_size 0", gen("output.row_group_size=0"), "output.max_rows_per_file and output.row_group_size must be >= 1"),
    Case("gen-input-size", "generate", "encoder.input_size not a multiple of 14", gen("encoder.input_size=30"),
         "encoder.input_size must be a positive multiple of 14, got 30"),
    Case("gen-encoder-name", "generate", "an unknown encoder name", gen("encoder.name=dino"), "encoder.name: unknown encoder 'dino'"),
    Case("gen-dtype", "generate", "model.dtype fp8", gen("model.dtype=fp8"), "model.dtype must be one of"),
    Case("gen-preset", "generate", "an unknown model.preset", gen("model.preset=sdxl9"), "unknown preset 'sdxl9'"),
    Case("gen-compile", "generate", "model.compile a word", gen("model.compile=fast"), "model.compile must be true or false"),
    Case("gen-status-every", "generate", "console.status_every 0", gen("console.status_every=0"), "console.status_every must be > 0"),
    Case("gen-status-flag", "generate", "--status-every -1",
         lambda s: ["generate", s.config(), "--dry-run", "--status-every", "-1"], "status_every must be > 0"),
    # generate: model and encoder files
    Case("gen-model-missing", "generate", "model.source a folder that does not exist", gen("model.source=/nowhere/model"),
         "model.source: cannot read the model's config"),
    Case("gen-model-empty", "generate", "model.source an empty folder", lambda s: ["generate", s.config(
        model={"source": s.asset("empty")}), "--dry-run"], "model.source: cannot read the model's config"),
    Case("gen-model-file", "generate", "model.source a file", lambda s: ["generate", s.config(
        model={"source": s.asset("a_file")}), "--dry-run"], "model.source: cannot read the model's config"),
    Case("gen-model-truncated", "generate", "truncated UNet weights (a broken download)", lambda s: ["generate", s.config(
        model={"source": s.asset("ddpm_truncated")}), "--dry-run"], "could not read unet weights"),
    Case("gen-model-encoder-folder", "generate", "the encoder's folder given as the model", lambda s: ["generate", s.config(
        model={"source": str(DIGITS_ENCODER)}), "--dry-run"], "model.source: cannot read the model's config"),
    Case("gen-encoder-missing", "generate", "encoder.weights a file that does not exist", gen("encoder.weights=/nowhere/w.safetensors"),
         "encoder.weights: encoder weights not found"),
    Case("gen-lpips-missing", "generate", "sgms.lpips_weights a folder that does not exist",
         gen("sampling.method=sgms", "sampling.sgms.distance=lpips", "sampling.sgms.lpips_weights=/nowhere/lpips"),
         "sampling.sgms.lpips_weights: LPIPS weights folder not found: /nowhere/lpips"),
    Case("gen-encoder-not-weights", "generate", "encoder.weights a file that is not weights", lambda s: ["generate", s.config(
        encoder={"weights": s.asset("not_weights.safetensors")}), "--dry-run"], "could not read encoder weights"),
    Case("gen-encoder-truncated", "generate", "truncated encoder safetensors", lambda s: ["generate", s.config(
        encoder={"weights": s.asset("encoder_truncated.safetensors")}), "--dry-run"], "could not read encoder weights"),
    Case("gen-encoder-nan", "generate", "encoder weights holding NaN", lambda s: ["generate", s.config(
        encoder={"weights": s.asset("encoder_nan.safetensors")}), "--dry-run"], "hold NaN or infinite values"),
    Case("gen-encoder-shapes", "generate", "encoder weights of the wrong shapes", lambda s: ["generate", s.config(
        encoder={"weights": s.asset("encoder_shapes.safetensors")}), "--dry-run"], "encoder.weights",
         known="the preflight reads headers and values, not shapes against the architecture (timm builds it): the run "
               "fails in one line when the sampler loads them, after Ray starts"),
    Case("gen-encoder-model-folder", "generate", "the diffusion model's folder given as encoder.weights", lambda s: [
        "generate", s.config(encoder={"weights": str(DIGITS_DDPM)}), "--dry-run"], "has no config.json (timm's layout"),
    Case("gen-encoder-empty", "generate", "encoder.weights an empty folder", lambda s: ["generate", s.config(
        encoder={"weights": s.asset("empty")}), "--dry-run"], "has no config.json (timm's layout"),
    # generate: output, storage, tracking
    Case("gen-output-scheme", "generate", "an unsupported output URI", gen("output.uri=ftp://host/x"), "unsupported storage URI"),
    Case("gen-output-file", "generate", "output.uri a file", lambda s: ["generate", s.config(
        output={"uri": s.text("out", "a file")}), "--dry-run"], "is a file, not a folder: choose a folder for the output"),
    Case("gen-output-under-file", "generate", "output.uri under a file (cannot be made)", lambda s: ["generate", s.config(
        output={"uri": s.text("f", "a file") + "/out"}), "--dry-run"], "is a file, not a folder"),
    Case("gen-output-other-run", "generate", "output.uri holding another config's run", lambda s: [
        "generate", s.config(output={"uri": s.run("out")}), "--dry-run"], "holds files this run did not write (_failures, _run.json, data)"),
    Case("gen-output-old-layout", "generate", "output.uri in the old layout (manifest.parquet)", lambda s: [
        "generate", s.config(output={"uri": str(Path(s.text("out/manifest.parquet", "old")).parent)}), "--dry-run"],
         "was written in the old layout"),
    Case("gen-output-corrupt", "generate", "output.uri holding a corrupt data file", lambda s: [
        "generate", s.config(output={"uri": s.corrupt_run()})], "is not a readable Parquet file"),
    Case("gen-output-flag-scheme", "generate", "--output with an unsupported scheme", lambda s: [
        "generate", s.config(), "--dry-run", "--output", "gs://bucket/x"], "unsupported storage URI"),
    Case("gen-s3-unreachable", "generate", "an S3 endpoint nothing listens on", lambda s: [
        "generate", s.config(output={"uri": "s3://runs/x"}, storage={"endpoint_url": f"http://127.0.0.1:{free_port()}"})],
         "storage endpoint did not answer"),
    Case("gen-s3-missing-bucket", "generate", "an S3 bucket that does not exist", lambda s: [
        "generate", s.config(output={"uri": "s3://no-such-bucket/x"}, storage={"endpoint_url": s.s3()})],
         "bucket 'no-such-bucket'", s3=True),
    Case("gen-s3-endpoint-secret", "generate", "credentials inside storage.endpoint_url", gen(
        "storage.endpoint_url=http://user:secret@127.0.0.1:9000"), "storage.endpoint_url carries credentials"),
    Case("gen-s3-endpoint-scheme", "generate", "storage.endpoint_url without a scheme", gen(
        "storage.endpoint_url=127.0.0.1:9000"), "is not an http(s) URL"),
    Case("gen-tracking-scheme", "generate", "an unknown tracking URI scheme", gen("tracking.tracking_uri=mysql-ish://x"),
         "mysql-ish:// is not an MLflow tracking store"),
    Case("gen-tracking-secret", "generate", "credentials inside tracking.tracking_uri", gen(
        "tracking.tracking_uri=http://user:secret@127.0.0.1:5000"), "tracking.tracking_uri carries credentials"),
    # filter
    Case("filter-input-missing", "filter", "--input a folder that does not exist", filt("--keep", "1", input=lambda s: s.path("nope")),
         "is not a completed generation run (no _run.json)"),
    Case("filter-input-not-run", "filter", "--input a folder that is not a run",
         filt("--keep", "1", input=lambda s: s.user_files("mine")), "is not a completed generation run (no _run.json)"),
    Case("filter-input-unfinished", "filter", "--input a run without _run.json (unfinished)",
         filt("--keep", "1", input=lambda s: os.remove(s.run() + "/_run.json") or s.path("run")), "is not a completed generation run (no _run.json)"),
    Case("filter-input-corrupt", "filter", "--input holding a corrupt Parquet file",
         filt("--keep", "1", input=lambda s: s.corrupt_run()), "is not a readable Parquet file"),
    Case("filter-input-empty-folder", "filter", "--input an empty folder", filt("--keep", "1", input=lambda s: s.asset("empty")),
         "is not a completed generation run (no _run.json)"),
    Case("filter-no-keep", "filter", "neither --keep nor --keep-fraction", filt(), "one of the arguments --keep-fraction --keep is required"),
    Case("filter-both-keeps", "filter", "--keep and --keep-fraction together", filt("--keep", "1", "--keep-fraction", "0.5"),
         "not allowed with argument"),
    Case("filter-fraction-zero", "filter", "--keep-fraction 0", filt("--keep-fraction", "0"), "keep_fraction must be in (0, 1], got 0.0"),
    Case("filter-fraction-big", "filter", "--keep-fraction 1.5", filt("--keep-fraction", "1.5"), "keep_fraction must be in (0, 1], got 1.5"),
    Case("filter-fraction-nan", "filter", "--keep-fraction nan", filt("--keep-fraction", "nan"), "keep_fraction must be a finite number, got nan"),
    Case("filter-fraction-text", "filter", "--keep-fraction a word", filt("--keep-fraction", "half"), "invalid float value: 'half'"),
    Case("filter-keep-zero", "filter", "--keep 0", filt("--keep", "0"), "keep must be >= 1, got 0"),
    Case("filter-keep-negative", "filter", "--keep -3", filt("--keep", "-3"), "keep must be >= 1, got -3"),
    Case("filter-per-bad", "filter", "--per a column that is not a group", filt("--keep", "1", "--per", "seed"), "invalid choice: 'seed'"),
    Case("filter-per-prompt", "filter", "--per prompt on a class run", filt("--keep", "1", "--per", "prompt"), "have no prompt: curate them without --per"),
    Case("filter-max-score-nan", "filter", "--max-score nan", filt("--keep", "1", "--max-score", "nan"), "max_score must be a finite number, got nan"),
    Case("filter-output-is-input", "filter", "--output the input itself", filt("--keep", "1", output=lambda s: s.path("run")),
         "output must differ from input"),
    Case("filter-output-inside-input", "filter", "--output inside the input",
         filt("--keep", "1", output=lambda s: s.path("run/cur")), "lies inside"),
    Case("filter-input-inside-output", "filter", "--input inside the output",
         filt("--keep", "1", input=lambda s: s.run("cur/run"), output=lambda s: s.path("cur")), "lies inside"),
    Case("filter-output-holds-run", "filter", "--output holding another run", filt("--keep", "1", output=lambda s: s.run("other")),
         "holds a generation run (_run.json)"),
    Case("filter-output-user-files", "filter", "--output holding the user's files",
         filt("--keep", "1", output=lambda s: s.user_files("mine")), "holds files this curation did not write (notes.txt)"),
    Case("filter-output-file", "filter", "--output a file", filt("--keep", "1", output=lambda s: s.text("cur", "a file")), "is a file, not a folder: choose a folder for the output"),
    Case("filter-empty-groups", "filter", "a fraction whose quota rounds to 0 rows per class", filt("--keep-fraction", "0.05",
         "--per", "class_label"), "would keep nothing (keep_fraction 0.05"),
    Case("filter-gate-missing", "filter", "--gate-reference a folder that does not exist",
         filt("--keep", "1", "--gate-reference", "/nowhere/real"), "gate reference /nowhere/real not found"),
    Case("filter-gate-empty", "filter", "--gate-reference an empty folder",
         filt("--keep", "1", "--gate-reference", lambda s: s.asset("empty")), "holds no Parquet files and no .png/.jpg/.jpeg images: give"),
    Case("filter-gate-space", "filter", "--gate-space not a pixel space",
         filt("--keep", "1", "--gate-reference", lambda s: s.images(), "--gate-space", "clip"), "the gate measures in pixel spaces only, got 'clip'"),
    Case("filter-gate-k", "filter", "--gate-k as many as the reference's images",
         filt("--keep", "1", "--gate-reference", lambda s: s.images(count=3), "--gate-k", "5"), "k-NN balls with --gate-k 5 need more than 5"),
    Case("filter-s3-unreachable", "filter", "an s3:// input with an endpoint nothing listens on",
         filt("--keep", "1", "--endpoint-url", lambda s: f"http://127.0.0.1:{free_port()}", input=lambda s: "s3://runs/x"),
         "the storage endpoint did not answer"),
    Case("filter-s3-missing-bucket", "filter", "an s3:// input in a bucket that does not exist",
         filt("--keep", "1", "--endpoint-url", lambda s: s.s3(), input=lambda s: "s3://no-such-bucket/x"),
         "s3://no-such-bucket/x is not a completed generation run", s3=True),
    Case("filter-tracking-secret", "filter", "credentials inside --tracking-uri",
         filt("--keep", "1", "--tracking-uri", "http://user:secret@127.0.0.1:5000"), "tracking.tracking_uri carries credentials"),
    Case("filter-dedup-zero", "filter", "--dedup-threshold 0", filt("--keep", "1", "--dedup-threshold", "0"),
         "dedup_threshold is a cosine similarity in (0, 1] (e.g. 0.95), got 0.0"),
    Case("filter-dedup-big", "filter", "--dedup-threshold 1.5", filt("--keep", "1", "--dedup-threshold", "1.5"),
         "dedup_threshold is a cosine similarity in (0, 1] (e.g. 0.95), got 1.5"),
    Case("filter-select-bad", "filter", "--select a rule that does not exist", filt("--keep", "1", "--select", "top"),
         "invalid choice: 'top'"),
    Case("filter-candidates-zero", "filter", "--candidates 0", filt("--keep", "1", "--select", "diverse-rarest", "--candidates", "0"),
         "candidates must be >= 1"),
    Case("filter-similarity-space", "filter", "--similarity-space neither embedding nor pixels",
         filt("--keep", "1", "--dedup-threshold", "0.9", "--similarity-space", "clip"),
         "similarity_space must be embedding or a pixel space"),
    Case("filter-dominant-share", "filter", "--dominant-share 0", filt("--keep", "1", "--dominant-share", "0"),
         "dominant_share must be in (0, 1], got 0.0"),
    # export
    Case("export-input-unfinished", "export", "--input a folder that is not a finished run or curated set",
         cmd("export", "--input", lambda s: s.user_files("mine"), "--output", lambda s: s.path("wds")),
         "is not a complete generation run or curated set"),
    Case("export-shard-size-zero", "export", "--shard-size 0",
         cmd("export", "--input", lambda s: s.run(), "--output", lambda s: s.path("wds"), "--shard-size", "0"),
         "shard_size must be >= 1, got 0"),
    Case("export-output-inside-input", "export", "--output inside the input",
         cmd("export", "--input", lambda s: s.run(), "--output", lambda s: s.path("run/wds")), "lies inside"),
    # refresh
    Case("refresh-config-missing", "refresh", "a config file that does not exist",
         cmd("refresh", "nowhere.yaml", "--root", lambda s: s.path("root"), "--dry-run"), "config file not found: nowhere.yaml"),
    Case("refresh-bad-value", "refresh", "a bad config value",
         lambda s: ["refresh", s.config(), "--root", s.path("root"), "--dry-run", "--set", "sampling.steps=-1"], "steps must be an integer >= 1, got -1"),
    Case("refresh-root-file", "refresh", "--root a file",
         lambda s: ["refresh", s.config(), "--root", s.text("root", "a file"), "--dry-run"], "Not a directory"),
    Case("refresh-root-run", "refresh", "--root holding a run",
         lambda s: ["refresh", s.config(), "--root", s.run("root"), "--dry-run"], "holds a generation run (_run.json), which is never written into; choose another --root"),
    Case("refresh-root-user-files", "refresh", "--root holding the user's files",
         lambda s: ["refresh", s.config(), "--root", s.user_files("root"), "--dry-run"], "holds files a refresh did not write (data, notes.txt)"),
    Case("refresh-version-escape", "refresh", "--version naming a folder outside the root",
         lambda s: ["refresh", s.config(), "--root", s.path("root"), "--version", "../x", "--dry-run"], "version '../x' must be a plain folder name"),
    Case("refresh-version-slash", "refresh", "--version with a slash",
         lambda s: ["refresh", s.config(), "--root", s.path("root"), "--version", "a/b", "--dry-run"], "version 'a/b' must be a plain folder name"),
    Case("refresh-keep-versions", "refresh", "--keep-versions 0",
         lambda s: ["refresh", s.config(), "--root", s.path("root"), "--keep-versions", "0", "--dry-run"], "keep_versions must be >= 1, got 0"),
    Case("refresh-fraction-zero", "refresh", "--keep-fraction 0",
         lambda s: ["refresh", s.config(), "--root", s.path("root"), "--keep-fraction", "0", "--dry-run"], "keep_fraction must be in (0, 1], got 0.0"),
    Case("refresh-fraction-big", "refresh", "--keep-fraction 2",
         lambda s: ["refresh", s.config(), "--root", s.path("root"), "--keep-fraction", "2", "--dry-run"], "keep_fraction must be in (0, 1], got 2.0"),
    Case("refresh-empty-groups", "refresh", "the default 0.1 of 2 samples per class keeps nothing",
         lambda s: ["refresh", s.config(), "--root", s.path("root"), "--per", "class_label", "--dry-run"], "would keep nothing (keep_fraction 0.1"),
    Case("refresh-root-scheme", "refresh", "--root with an unsupported scheme",
         lambda s: ["refresh", s.config(), "--root", "ftp://host/root", "--dry-run"], "unsupported storage URI"),
    # demo
    Case("demo-config-missing", "demo", "--config a file that does not exist",
         lambda s: ["demo", "--config", "nowhere.yaml", "--root", s.path("demo"), "--dry-run"], "config file not found: nowhere.yaml"),
    Case("demo-bad-set", "demo", "--set an unknown key",
         lambda s: ["demo", "--config", s.config(), "--root", s.path("demo"), "--dry-run", "--set", "work.sample_per_label=2"], "unknown key work.sample_per_label"),
    Case("demo-bad-value", "demo", "--set a bad value",
         lambda s: ["demo", "--config", s.config(), "--root", s.path("demo"), "--dry-run", "--set", "sampling.steps=0"], "steps must be an integer >= 1, got 0"),
    Case("demo-root-run", "demo", "--root holding a run", lambda s: ["demo", "--config", s.config(), "--root", s.run("demo"), "--dry-run"], "holds a generation run (_run.json), which is never written into; delete"),
    Case("demo-root-user-files", "demo", "--root holding the user's files",
         lambda s: ["demo", "--config", s.config(), "--root", s.user_files("demo"), "--dry-run"], "holds files the demo did not write (data, notes.txt)"),
    Case("demo-root-file", "demo", "--root a file", lambda s: ["demo", "--config", s.config(), "--root", s.text("demo", "a file"), "--dry-run"], "Not a directory"),
    Case("demo-fraction-zero", "demo", "--keep-fraction 0",
         lambda s: ["demo", "--config", s.config(), "--root", s.path("demo"), "--keep-fraction", "0", "--dry-run"], "keep_fraction must be in (0, 1], got 0.0"),
    Case("demo-fraction-big", "demo", "--keep-fraction 1.5",
         lambda s: ["demo", "--config", s.config(), "--root", s.path("demo"), "--keep-fraction", "1.5", "--dry-run"], "keep_fraction must be in (0, 1], got 1.5"),
    Case("demo-empty-groups", "demo", "a fraction whose quota rounds to 0 per class",
         lambda s: ["demo", "--config", s.config(), "--root", s.path("demo"), "--keep-fraction", "0.01", "--dry-run"], "would keep nothing (keep_fraction 0.01"),
    # score
    Case("score-path-missing", "score", "an image path that does not exist", cmd("score", "/nowhere/img.png", "--weights", "random"),
         "/nowhere/img.png"),
    Case("score-folder-empty", "score", "a folder without images", cmd("score", lambda s: s.asset("text_only"), "--weights", "random"),
         "holds no .png/.jpg/.jpeg files"),
    Case("score-no-weights", "score", "no --weights", cmd("score", lambda s: s.images()), "no encoder weights given: pass --weights"),
    Case("score-weights-missing", "score", "--weights a file that does not exist",
         cmd("score", lambda s: s.images(), "--weights", "/nowhere/w.safetensors"), "/nowhere/w.safetensors"),
    Case("score-weights-not-weights", "score", "--weights a file that is not weights",
         cmd("score", lambda s: s.images(), "--weights", lambda s: s.asset("not_weights.safetensors")), "(truncated, corrupted or not safetensors?)"),
    Case("score-weights-truncated", "score", "--weights truncated safetensors",
         cmd("score", lambda s: s.images(), "--weights", lambda s: s.asset("encoder_truncated.safetensors")), "truncated or corrupted (its header describes"),
    Case("score-weights-nan", "score", "--weights holding NaN",
         cmd("score", lambda s: s.images(), "--weights", lambda s: s.asset("encoder_nan.safetensors"), "--input-size", "56"),
         "hold NaN or infinite values in 1 tensor(s) (norm.weight)"),
    Case("score-weights-shapes", "score", "--weights of the wrong shapes",
         cmd("score", lambda s: s.images(), "--weights", lambda s: s.asset("encoder_shapes.safetensors"), "--input-size", "56"),
         "do not fit the encoder architecture"),
    Case("score-weights-pickle", "score", "--weights a .pth of another model",
         cmd("score", lambda s: s.images(), "--weights", lambda s: s.asset("encoder_other.pth"), "--input-size", "56"),
         "do not fit the encoder architecture"),
    Case("score-weights-ddpm", "score", "--weights the diffusion model's folder",
         cmd("score", lambda s: s.images(), "--weights", str(DIGITS_DDPM)), "has no config.json (timm's layout"),
    Case("score-encoder", "score", "an unknown --encoder", cmd("score", lambda s: s.images(), "--weights", "random", "--encoder", "dino"),
         "unknown encoder 'dino'"),
    Case("score-method", "score", "an unknown --method", cmd("score", lambda s: s.images(), "--weights", "random", "--method", "fast"),
         "method must be one of exact, topk, got 'fast'"),
    Case("score-k-zero", "score", "--k 0", cmd("score", lambda s: s.images(), "--weights", "random", "--method", "topk", "--k", "0"),
         "k must be an integer >= 1, got 0"),
    Case("score-k-big", "score", "--k above the embedding size",
         cmd("score", lambda s: s.images(), "--weights", str(DIGITS_ENCODER), "--method", "topk", "--k", "5000"), "k + oversample = 5000 + 2 exceeds min(D, N)"),
    Case("score-input-size", "score", "--input-size not a multiple of 14",
         cmd("score", lambda s: s.images(), "--weights", "random", "--input-size", "30"), "input_size must be a positive multiple of the patch size 14, got 30"),
    Case("score-batch-zero", "score", "--batch-size 0", cmd("score", lambda s: s.images(), "--weights", "random", "--batch-size", "0"),
         "batch_size must be >= 1, got 0"),
    Case("score-max-pixels", "score", "--max-pixels 0", cmd("score", lambda s: s.images(), "--weights", "random", "--max-pixels", "0"),
         "max_pixels must be >= 1, got 0"),
    Case("score-device", "score", "an unknown --device", cmd("score", lambda s: s.images(), "--weights", "random", "--device", "tpu9"),
         "device 'tpu9' is not a torch device"),
    Case("score-encoder-output", "score", "an unknown --encoder-output",
         cmd("score", lambda s: s.images(), "--weights", "random", "--encoder-output", "mean"), "output must be one of cls, pool"),
    Case("score-output-under-file", "score", "--output under a file (unwritable)",
         cmd("score", lambda s: s.images(), "--weights", "random", "--output", lambda s: s.text("f", "x") + "/out.csv"), "is a file, not a folder"),
    Case("score-output-suffix", "score", "--output neither .csv nor .parquet",
         cmd("score", lambda s: s.images(), "--weights", "random", "--output", lambda s: s.path("out.txt")), "output must end in .csv or .parquet"),
    Case("score-broken-images", "score", "only images that do not decode",
         cmd("score", lambda s: s.asset("broken_images"), "--weights", "random"), "could be scored",
         known="by design (score --help): a line per skipped file, then this one, after the encoder loads"),
    # evaluate
    Case("eval-generated-missing", "evaluate", "--generated a folder that does not exist",
         cmd("evaluate", "--generated", lambda s: s.path("nope")), "is not a completed generation run (no _run.json)"),
    Case("eval-generated-not-run", "evaluate", "--generated a folder that is not a run",
         cmd("evaluate", "--generated", lambda s: s.user_files("mine")), "is not a completed generation run (no _run.json)"),
    Case("eval-generated-corrupt", "evaluate", "--generated holding a corrupt Parquet file",
         cmd("evaluate", "--generated", lambda s: s.corrupt_run()), "is not a readable Parquet file"),
    Case("eval-reference-missing", "evaluate", "--reference a folder that does not exist",
         cmd("evaluate", "--generated", lambda s: s.run(), "--reference", "/nowhere/real"), "reference /nowhere/real not found"),
    Case("eval-reference-empty", "evaluate", "--reference an empty folder",
         cmd("evaluate", "--generated", lambda s: s.run(), "--reference", lambda s: s.asset("empty")), "an empty reference cannot be compared against"),
    Case("eval-reference-bomb", "evaluate", "a decompression bomb in --reference",
         cmd("evaluate", "--generated", lambda s: s.run(), "--reference", lambda s: s.asset("bomb")), "too large to decode safely"),
    Case("eval-nearest-k", "evaluate", "--nearest-k 0", cmd("evaluate", "--generated", lambda s: s.run(), "--nearest-k", "0"),
         "nearest_k must be >= 1, got 0"),
    Case("eval-rarity-k", "evaluate", "--rarity-k 0", cmd("evaluate", "--generated", lambda s: s.run(), "--rarity-k", "0"), "rarity_k must be >= 1, got 0"),
    Case("eval-max-samples", "evaluate", "--max-samples 0",
         cmd("evaluate", "--generated", lambda s: s.run(), "--max-samples", "0"), "max_samples must exceed nearest_k"),
    Case("eval-features", "evaluate", "an unknown --rarity-features",
         cmd("evaluate", "--generated", lambda s: s.run(), "--reference", lambda s: s.images(), "--rarity-features", "vgg"),
         "unknown feature space 'vgg'"),
    Case("eval-baseline", "evaluate", "--baseline not among --generated",
         cmd("evaluate", "--generated", lambda s: s.run(), "--baseline", "/elsewhere"), "--baseline /elsewhere is not one of the generated runs"),
    Case("eval-quantile", "evaluate", "--minority-quantile 1.5",
         cmd("evaluate", "--generated", lambda s: s.run(), "--minority-quantile", "1.5"), "minority_quantile must lie strictly between 0 and 1, got 1.5"),
    Case("eval-inception-missing", "evaluate", "--inception-weights a file that does not exist",
         cmd("evaluate", "--generated", lambda s: s.run(), "--reference", lambda s: s.images(), "--inception-weights",
             "/nowhere/inception.pth"), "Inception weights not found: /nowhere/inception.pth"),
    Case("eval-clip-no-arch", "evaluate", "--clip-weights without --clip-arch",
         cmd("evaluate", "--generated", lambda s: s.run(), "--clip-weights", lambda s: s.asset("not_weights.safetensors")), "CLIP score needs both --clip-weights and --clip-arch"),
    Case("eval-pickscore-missing", "evaluate", "--pickscore-weights a folder that does not exist",
         cmd("evaluate", "--generated", lambda s: s.run(), "--pickscore-weights", "/nowhere/pickscore"),
         "PickScore weights not found: /nowhere/pickscore is not a folder"),
    Case("eval-actors-zero", "evaluate", "--actors 0", cmd("evaluate", "--generated", lambda s: s.run(), "--actors", "0"), "batch_size and actors must be >= 1"),
    Case("eval-output-file", "evaluate", "--output a file",
         cmd("evaluate", "--generated", lambda s: s.run(), "--output", lambda s: s.text("ev", "a file")), "is a file, not a folder: choose a folder for the output"),
    # check-prior
    Case("prior-reference-missing", "check-prior", "a reference that does not exist", cmd("check-prior", "/nowhere/real",
         "--weights", "random"), "reference /nowhere/real not found"),
    Case("prior-reference-empty", "check-prior", "an empty reference folder",
         cmd("check-prior", lambda s: s.asset("empty"), "--weights", "random"), "an empty reference cannot be compared against"),
    Case("prior-reference-bomb", "check-prior", "a decompression bomb in the reference",
         cmd("check-prior", lambda s: s.asset("bomb"), "--weights", "random"), "too large to decode safely"),
    Case("prior-weights-missing", "check-prior", "--weights a file that does not exist",
         cmd("check-prior", lambda s: s.images(), "--weights", "/nowhere/w.safetensors"), "encoder weights not found: /nowhere/w.safetensors"),
    Case("prior-weights-nan", "check-prior", "--weights holding NaN",
         cmd("check-prior", lambda s: s.images(), "--weights", lambda s: s.asset("encoder_nan.safetensors"), "--input-size", "56"),
         "hold NaN or infinite values in 1 tensor(s) (norm.weight)"),
    Case("prior-labels-missing", "check-prior", "--labels a file that does not exist",
         cmd("check-prior", lambda s: s.images(), "--weights", "random", "--labels", "/nowhere/labels.csv"), "--labels /nowhere/labels.csv is not a file"),
    Case("prior-labels-column", "check-prior", "--labels a column the Parquet reference lacks",
         cmd("check-prior", lambda s: s.run(), "--weights", "random", "--labels", "species"), "lacks the column(s) species"),
    Case("prior-features", "check-prior", "an unknown --features", cmd("check-prior", lambda s: s.images(), "--weights", "random",
         "--features", "vgg"), "unknown feature space 'vgg'"),
    Case("prior-k-zero", "check-prior", "--k 0", cmd("check-prior", lambda s: s.images(), "--weights", "random", "--k", "0"), "got k = 0, max_images = 2000"),
    Case("prior-max-images", "check-prior", "--max-images 1",
         cmd("check-prior", lambda s: s.images(), "--weights", "random", "--max-images", "1"), "got k = 5, max_images = 1"),
    Case("prior-nuisances", "check-prior", "an unknown nuisance",
         cmd("check-prior", lambda s: s.images(), "--weights", "random", "--nuisances", "rotation"), "unknown nuisance(s) rotation"),
    Case("prior-guidance-k", "check-prior", "--guidance-k 0",
         cmd("check-prior", lambda s: s.images(), "--weights", "random", "--guidance-k", "0"), "guidance_k must be >= 1"),
    Case("prior-device", "check-prior", "an unknown --device",
         cmd("check-prior", lambda s: s.images(), "--weights", "random", "--device", "tpu9"), "device 'tpu9' is not a torch device"),
    Case("prior-config-yaml", "check-prior", "--config YAML that does not parse",
         cmd("check-prior", lambda s: s.images(), "--config", lambda s: s.text("bad.yaml", "encoder: [1\n")), "is not valid YAML: expected ',' or ']'"),
    Case("prior-output-file", "check-prior", "--output a file",
         cmd("check-prior", lambda s: s.images(), "--weights", "random", "--output", lambda s: s.text("pc", "a file")), "is a file, not a folder: choose a folder for the output"),
    # submit
    Case("submit-address", "submit", "--address that is not a URL", cmd("submit", "--address", "127.0.0.1:8265", "--", "generate",
         "x.yaml"), "is not the URL of a Ray cluster's job API"),
    Case("submit-no-job", "submit", "no job named", cmd("submit", "--address", "http://127.0.0.1:1"), "the following arguments are required: job"),
    Case("submit-unknown-job", "submit", "a job that does not exist",
         cmd("submit", "--address", "http://127.0.0.1:1", "--", "genrate"), "invalid choice: 'genrate'"),
    Case("submit-bad-config", "submit", "a bad config (checked locally first)", lambda s: [
        "submit", "--address", f"http://127.0.0.1:{free_port()}", "--", "generate", s.text("bad.yaml", "sampling:\n  steps: -3\n")],
         "checked locally; nothing was submitted"),
    Case("submit-bad-flag", "submit", "a flag the job lacks (checked locally first)", lambda s: [
        "submit", "--address", f"http://127.0.0.1:{free_port()}", "--", "generate", s.config(), "--dryrun"],
         "unrecognized arguments: --dryrun"),
    Case("submit-no-cluster", "submit", "an address nothing listens on", lambda s: [
        "submit", "--address", f"http://127.0.0.1:{free_port()}", "--", "generate", s.config()], "no Ray cluster answered"),
    Case("submit-wait-negative", "submit", "--wait -1", lambda s: [
        "submit", "--address", f"http://127.0.0.1:{free_port()}", "--wait", "-1", "--", "generate", s.config()], "--wait must be a number of seconds > 0, got -1.0"),
    Case("submit-working-dir", "submit", "--working-dir a folder that does not exist", lambda s: [
        "submit", "--address", f"http://127.0.0.1:{free_port()}", "--working-dir", "/nowhere", "--", "generate", s.config()],
         "working directory '/nowhere' is not a folder"),
    # serve
    Case("serve-bad-config", "serve", "a bad config value", lambda s: ["serve", s.text("bad.yaml", "sampling:\n  steps: -3\n")],
         "steps must be an integer >= 1, got -3"),
    Case("serve-config-missing", "serve", "a config file that does not exist", cmd("serve", "nowhere.yaml"), "config file not found: nowhere.yaml"),
    Case("serve-model-truncated", "serve", "truncated UNet weights", lambda s: ["serve", s.config(
        model={"source": s.asset("ddpm_truncated")})], "could not read unet weights"),
    Case("serve-encoder-nan", "serve", "encoder weights holding NaN", lambda s: ["serve", s.config(
        encoder={"weights": s.asset("encoder_nan.safetensors")})], "hold NaN or infinite values"),
    Case("serve-port", "serve", "--port 70000", lambda s: ["serve", s.config(), "--port", "70000"], "port must be in 1..65535, got 70000"),
    Case("serve-replicas", "serve", "--replicas 0", lambda s: ["serve", s.config(), "--replicas", "0"], "replicas and max_batch_size must be >= 1"),
    Case("serve-max-n", "serve", "--max-n 0", lambda s: ["serve", s.config(), "--max-n", "0"], "limits.max_n must be an integer >= 1, got 0"),
    Case("serve-batch", "serve", "--generate-batch-samples below --max-n",
         lambda s: ["serve", s.config(), "--max-n", "8", "--generate-batch-samples", "2"], "generate_batch_samples (2) must be >= max_n (8)"),
    Case("serve-dataset-missing", "serve", "--dataset a folder that does not exist",
         lambda s: ["serve", s.config(), "--dataset", "/nowhere/data"], "--dataset: /nowhere/data holds no complete dataset yet"),
    Case("serve-dataset-not-run", "serve", "--dataset a folder that is neither a run nor a refresh root",
         lambda s: ["serve", s.config(), "--dataset", s.user_files("mine")], "holds no complete dataset yet"),
    Case("serve-max-pixels", "serve", "--max-pixels 0", lambda s: ["serve", s.config(), "--max-pixels", "0"], "limits.max_pixels must be an integer >= 1, got 0"),
    # config
    Case("config-both", "config", "--defaults and --markdown together", cmd("config", "--defaults", "--markdown"),
         "not allowed with argument"),
    Case("config-positional", "config", "a config file given to config", cmd("config", "run.yaml"), "unrecognized arguments: run.yaml"),
]

CASES_BY_ID = {case.id: case for case in CASES}


def snapshot(folders: list[Path]) -> dict[str, str]:
    """Every file under ``folders`` by path: its content's hash."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for folder in folders for p in folder.rglob("*") if p.is_file()}


class Hung(Exception):
    pass


def on_alarm(signum, frame):
    raise Hung()


def run_case(case: Case, scene: Scene, work: Path) -> dict:
    """Run ``case`` in ``work`` (made here, the current directory meanwhile); return what it answered and its class."""
    from jobs import cli

    def ray_up() -> bool:
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    ray_before = ray_up()  # a test session's own cluster, left as it is
    work.mkdir(parents=True)
    scene.enter(work)
    here = Path.cwd()
    os.chdir(work)
    try:
        argv = case.argv(scene)
        before = snapshot([work, scene.assets])
        out, err = io.StringIO(), io.StringIO()
        handler = logging.StreamHandler(err)
        logging.getLogger().addHandler(handler)
        escaped = None
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(CASE_TIMEOUT_S)
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception as error:  # noqa: BLE001: an escaped exception is what the table records
            code, escaped = None, f"{type(error).__name__}: {error}"
        seconds = time.perf_counter() - start
        signal.alarm(0)
        logging.getLogger().removeHandler(handler)
        after = snapshot([work, scene.assets])
    finally:
        os.chdir(here)
    ray_started = ray_up() and not ray_before
    if ray_started:
        sys.modules["ray"].shutdown()
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    line = escaped or (lines[-1] if lines else "")
    changed = sorted(p for p in before if after.get(p) != before[p])
    written = sorted(set(after) - set(before))
    if changed:
        outcome = "lost"
    elif escaped or "Traceback" in err.getvalue() + out.getvalue():
        outcome = "traceback"
    elif code == 0:
        outcome = "accepted"
    elif ray_started or written:
        outcome = "late"
    elif code == 2 and line.startswith("jepa-minority") and (len(lines) == 1 or ": error: " in line):  # argparse: usage first
        outcome = "refused"
    else:
        outcome = "unclear"
    return {"id": case.id, "job": case.job, "input": case.input, "argv": argv, "exit": code, "line": line,
            "lines": len(lines), "seconds": round(seconds, 3), "outcome": outcome,
            "expected_line": case.expect in line, "written": written, "changed": changed}


def covering_tests(fragment: str) -> list[str]:
    """The tests (file::function) whose source holds ``fragment``, besides the table's own."""
    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        source = path.read_text()
        if fragment not in source:
            continue
        lines = source.splitlines()
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if any(fragment in line for line in lines[first - 1:node.end_lineno]):
                    found.append(f"{path.relative_to(ROOT)}::{node.name}")
    return found


# Checks removed one at a time by --mutations: (what is removed, file, the text, what replaces it, the case that guards it).
MUTATIONS: list[tuple[str, str, str, str, str]] = [
    ("a YAML error in one line", "pipeline/generate/config.py", "is not valid YAML: {_yaml_problem(error)}",
     "is not valid YAML: {error}", "gen-yaml-syntax"),
    ("a config file that is not UTF-8", "pipeline/generate/config.py", "except UnicodeDecodeError as error:",
     "except UnicodeTranslateError as error:", "gen-yaml-binary"),
    ("an output holding files another job wrote (generate)", "pipeline/generate/preflight.py",
     'check_only(output, set(), "this run", "choose an empty or new output.uri")', "pass", "gen-output-other-run"),
    ("storage.endpoint_url is an http(s) URL", "pipeline/storage.py",
     'if endpoint and (endpoint.scheme not in ("http", "https") or not endpoint.hostname):', "if False:",
     "gen-s3-endpoint-scheme"),
    ("encoder weights holding NaN or inf", "guidance/checks.py", "    if bad:\n        raise ValueError(f\"{what} hold NaN",
     "    if False:\n        raise ValueError(f\"{what} hold NaN", "gen-encoder-nan"),
    ("a curation output holding a run", "pipeline/folders.py", "    if found:\n", "    if False:\n",
     "filter-output-holds-run"),
    ("a curation output inside its input", "pipeline/folders.py", "        if inside(inner, outer):\n",
     "        if False:\n", "filter-output-inside-input"),
    ("the filter's keep_fraction range", "pipeline/curate/config.py",
     "if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:", "if False:", "filter-fraction-zero"),
    ("a refresh version name that leaves the root", "pipeline/curate/config.py",
     'if self.version is not None and (not self.version or "/" in self.version or self.version.startswith(".")):',
     "if False:", "refresh-version-escape"),
    ("score's --device", "pipeline/evaluate/config.py",
     "        check_encoder(self.encoder, self.weights, self.encoder_output, self.input_size)\n        check_device(self.device)\n",
     "        check_encoder(self.encoder, self.weights, self.encoder_output, self.input_size)\n", "score-device"),
    ("check-prior's --device", "pipeline/evaluate/config.py", "        check_mode(self.neighbours)\n        check_device(self.device)\n",
     "        check_mode(self.neighbours)\n", "prior-device"),
    ("submit's --wait", "jobs/submit.py", "if args.wait is not None and not args.wait > 0:", "if False:",
     "submit-wait-negative"),
    ("submit's --working-dir", "jobs/submission.py", "if not Path(self.working_dir).is_dir():", "if False:",
     "submit-working-dir"),
    ("the filter's dedup threshold range", "pipeline/curate/config.py",
     "if self.dedup_threshold is not None and not 0 < self.dedup_threshold <= 1:", "if False:", "filter-dedup-zero"),
    ("export's shard size", "pipeline/curate/export.py", "if self.shard_size < 1:", "if False:", "export-shard-size-zero"),
    ("serve's --port", "pipeline/serve/config.py", "if not 0 < self.port < 65536:", "if False:", "serve-port"),
]


def mutate(check: str, file: str, old: str, new: str, case: str) -> dict:
    """Remove one check (replace ``old`` by ``new`` in ``file``), run the table's test of ``case``, restore the file."""
    path = ROOT / file
    source = path.read_text()
    assert source.count(old) == 1, f"{file}: the check {check!r} is not found once"
    node = f"tests/test_bad_input.py::{TABLE_TEST}[{case}]"
    try:
        path.write_text(source.replace(old, new))
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node], cwd=ROOT,
                              capture_output=True, text=True, timeout=600, env=os.environ | {"PYTHONPATH": str(ROOT)})
    finally:
        path.write_text(source)
    return {"check": check, "file": file, "case": case, "failing_test": node if done.returncode == 1 else None,
            "pytest_exit": done.returncode}


def markdown(results: list[dict]) -> str:
    """The table for RELIABILITY.md: each answer cut at LINE_SHOWN characters (whole in the JSON)."""
    rows = ["| case | job | bad input | exit | the line it answers | s | outcome | also tested by |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        line = r["line"].removeprefix(f"jepa-minority {r['job']}: ")
        line = (line[:LINE_SHOWN] + " ..." if len(line) > LINE_SHOWN else line).replace("|", "\\|")
        others = [t.removeprefix("tests/") for t in r["tests"] if TABLE_TEST not in t]
        tests = ", ".join(f"`{t}`" for t in others)
        rows.append(f"| {r['id']} | {r['job']} | {r['input']} | {r['exit']} | {line} | {r['seconds']:.2f} | {r['outcome']} "
                    f"| {tests} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", action="store_true", help="also remove each check of MUTATIONS and run its test")
    parser.add_argument("--only", nargs="*", help="run only these case ids (the JSON is not written)")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.only or c.id in args.only]
    with tempfile.TemporaryDirectory(prefix="bad-input-") as tmp:
        from tests.services import start_s3_server

        server = start_s3_server(Path(tmp) / "moto.log") if any(c.s3 for c in cases) else None
        if server:
            os.environ.update({"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
                               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
        try:
            (Path(tmp) / "assets").mkdir()
            build_assets(Path(tmp) / "assets")
            scene = Scene(Path(tmp) / "assets", server.endpoint if server else None)
            results = []
            for case in cases:
                result = run_case(case, scene, Path(tmp) / "cases" / case.id)
                result["tests"] = covering_tests(case.expect) if result["expected_line"] else []
                results.append(result)
                print(f"{case.id}: {result['outcome']} {result['exit']} {result['seconds']:.2f}s {result['line']}",
                      file=sys.stderr)
        finally:
            if server:
                server.stop()
    for result in results:
        for key in ("argv", "written", "changed"):
            result[key] = [path.replace(tmp, "$TMP") for path in result[key]]
        result["line"] = result["line"].replace(tmp, "$TMP")
        result["known"] = CASES_BY_ID[result["id"]].known
        if not result["known"]:
            result["tests"].append(f"tests/test_bad_input.py::{TABLE_TEST}[{result['id']}]")
    record = {"cases": len(results), "outcomes": dict(Counter(r["outcome"] for r in results)), "results": results}
    if args.mutations:
        record["mutations"] = [mutate(*m) for m in MUTATIONS]
    if not args.only:
        write_json(RESULTS / "bad_input.json", record)
    print(markdown(results))


if __name__ == "__main__":
    main()
