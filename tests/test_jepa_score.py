"""Exact JEPA-SCORE: closed form, the naive reference, batching, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from guidance import jepa_score
from guidance.jepa_score import SIGMA_FLOOR, encoder_jacobian, encoder_singular_values
from guidance.reference import jepa_score_naive
from tests.conftest import TINY_SIZE, LinearEncoder, rand_images


def test_linear_encoder_scores_the_log_volume_of_its_matrix():
    sigma = torch.tensor([3.0, 1.5, 0.7, 0.2, 1e-3, 1e-8])  # the last one is clipped at 1e-6
    encoder = LinearEncoder(sigma)
    want = sum(math.log(max(s, SIGMA_FLOOR)) for s in sigma.tolist())
    got = jepa_score(encoder, rand_images(3))
    torch.testing.assert_close(got, torch.full((3,), want, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_batched_equals_the_naive_per_image_jacobian_to_1e_6(tiny_encoder64):
    images = rand_images(3, (3, TINY_SIZE, TINY_SIZE), seed=1)
    fast, naive = jepa_score(tiny_encoder64, images), jepa_score_naive(tiny_encoder64, images)
    assert ((fast - naive).abs() / naive.abs()).max() < 1e-6


def test_jacobian_rows_match_autograd(tiny_encoder64):
    images = rand_images(2, (3, TINY_SIZE, TINY_SIZE), seed=3)
    jacobians = encoder_jacobian(tiny_encoder64, images, chunk_size=5)
    for image, got in zip(images, jacobians):
        want = torch.autograd.functional.jacobian(lambda x: tiny_encoder64(x[None])[0], image)
        torch.testing.assert_close(got, want.flatten(1))


def test_batch_equals_single_images_and_memory_bound_changes_nothing(tiny_encoder64):
    images = rand_images(4, (3, TINY_SIZE, TINY_SIZE), seed=4)
    batched = jepa_score(tiny_encoder64, images)
    singles = torch.cat([jepa_score(tiny_encoder64, image[None]) for image in images])
    one_per_group = jepa_score(tiny_encoder64, images, chunk_size=7, max_jacobian_bytes=1)
    torch.testing.assert_close(batched, singles, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(batched, one_per_group, rtol=1e-10, atol=1e-10)


def test_score_differs_between_images(tiny_encoder64):
    scores = jepa_score(tiny_encoder64, rand_images(3, (3, TINY_SIZE, TINY_SIZE), seed=5))
    assert scores.unique().numel() == 3


BAD_IMAGES = {
    "nan pixel": (torch.full((2, 3, 4, 4), 0.5).index_put_((torch.tensor([1]),), torch.tensor(float("nan"))),
                  "NaN or infinite pixels \\(batch indices \\[1\\]\\)"),
    "rank 3": (torch.rand(3, 4, 4), "shape \\(B, 3, H, W\\)"),
    "one channel": (torch.rand(2, 1, 4, 4), "shape \\(B, 3, H, W\\)"),
    "0..255 values": (torch.rand(2, 3, 4, 4) * 255, "must be in \\[0, 1\\].*divide \\[0, 255\\]"),
    "[-1, 1] values": (torch.rand(2, 3, 4, 4) * 2 - 1, "must be in \\[0, 1\\]"),
    "empty batch": (torch.rand(0, 3, 4, 4), "empty batch"),
    "uint8": (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "floating point"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_images_are_refused_with_a_clear_error(case):
    images, message = BAD_IMAGES[case]
    with pytest.raises((ValueError, TypeError), match=message):
        jepa_score(LinearEncoder(torch.ones(4)), images)


def test_not_a_tensor_is_refused():
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        jepa_score(LinearEncoder(torch.ones(4)), [[0.5]])


@pytest.mark.gpu
def test_cuda_scores_match_cpu(tiny_encoder):
    images = rand_images(2, (3, TINY_SIZE, TINY_SIZE), seed=6, dtype=torch.float32)
    cpu = jepa_score(tiny_encoder, images)
    gpu = jepa_score(tiny_encoder.cuda(), images.cuda()).cpu()
    tiny_encoder.cpu()
    assert ((cpu - gpu).abs() / cpu.abs()).max() < 1e-3


def authors_singular_values(encoder, images: torch.Tensor) -> torch.Tensor:
    """The singular values behind the authors' JEPA-SCORE: the Jacobian with respect to z = (x - mean) / std."""
    z = (encoder.resize(images) - encoder.mean) / encoder.std
    return torch.stack([torch.linalg.svdvals(torch.autograd.functional.jacobian(
        lambda v: encoder.backbone(v[None])[0], one).flatten(1)) for one in z])


def test_our_score_exceeds_the_authors_by_the_normalisations_log_volume(tiny_encoder64):
    """docs/method.md, 'JEPA-SCORE': r log(1 / std) when every channel shares one std; with ImageNet's three
    stds, between r log(1 / max std) and r log(1 / min std); r counts the singular values above the floor."""
    encoder = copy.deepcopy(tiny_encoder64)
    images = rand_images(2, (3, TINY_SIZE, TINY_SIZE), seed=3)
    for std in (None, 0.25):  # ImageNet's stds, then one std for every channel
        if std is not None:
            encoder.std.fill_(std)
        theirs = authors_singular_values(encoder, images)
        r = (theirs > SIGMA_FLOOR).sum(-1).double()
        assert (r == (encoder_singular_values(encoder, images) > SIGMA_FLOOR).sum(-1)).all()
        offset = jepa_score(encoder, images) - theirs.clamp_min(SIGMA_FLOOR).log().sum(-1)
        if std is None:
            low, high = r * math.log(1 / encoder.std.max().item()), r * math.log(1 / encoder.std.min().item())
            assert (offset > low + 1e-3).all() and (offset < high - 1e-3).all(), (offset, low, high)
        else:
            torch.testing.assert_close(offset, r * math.log(1 / std), rtol=0, atol=1e-6)
