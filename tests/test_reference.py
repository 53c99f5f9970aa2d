"""The authors' finite-difference objective, kept for comparison, and the objective registry."""

from __future__ import annotations

import pytest
import torch

from guidance import OBJECTIVES, get_objective, topk_log_volume
from guidance.reference import topk_log_volume_exact, topk_log_volume_reference
from tests.conftest import TINY_SIZE, LinearEncoder, rand_images


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_objectives_are_selectable_by_name():
    assert get_objective("rsvd") is topk_log_volume
    assert get_objective("reference") is topk_log_volume_reference
    with pytest.raises(ValueError, match="unknown objective 'fd'; valid names: rsvd, reference"):
        get_objective("fd")
    assert set(OBJECTIVES) == {"rsvd", "reference"}


def test_on_a_linear_encoder_finite_differences_are_exact_and_both_objectives_agree():
    sigma = 1 / torch.arange(1, 13).double()
    encoder, images = LinearEncoder(sigma), rand_images(3)
    ours = topk_log_volume(encoder, images, k=4, oversample=2, power_iters=1, generator=seeded(5))
    theirs = topk_log_volume_reference(encoder, images, k=4, oversample=2, power_iters=1, generator=seeded(5))
    torch.testing.assert_close(theirs, ours, rtol=1e-7, atol=1e-7)


def test_reference_is_differentiable_and_never_exceeds_the_exact_top_k(tiny_encoder):
    images = rand_images(2, (3, TINY_SIZE, TINY_SIZE), seed=3, dtype=torch.float32).requires_grad_(True)
    value = topk_log_volume_reference(tiny_encoder, images, generator=seeded())
    (grad,) = torch.autograd.grad(value.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert (value <= topk_log_volume_exact(tiny_encoder, images.detach(), k=9) + 1e-4).all()


def test_reduced_precision_autocast_changes_the_reference_sketch(tiny_encoder):
    images = rand_images(2, (3, TINY_SIZE, TINY_SIZE), seed=4, dtype=torch.float32)
    full = topk_log_volume_reference(tiny_encoder, images, power_iters=0, generator=seeded())
    low = topk_log_volume_reference(tiny_encoder, images, power_iters=0, generator=seeded(),
                                    autocast_dtype=torch.bfloat16)
    # Pinned within 0.2: the finite-difference sketch amplifies rounding, and the full suite's order moved the float32
    # value by 0.076 (a lone run matches to 1e-5); far less than the 2.1 by which bfloat16 autocast moves it.
    torch.testing.assert_close(full, torch.tensor([13.398404, 17.403055], dtype=full.dtype), atol=0.2, rtol=0)
    torch.testing.assert_close(low, torch.tensor([10.886602, 15.268881], dtype=low.dtype), atol=0.2, rtol=0)


def test_reference_refuses_bad_settings():
    with pytest.raises(ValueError, match="oversample must be an integer >= 0"):
        topk_log_volume_reference(LinearEncoder(torch.ones(4)), rand_images(1), k=2, oversample=-2)
