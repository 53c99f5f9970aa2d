"""The method table (guidance/methods.py, docs/method.md, 'Baselines'): a method registered as one light row
is validated, built and sampled by the unchanged config checks, entry point, loop and run identity; the table
itself imports no ML library."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from guidance.generate import generate_images
from guidance.methods import METHODS, BoostSkipConfig, MethodSpec, SamplingConfig, method_class
from guidance.models import WorkItem
from guidance.presets import load_model
from guidance.sampling import Method
from pipeline.generate.config import GenerateConfig
from pipeline.generate.work import run_identity
from tests import tiny_diffusion

ITEMS = [WorkItem(1, 3), WorkItem(2, 7)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    return load_model("pixel-unet", tiny_diffusion.save_pixel_unet(tmp_path_factory.mktemp("table"), num_classes=10))


def _at_most_five_steps(config):
    if config.steps > 5:
        raise ValueError(f"toy: steps must be <= 5, got {config.steps}")


class HalfNoise(Method):
    """A toy method: start from half the noise, count every step as guided."""

    def start(self, x, schedule):
        self.steps_guided = 0
        return 0.5 * x, schedule

    def step(self, sampler, s, x, t, t_prev):
        self.steps_guided += 1
        return sampler.update(x, t, t_prev)


class NeedsEncoder(Method):
    """A toy guiding method: refuses to run without an encoder."""

    @classmethod
    def check_work(cls, config, model, encoder):
        if encoder is None:
            raise ValueError("toy-guided needs an encoder")


TOY = MethodSpec(f"{__name__}:HalfNoise", guides=True, sections=("bns",), check=_at_most_five_steps)


def test_a_registered_method_samples_through_the_unchanged_loop(class_model, monkeypatch):
    monkeypatch.setitem(METHODS, "toy", TOY)
    images, steps_guided = generate_images(class_model, ITEMS, SamplingConfig(method="toy", steps=3))
    assert steps_guided == 3
    # half the noise, no skipped step: what boost-and-skip with gamma 0.5 and skip 0 samples
    bns = SamplingConfig(method="bns", steps=3, bns=BoostSkipConfig(gamma=0.5, skip=0))
    expected, bns_guided = generate_images(class_model, ITEMS, bns)
    assert bns_guided == 0
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    unguided, _ = generate_images(class_model, ITEMS, SamplingConfig(method="unguided", steps=3))
    assert (images - unguided).abs().max() > 1e-3  # the method's start changed the samples


def test_the_table_drives_the_config_checks_and_the_light_facts(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", TOY)
    with pytest.raises(ValueError, match="toy: steps must be <= 5, got 6"):
        SamplingConfig(method="toy", steps=6)
    toy = SamplingConfig(method="toy", steps=5)
    assert (toy.objective, toy.guides) == (None, True)
    with pytest.raises(ValueError, match="method must be one of unguided, bns, jepa, jepa-reference, .*toy, got 'nope'"):
        SamplingConfig(method="nope")
    facts = {name: (SamplingConfig(method=name).objective, SamplingConfig(method=name).guides)
             for name in ("unguided", "bns", "jepa", "jepa-reference")}
    assert facts == {"unguided": (None, False), "bns": (None, False), "jepa": ("rsvd", True),
                     "jepa-reference": ("reference", True)}


def test_the_table_drives_the_work_checks(class_model, monkeypatch):
    monkeypatch.setitem(METHODS, "toy-guided", MethodSpec(f"{__name__}:NeedsEncoder", objective="rsvd", guides=True))
    config = SamplingConfig(method="toy-guided", steps=2)
    assert config.objective == "rsvd"
    with pytest.raises(ValueError, match="toy-guided needs an encoder"):
        generate_images(class_model, ITEMS, config)


def test_the_run_identity_covers_the_sections_the_row_names(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", TOY)
    base = GenerateConfig()
    base = replace(base, model=replace(base.model, dtype="float32"))

    def identity(method: str, **bns) -> dict:
        sampling = replace(base.sampling, method=method, steps=5, bns=BoostSkipConfig(**bns))
        return run_identity(replace(base, sampling=sampling))

    assert identity("toy", gamma=1.5) != identity("toy", gamma=1.2)  # toy reads bns
    assert identity("unguided", gamma=1.5) == identity("unguided", gamma=1.2)  # unguided does not
    assert "guidance_decoder" in identity("toy")["model"] and "guidance_decoder" not in identity("unguided")["model"]


def test_every_row_resolves_to_a_method():
    for name in METHODS:
        assert issubclass(method_class(name), Method), name


def test_the_table_imports_no_ml_library():
    """Config checks and --dry-run read the table's rows without torch (checked in a fresh process)."""
    probe = ("import sys, json\nfrom guidance.methods import METHODS, SamplingConfig\n"
             "[SamplingConfig(method=name) for name in METHODS]\n"
             "print(json.dumps(sorted(m for m in ('torch', 'diffusers', 'timm') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert json.loads(out) == []
