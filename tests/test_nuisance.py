"""Nuisance sensitivity of the prior check: each transform does what it says, the ratio uses the robust
spread, and an encoder whose score reads brightness gets the brightness verdict while one blind to it
does not (closed-form encoders inside the real JepaEncoder, their score shifts known exactly)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from guidance import jepa_scores
from guidance.encoders import JepaEncoder
from pipeline import nuisance
from pipeline.nuisance import CHANGES, perturb
from pipeline.evaluate.config import PriorConfig
from pipeline.evaluate.prior import nuisance_check, nuisance_summary, nuisance_verdicts, robust_spread

SIZE = 8
DIM = 6


def stroke(width: int) -> torch.Tensor:
    """A bright vertical stroke ``width`` pixels wide on a dark 8 x 8 ground, (1, 3, 8, 8)."""
    image = torch.zeros(1, 3, SIZE, SIZE)
    image[..., 2:2 + width] = 1.0
    return image


def mid_grey(seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """Values in [0.2, 0.8]: no transform here reaches the clip."""
    return 0.2 + 0.6 * torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def no_noise() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def ink(image: torch.Tensor) -> int:
    return int((image[:, 0] > 0.5).sum())  # bright pixels of one channel


def test_brightness_and_contrast_shift_the_mean_and_scale_the_deviations():
    image = mid_grey()
    brighter = perturb("brightness", image, no_noise())
    assert (brighter - image).mean() == pytest.approx(nuisance.BRIGHTNESS, abs=1e-6)
    assert perturb("brightness", torch.full_like(image, 0.95), no_noise()).max() == 1.0  # clipped
    flatter = perturb("contrast", image, no_noise())
    assert flatter.mean() == pytest.approx(float(image.mean()), abs=1e-6)
    assert flatter.std() == pytest.approx(nuisance.CONTRAST * float(image.std()), rel=1e-5)


def test_blur_is_the_stated_gaussian_and_keeps_flat_images_flat():
    flat = torch.full((1, 3, SIZE, SIZE), 0.4)
    assert torch.allclose(perturb("blur", flat, no_noise()), flat)
    dot = torch.zeros(1, 3, SIZE, SIZE)
    dot[..., 4, 4] = 1.0
    blurred = perturb("blur", dot, no_noise())
    assert float(blurred.sum()) == pytest.approx(3.0, abs=1e-6)  # mass kept
    assert float(blurred[0, 0, 4, 5] / blurred[0, 0, 4, 4]) == pytest.approx(math.exp(-1 / (2 * nuisance.BLUR_SIGMA**2)))
    assert float(blurred[0, 0, 4, 6]) == 0.0  # a 3 x 3 window


def test_noise_has_the_stated_std_and_comes_from_the_generator():
    image = mid_grey(size=64)
    noisy = perturb("noise", image, torch.Generator().manual_seed(1))
    assert float((noisy - image).std()) == pytest.approx(nuisance.NOISE_STD, rel=0.03)
    assert torch.equal(noisy, perturb("noise", image, torch.Generator().manual_seed(1)))
    assert not torch.equal(noisy, perturb("noise", image, torch.Generator().manual_seed(2)))


def test_dilation_thickens_a_stroke_and_erosion_thins_it():
    assert ink(stroke(1)) == SIZE and ink(perturb("dilation", stroke(1), no_noise())) == 3 * SIZE
    assert torch.equal(perturb("erosion", stroke(3), no_noise()), stroke(1).roll(1, dims=-1))
    assert ink(perturb("erosion", stroke(1), no_noise())) == 0


def test_every_nuisance_changes_an_image_and_stays_in_range():
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    for name in CHANGES:
        changed = perturb(name, image, no_noise())
        assert changed.shape == image.shape and 0 <= changed.min() and changed.max() <= 1
        assert (changed - image).abs().max() > 0.01, name


def test_the_ratio_divides_the_median_change_by_the_robust_spread():
    scores = np.array([0.0, 1.0, 2.0, 3.0, 100.0])  # median absolute deviation 1; the outlier would inflate a std
    assert robust_spread(scores) == pytest.approx(1.4826)
    summary = nuisance_summary({"jepa_score": scores}, {"jepa_score": np.array([0.0, 1.0, 2.0])},
                               {"blur": {"jepa_score": np.array([3.0, -2.0, 2.5])}})
    entry = summary["nuisances"]["blur"]["jepa_score"]
    assert entry["median_change"] == 3.0 and entry["ratio"] == pytest.approx(3.0 / 1.4826)
    assert summary["spread"] == {"jepa_score": pytest.approx(1.4826)}
    lines = nuisance_verdicts(summary["nuisances"], {"jepa_score": "JEPA-SCORE"})
    assert lines == [f"The score moves more under blur ({CHANGES['blur']}) than across images (JEPA-SCORE 2.02x): "
                     "guidance will push blur"]

    calm = nuisance_summary({"jepa_score": scores}, {"jepa_score": np.zeros(3)},
                            {"blur": {"jepa_score": np.full(3, 0.5)}, "noise": {"jepa_score": np.full(3, 0.1)}})
    assert nuisance_verdicts(calm["nuisances"], {"jepa_score": "JEPA-SCORE"}) == [
        "No nuisance moves the score more than it varies across images (the most: blur, 0.34x for JEPA-SCORE)"]
    flat = nuisance_summary({"jepa_score": np.ones(4)}, {"jepa_score": np.ones(2)}, {"blur": {"jepa_score": np.ones(2)}})
    assert flat["nuisances"]["blur"]["jepa_score"]["ratio"] is None
    assert nuisance_verdicts(flat["nuisances"], {"jepa_score": "JEPA-SCORE"})[0].startswith("Nuisance sensitivity cannot")


class MeanGain(nn.Module):
    """f(x) = exp(c m(x)) W2 tanh(W1 (x - m(x)) + b), m(x) the mean pixel: a brightness shift d leaves
    x - m(x) alone and scales the Jacobian by exp(c d), so every log singular value moves by exactly c d
    (the JEPA-SCORE by D c d); with c = 0 the score is blind to brightness."""

    def __init__(self, gain: float, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        pixels = 3 * SIZE * SIZE
        self.gain = gain
        self.num_features = DIM
        self.w1 = nn.Parameter(torch.randn(24, pixels, generator=generator) / pixels**0.5, requires_grad=False)
        self.b = nn.Parameter(torch.randn(24, generator=generator), requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(DIM, 24, generator=generator) / 24**0.5, requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        centred = torch.tanh((images - mean).flatten(1) @ self.w1.T + self.b) @ self.w2.T
        return torch.exp(self.gain * mean.flatten(1)) * centred


def closed_form_encoder(gain: float) -> JepaEncoder:
    return JepaEncoder(MeanGain(gain), "mean-gain", SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).double()


@pytest.mark.parametrize("gain", [5.0, 0.0])
def test_only_an_encoder_that_reads_brightness_gets_the_brightness_verdict(gain):
    images = [0.1 + 0.7 * torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in range(24)]
    ids = [f"img{i:02d}" for i in range(24)]
    encoder, config = closed_form_encoder(gain), PriorConfig(reference="unused", guidance_k=3, batch_size=5)
    exact, topk = jepa_scores(encoder, torch.cat(images), 3)
    every = {"jepa_score": exact.numpy(), "topk_score": topk.numpy()}  # the spread comes from all 24
    result = nuisance_check(encoder, images[:10], ids[:10], every, config)

    assert result["images"] == 10 and set(result["nuisances"]) == set(CHANGES)
    brightness = result["nuisances"]["brightness"]
    # the exact shift, over the robust spread of every image's score
    for score, rank in (("jepa_score", DIM), ("topk_score", 3)):
        assert brightness[score]["median_change"] == pytest.approx(rank * gain * nuisance.BRIGHTNESS, abs=1e-4)
        assert brightness[score]["ratio"] == pytest.approx(
            rank * gain * nuisance.BRIGHTNESS / robust_spread(every[score]), abs=1e-4)
    pushes = [line for line in result["verdicts"] if "under brightness" in line]
    if gain:
        assert brightness["jepa_score"]["ratio"] > 2 and brightness["topk_score"]["ratio"] > 2
        assert pushes == [line for line in result["verdicts"] if line.endswith("guidance will push brightness")] != []
    else:
        assert not pushes
    assert all(result["nuisances"][name]["jepa_score"]["median_change"] > 1e-3 for name in CHANGES if name != "brightness")


def test_the_demo_encoders_nuisance_views_change_ink_not_at_zero_strength():
    """pipeline/demo/digits.py nuisance_view: the identity at strength 0; at strength 1, stroke width,
    brightness and the rest vary from image to image, the same for the same generator seed."""
    from pipeline.demo.digits import digits, nuisance_view

    images, _ = digits(16, "train")
    images = images[:64]
    torch.testing.assert_close(nuisance_view(images, torch.Generator().manual_seed(0), 0.0), images, atol=1e-5, rtol=0)
    views = nuisance_view(images, torch.Generator().manual_seed(0), 1.0)
    torch.testing.assert_close(views, nuisance_view(images, torch.Generator().manual_seed(0), 1.0))
    ink = (views > 0.5).flatten(1).sum(1).float() / (images > 0.5).flatten(1).sum(1).clamp_min(1)
    assert ink.max() > 1.3 and ink.min() < 0.7  # some strokes thicker, some thinner
    assert views.min() >= 0 and views.max() <= 1
