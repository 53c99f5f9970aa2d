"""Top-k log-volume by randomized SVD and its envelope-theorem gradient, against exact answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from guidance import encoder_jacobian, jepa_score, topk_log_volume
from guidance.log_volume import SketchMemory
from guidance.reference import topk_log_volume_exact
from tests.conftest import TINY_SIZE, LinearEncoder, SmoothEncoder, rand_images


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def exact_topk_by_full_svd_autograd(encoder, images: torch.Tensor, k: int) -> torch.Tensor:
    """sum_{i<=k} log sigma_i(J(x)) with autograd through the full Jacobian and its SVD (no envelope)."""
    values = []
    for image in images:
        jac = torch.autograd.functional.jacobian(lambda x: encoder(x[None])[0], image, create_graph=True)
        values.append(torch.linalg.svdvals(jac.flatten(1))[:k].log().sum())
    return torch.stack(values)


def gradient(function, images: torch.Tensor) -> torch.Tensor:
    x = images.clone().requires_grad_(True)
    function(x).sum().backward()
    return x.grad


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def test_full_width_sketch_equals_the_exact_score():
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.01])
    encoder, images = LinearEncoder(sigma), rand_images(2)
    value = topk_log_volume(encoder, images, k=8, oversample=0, power_iters=0, generator=seeded())
    torch.testing.assert_close(value, jepa_score(encoder, images), rtol=1e-10, atol=1e-10)


def test_full_width_sketch_equals_the_exact_score_on_a_nonlinear_encoder():
    encoder, images = SmoothEncoder(dim=8), rand_images(3)
    value = topk_log_volume(encoder, images, k=8, oversample=0, power_iters=0, generator=seeded())
    torch.testing.assert_close(value, jepa_score(encoder, images), rtol=1e-10, atol=1e-10)


def test_enough_power_iterations_recover_the_top_k_sum():
    sigma = torch.tensor([10.0, 8.0, 6.0, 5.0, 4.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02], dtype=torch.float64)
    encoder, images, k = LinearEncoder(sigma), rand_images(2), 5
    want = sigma[:k].log().sum()
    value = topk_log_volume(encoder, images, k=k, oversample=2, power_iters=6, generator=seeded())
    torch.testing.assert_close(value, want.expand(2), rtol=1e-9, atol=1e-9)


def test_enough_power_iterations_recover_the_top_k_sum_on_the_tiny_vit(tiny_encoder64):
    images = rand_images(2, (3, TINY_SIZE, TINY_SIZE), seed=1)
    value = topk_log_volume(tiny_encoder64, images, k=6, oversample=4, power_iters=12, generator=seeded())
    torch.testing.assert_close(value, topk_log_volume_exact(tiny_encoder64, images, k=6), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k,oversample,power_iters", [(3, 0, 0), (3, 2, 0), (5, 1, 1), (8, 4, 2), (2, 0, 3)])
def test_the_sketch_never_exceeds_the_top_k_sum(k, oversample, power_iters):
    sigma = 1 / torch.arange(1, 17).double().sqrt()
    encoder, images = LinearEncoder(sigma, seed=3), rand_images(6)
    want = sigma[:k].log().sum()
    value = topk_log_volume(encoder, images, k, oversample, power_iters, generator=seeded(power_iters))
    assert (value <= want + 1e-10).all()


def test_the_sketch_never_exceeds_the_top_k_sum_on_the_tiny_vit(tiny_encoder64):
    images = rand_images(3, (3, TINY_SIZE, TINY_SIZE), seed=2)
    exact = topk_log_volume_exact(tiny_encoder64, images, k=9)
    value = topk_log_volume(tiny_encoder64, images, generator=seeded())
    assert (value <= exact + 1e-9).all()
    assert (value > exact - 1.0).all()  # and with the default q = 2 it is already close


def test_the_error_shrinks_as_power_iterations_grow():
    sigma = 1 / torch.arange(1, 25).double().sqrt()  # slow decay: a plain sketch misses the top-k subspace
    encoder, images, k = LinearEncoder(sigma, seed=4), rand_images(16), 4
    want = sigma[:k].log().sum()
    errors = [
        (want - topk_log_volume(encoder, images, k, 1, q, generator=seeded(7))).mean().item() for q in range(5)
    ]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1 * errors[0], errors


def test_envelope_gradient_is_exact_when_the_sketch_spans_the_embedding():
    encoder, images, k = SmoothEncoder(dim=8), rand_images(3, seed=5), 3
    ours = gradient(lambda x: topk_log_volume(encoder, x, k, 5, 0, generator=seeded()), images)  # r = D
    exact = gradient(lambda x: exact_topk_by_full_svd_autograd(encoder, x, k), images)
    torch.testing.assert_close(ours, exact, rtol=1e-9, atol=1e-12)


def test_envelope_gradient_of_a_converged_narrow_sketch_matches_autograd_through_the_full_svd():
    encoder, images, k = SmoothEncoder(dim=8), rand_images(3, seed=5), 3
    ours = gradient(lambda x: topk_log_volume(encoder, x, k, 2, 8, generator=seeded()), images)
    exact = gradient(lambda x: exact_topk_by_full_svd_autograd(encoder, x, k), images)
    assert (cosine(ours, exact) >= 0.999).all()


def test_envelope_gradient_matches_autograd_through_the_full_svd_on_the_tiny_vit(tiny_encoder64):
    images, k = rand_images(2, (3, TINY_SIZE, TINY_SIZE), seed=6), 4
    ours = gradient(lambda x: topk_log_volume(tiny_encoder64, x, k, 4, 12, generator=seeded()), images)
    exact = gradient(lambda x: exact_topk_by_full_svd_autograd(tiny_encoder64, x, k), images)
    assert (cosine(ours, exact) >= 0.999).all()


def test_envelope_gradient_matches_finite_differences():
    encoder, images, k = SmoothEncoder(dim=8, seed=1), rand_images(2, seed=8), 3
    value = lambda x: topk_log_volume(encoder, x, k, 2, 20, generator=seeded())  # noqa: E731
    direction = torch.randn(images.shape, generator=seeded(9), dtype=torch.float64)
    step = 1e-5
    finite = (value(images + step * direction) - value(images - step * direction)) / (2 * step)
    analytic = (gradient(value, images) * direction).flatten(1).sum(1)
    torch.testing.assert_close(analytic, finite, rtol=1e-5, atol=1e-8)


def test_a_batch_equals_single_calls_with_the_same_generator(tiny_encoder64):
    images = rand_images(4, (3, TINY_SIZE, TINY_SIZE), seed=10)
    batch_gen, single_gen = seeded(11), seeded(11)
    batched = topk_log_volume(tiny_encoder64, images, power_iters=0, generator=batch_gen)
    singles = torch.cat([
        topk_log_volume(tiny_encoder64, image[None], power_iters=0, generator=single_gen) for image in images
    ])
    torch.testing.assert_close(batched, singles, rtol=1e-10, atol=1e-10)


def test_each_image_value_and_gradient_depend_on_that_image_alone(tiny_encoder64):
    images = rand_images(4, (3, TINY_SIZE, TINY_SIZE), seed=12)
    per_image = [seeded(100 + i) for i in range(4)]
    batched = gradient(lambda x: topk_log_volume(tiny_encoder64, x, power_iters=1, generator=per_image), images)
    for i, image in enumerate(images):
        alone = gradient(
            lambda x: topk_log_volume(tiny_encoder64, x, power_iters=1, generator=[seeded(100 + i)]), image[None]
        )
        torch.testing.assert_close(batched[i], alone[0], rtol=1e-9, atol=1e-12)


def test_same_generator_same_value_other_seed_other_sketch(tiny_encoder64):
    images = rand_images(2, (3, TINY_SIZE, TINY_SIZE), seed=13)
    first = topk_log_volume(tiny_encoder64, images, power_iters=0, generator=seeded(1))
    again = topk_log_volume(tiny_encoder64, images, power_iters=0, generator=seeded(1))
    other = topk_log_volume(tiny_encoder64, images, power_iters=0, generator=seeded(2))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_gradient_flows_to_whatever_produced_the_images():
    encoder = SmoothEncoder(dim=8)
    latent = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    value = topk_log_volume(encoder, torch.sigmoid(latent), k=3, generator=seeded())
    (grad,) = torch.autograd.grad(value.sum(), latent)
    direct = gradient(lambda x: topk_log_volume(encoder, x, k=3, generator=seeded()), torch.sigmoid(latent.detach()))
    s = torch.sigmoid(latent.detach())
    torch.testing.assert_close(grad, direct * s * (1 - s))  # the chain rule through the producer


def test_no_graph_is_kept_when_images_do_not_require_grad():
    value = topk_log_volume(SmoothEncoder(dim=8), rand_images(2), k=3, generator=seeded())
    assert value.grad_fn is None and math.isfinite(value.sum().item())


# -- warm start: the sketch begins from the previous call's subspace ------------------------------

def test_a_warm_start_from_the_top_right_singular_vectors_is_exact(tiny_encoder64):
    images, k, rank = rand_images(2, (3, TINY_SIZE, TINY_SIZE), seed=20), 4, 6
    right = torch.linalg.svd(encoder_jacobian(tiny_encoder64, images), full_matrices=False).Vh[:, :rank]
    memory = SketchMemory(right.reshape(2, rank, *images.shape[1:]))
    value = topk_log_volume(tiny_encoder64, images, k, rank - k, 0, memory=memory)
    torch.testing.assert_close(value, topk_log_volume_exact(tiny_encoder64, images, k), rtol=1e-10, atol=1e-10)


def test_each_warm_call_adds_one_power_iteration():
    """On a fixed image, n warm calls without power iterations span what one fresh call with n - 1 does."""
    sigma = 1 / torch.arange(1, 25).double().sqrt()
    encoder, images, k = LinearEncoder(sigma, seed=4), rand_images(3), 4
    memory = SketchMemory()
    for calls in range(1, 5):
        warm = topk_log_volume(encoder, images, k, 1, 0, generator=seeded(7) if calls == 1 else None, memory=memory)
        fresh = topk_log_volume(encoder, images, k, 1, calls - 1, generator=seeded(7))
        torch.testing.assert_close(warm, fresh, rtol=1e-9, atol=1e-9)


def test_a_warm_start_tracks_a_moving_image_like_a_fresh_converged_sketch(tiny_encoder64):
    """Along a path of nearby images (consecutive guided steps), warm q = 0 matches the exact gradient."""
    start, end = rand_images(2, (3, TINY_SIZE, TINY_SIZE), seed=21), rand_images(2, (3, TINY_SIZE, TINY_SIZE), seed=22)
    memory, k = SketchMemory(), 4
    for step in range(6):
        images = start + (end - start) * step / 50  # a small move per step
        warm = gradient(lambda x: topk_log_volume(tiny_encoder64, x, k, 2, 0, generator=seeded(), memory=memory), images)
    fresh = gradient(lambda x: topk_log_volume(tiny_encoder64, x, k, 2, 0, generator=seeded()), images)
    exact = gradient(lambda x: topk_log_volume_exact(tiny_encoder64, x, k), images)
    assert (cosine(warm, exact) >= 0.999).all()
    assert (cosine(warm, exact) > cosine(fresh, exact)).all()


def test_a_memory_that_does_not_fit_the_batch_starts_fresh(tiny_encoder64):
    images = rand_images(2, (3, TINY_SIZE, TINY_SIZE), seed=23)
    memory = SketchMemory()
    topk_log_volume(tiny_encoder64, images[:1], power_iters=0, generator=seeded(), memory=memory)
    assert memory.directions.shape == (1, 11, 3, TINY_SIZE, TINY_SIZE)
    value = topk_log_volume(tiny_encoder64, images, power_iters=0, generator=seeded(3), memory=memory)
    torch.testing.assert_close(value, topk_log_volume(tiny_encoder64, images, power_iters=0, generator=seeded(3)))
    assert memory.directions.shape == (2, 11, 3, TINY_SIZE, TINY_SIZE)


BAD_SETTINGS = [
    (dict(k=0), "k must be an integer >= 1"),
    (dict(k=2.5), "k must be an integer >= 1"),
    (dict(oversample=-1), "oversample must be an integer >= 0"),
    (dict(power_iters=-1), "power_iters must be an integer >= 0"),
    (dict(k=9, oversample=0), "exceeds min\\(D, N\\) = min\\(8, 48\\)"),
    (dict(k=7, oversample=2), "k \\+ oversample = 7 \\+ 2 exceeds"),
]


@pytest.mark.parametrize("settings,message", BAD_SETTINGS)
def test_bad_sketch_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        topk_log_volume(SmoothEncoder(dim=8), rand_images(1), **settings)


def test_one_generator_per_image_is_checked():
    with pytest.raises(ValueError, match="got 1 generators for a batch of 2 images"):
        topk_log_volume(SmoothEncoder(dim=8), rand_images(2), k=3, generator=[seeded()])


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        topk_log_volume(SmoothEncoder(dim=8), rand_images(1) * 255, k=3)
