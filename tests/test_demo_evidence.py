"""The demo evidence's controls: each guided setting gets its reversed and random-direction controls at the
same settings, and a setting counts as beating them only when it is closer to the real minority than both."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from benchmarks.demo_evidence import CONTROLS, against_controls, control_table, with_controls
from guidance import GuidanceConfig, SamplingConfig
from pipeline.demo.digits import held_out_images
from pipeline.evaluate.evidence import Arm, measure
from pipeline.evaluate.minority import MinorityConfig, minority_mask


def test_each_control_differs_from_its_setting_only_in_direction():
    setting = SamplingConfig(method="jepa", steps=7, guidance=GuidanceConfig(eta=0.3, tau_stop=0.2, interval=2))
    arms = with_controls("JEPA", setting)
    assert arms["JEPA"] == setting
    for control, direction in CONTROLS.items():
        moved = arms[f"JEPA: {control}"]
        assert moved.guidance.direction == direction != setting.guidance.direction
        assert moved == SamplingConfig(**{**vars(setting), "guidance": GuidanceConfig(
            **{**vars(setting.guidance), "direction": direction})})


def _arm(name: str, images: list[Image.Image], labels: np.ndarray) -> Arm:
    return Arm(name, images, labels, np.zeros(len(images)), 0.1, np.arange(len(images)))


def _noisy(images: list[Image.Image], seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(np.asarray(i, np.float64) + rng.normal(0, 60, (16, 16)), 0, 255).astype(np.uint8))
            for i in images]


@pytest.mark.slow  # about 50 s on 2 busy cores: the minority test's noise match
def test_a_setting_beats_its_controls_only_when_closer_to_the_real_minority_than_both():
    images, labels = held_out_images()
    rare = minority_mask(np.stack([np.asarray(i, np.float64).ravel() / 255 for i in images]), MinorityConfig().k,
                         MinorityConfig().quantile)
    typical, minority = np.flatnonzero(~rare)[:60], np.flatnonzero(rare)[:60]
    pick = lambda index: [images[i] for i in index]
    unguided = _arm("unguided", pick(typical), labels[typical])
    toward = [unguided, _arm("S", pick(minority), labels[minority]),
              _arm("S: reversed", pick(typical[::-1]), labels[typical[::-1]]),
              _arm("S: random direction", _noisy(pick(typical), 0), labels[typical])]
    away = [unguided, _arm("S", _noisy(pick(typical), 1), labels[typical]),
            _arm("S: reversed", pick(minority), labels[minority]),
            _arm("S: random direction", pick(typical), labels[typical])]
    config = MinorityConfig(resamples=50)
    rows = measure(toward, images, lambda chosen: np.zeros(len(chosen)), baseline="unguided", minority=config)
    assert against_controls(rows) == [against_controls(rows)[0]] and "S: minority" in against_controls(rows)[0]
    assert against_controls(rows)[0].endswith(": closer than both controls.")
    table = control_table(rows).splitlines()
    assert len(table) == 2 + len(toward) and table[3].startswith("| S | minority | ")
    assert against_controls(measure(away, images, baseline="unguided", minority=config))[0].endswith(
        ": not closer than both controls.")
