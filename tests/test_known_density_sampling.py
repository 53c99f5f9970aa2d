"""The samplers judged against a world of known density (benchmarks/known_density_sampling.py): the readback recovers
rendered latents, the truth metrics score sets whose answer is known, and the quick run reports every field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.known_density_sampling import QUICK, SGMS, World, build_truth, grey_pixels, \
    minority_test_inputs, read_latents, run


@pytest.fixture(scope="module")
def truth():
    return build_truth(World(), QUICK)


def test_the_readback_recovers_the_latents_of_rendered_images_even_at_the_border():
    world = World()
    z = np.array([[0.0, 0.0], [world.box, -world.box], [-world.box, 0.3], [1.1, world.box]])
    readback = read_latents(world, grey_pixels(world.render(z)))
    np.testing.assert_allclose(readback.latents, z, atol=1e-6)
    assert readback.pixel_error.max() < 1e-6


def test_the_truth_scores_sets_whose_answer_is_known(truth):
    truth, truth_z = truth
    world = truth.world
    log_density = world.log_density(truth_z)
    rarest = truth.measure(grey_pixels(world.render(truth_z[log_density <= truth.threshold][:100])))
    assert rarest["valid_share"] == 1.0 and rarest["rarest_decile_share_of_valid"] == 1.0
    typical = truth.measure(grey_pixels(world.render(truth_z[log_density > np.median(log_density)][:100])))
    assert typical["valid_share"] == 1.0 and typical["rarest_decile_share_of_valid"] == 0.0
    assert typical["mean_true_log_density_of_valid"] > rarest["mean_true_log_density_of_valid"]
    fresh = truth.measure(grey_pixels(world.render(world.sample(2000, np.random.default_rng(99)))))
    assert fresh["valid_share"] == 1.0 and abs(fresh["rarest_decile_share_of_valid"] - 0.10) < 0.02  # the world: 10%
    noise = truth.measure(np.random.default_rng(0).random((100, world.size, world.size)))
    assert noise["valid_share"] == 0.0 and noise["valid_and_rarest_decile_share"] == 0.0
    images = world.render(truth_z[:100])
    smeared = truth.measure(grey_pixels((images + torch.roll(images, 2, dims=-1)) / 2))  # two bumps half-overlapping
    assert smeared["median_pixel_error"] > QUICK.valid_tolerance  # a near miss is measured, not fitted away


@pytest.mark.slow
def test_the_quick_run_reports_every_sampler_and_hands_the_minority_test_its_arrays():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run(QUICK)
    finally:
        torch.set_num_threads(threads)
    record = result.record
    readback = record["readback_on_rendered_images"]
    assert readback["max_latent_error"] < 1e-6 and readback["max_latent_error_8bit"] < 0.01
    assert readback["max_pixel_error_8bit"] <= QUICK.valid_tolerance
    assert record["world_own_draws"]["valid_share"] == 1.0
    assert 0.0 < record["world_own_draws"]["rarest_decile_share_of_valid"] < 0.3
    assert record["guidance_encoder"]["k"] + QUICK.oversample <= 16
    rows = record["samplers"]
    assert set(rows) == {"unguided", "boost-and-skip", f"jepa exact step, eta {QUICK.eta:g}", "control: ascend",
                         "control: random direction", SGMS}
    assert "not implemented" in rows[SGMS]["status"]
    for name, row in rows.items():
        if name != SGMS:
            assert 0 <= row["valid_share"] <= 1 and np.isfinite(row["avg_knn_mean"]), (name, row)
    jepa, ascend = rows[f"jepa exact step, eta {QUICK.eta:g}"], rows["control: ascend"]
    assert jepa["mean_exact_topk_score"] < rows["unguided"]["mean_exact_topk_score"] < ascend["mean_exact_topk_score"]

    inputs = minority_test_inputs(result)
    assert set(inputs["samplers"]) == set(rows) - {SGMS}
    for samples, seeds in inputs["samplers"].values():
        assert samples.shape == (QUICK.samples, 256) and samples.dtype == np.float64
        np.testing.assert_array_equal(seeds, np.arange(QUICK.samples))
    minority, reference = inputs["minority_reference"], inputs["reference"]
    assert minority.shape[1] == reference.shape[1] == 256
    assert len(minority) == pytest.approx(0.1 * len(reference), abs=2)
    minority_z = read_latents(World(), minority.reshape(-1, 16, 16)).latents
    assert (World().log_density(minority_z) <= result.threshold + 1e-6).all()
