"""LPIPS (AlexNet) from local weights, SGMS's minority-score distance (guidance/lpips.py, guidance/lpips_weights.py;
docs/method.md, 'Self-guided minority sampling'): a random AlexNet with the lpips package's own linear heads,
saved in the published layout and loaded back through the real loader, against the authors' package."""

from __future__ import annotations

import importlib.resources
import re
import shutil
import warnings

import lpips as authors
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from guidance.generate import generate_images
from guidance.lpips import MIN_SIDE, load_lpips, shared_lpips
from guidance.lpips_weights import BACKBONE_FILE, HEADS_FILE, check_lpips_weights
from guidance.methods import SamplingConfig, SgmsConfig
from guidance.models import WorkItem
from guidance.presets import load_model
from guidance.sgms import SelfGuided
from jobs import generate as generate_job
from pipeline.generate.config import load_config
from pipeline.generate.sampler_stage import load_models
from tests import tiny_diffusion

AUTHORS_HEADS = importlib.resources.files(authors) / "weights" / "v0.1" / "alex.pth"  # shipped in the lpips wheel


@pytest.fixture(scope="module")
def reference():
    """The authors' LPIPS: a random AlexNet (nothing downloaded), their published v0.1 heads, in float64."""
    torch.manual_seed(0)
    with warnings.catch_warnings():  # their package still passes torchvision the deprecated pretrained=
        warnings.simplefilter("ignore", UserWarning)
        model = authors.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    return model.double()


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory):
    """The reference's weights in the published layout: torchvision's AlexNet names in a pre-1.6 torch file (as
    torch hub's alexnet-owt-7be5be79.pth; the classifier left out), the heads file as the lpips wheel ships it."""
    folder = tmp_path_factory.mktemp("lpips")
    features = {f"features.{name.split('.', 2)[2]}": tensor.float()
                for name, tensor in reference.state_dict().items() if name.startswith("net.")}
    torch.save(features, folder / BACKBONE_FILE, _use_new_zipfile_serialization=False)
    shutil.copyfile(AUTHORS_HEADS, folder / HEADS_FILE)
    return folder


def images(seed: int, shape=(3, 3, 36, 40)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_distance_is_the_authors_lpips_on_the_same_weights(reference, folder):
    ours = load_lpips(folder).double()
    x, y = images(1), images(2)
    expected = reference(x, y, normalize=True).flatten()  # their [0, 1] input mode
    assert (expected > 0.05).all(), expected  # far above the tolerance: a wrong layer or head would show
    torch.testing.assert_close(ours(x, y), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours(x, y)[1:2], ours(x[1:2], y[1:2]), rtol=0, atol=1e-12)  # rows independent


def test_identical_images_are_at_zero_and_the_gradient_flows(folder):
    ours = load_lpips(folder).double()
    x, y = images(3), images(4)
    assert torch.equal(ours(x, x), torch.zeros(3, dtype=torch.float64))
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(ours(x, y).sum(), x)
    assert grad.abs().amax() > 0
    step, direction = 1e-5, images(5) - 0.5
    slope = (ours(x + step * direction, y) - ours(x - step * direction, y)).sum() / (2 * step)
    torch.testing.assert_close((grad * direction).sum(), slope.detach(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("damage,message", [
    (lambda folder: shutil.rmtree(folder), "LPIPS weights folder not found: {folder}"),
    (lambda folder: (folder / HEADS_FILE).unlink(), f"LPIPS weights folder {{folder}} has no {HEADS_FILE}"),
    (lambda folder: shutil.copyfile(folder / BACKBONE_FILE, folder / HEADS_FILE),
     f"LPIPS weights {{folder}}/{HEADS_FILE} lack 5 tensor(s) (lin0.model.1.weight"),
    (lambda folder: torch.save({"features.0.weight": torch.zeros(64, 3, 7, 7)}, folder / BACKBONE_FILE),
     f"LPIPS weights {{folder}}/{BACKBONE_FILE} lack 9 tensor(s)"),
    (lambda folder: (folder / BACKBONE_FILE).write_bytes((folder / BACKBONE_FILE).read_bytes()[:5000]),
     f"could not read LPIPS weights {{folder}}/{BACKBONE_FILE} (truncated"),
])
def test_bad_weights_are_refused_before_anything_loads(folder, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    damage(broken)
    with pytest.raises((ValueError, OSError), match="^" + re.escape(message.format(folder=broken))):
        check_lpips_weights(broken)


def test_wrong_shapes_and_non_finite_weights_are_refused(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    heads = torch.load(broken / HEADS_FILE, map_location="cpu", weights_only=True)
    torch.save(heads | {"lin4.model.1.weight": torch.ones(1, 512, 1, 1)}, broken / HEADS_FILE)
    with pytest.raises(ValueError, match=re.escape("lin4.model.1.weight (1, 512, 1, 1) (AlexNet's is (1, 256, 1, 1))")):
        check_lpips_weights(broken)
    torch.save(heads | {"lin4.model.1.weight": torch.full((1, 256, 1, 1), float("nan"))}, broken / HEADS_FILE)
    with pytest.raises(ValueError, match=re.escape("hold NaN or infinite values in 1 tensor(s) (heads.4)")):
        load_lpips(broken)


def test_absent_weights_are_refused_in_one_line_at_preflight_and_a_sampler_loads_them_once(
        write_config, folder, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    sampling = {"method": "sgms", "steps": 2, "sgms": {"distance": "lpips", "lpips_weights": str(missing)}}
    assert generate_job.main([write_config(sampling=sampling), "--dry-run"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"jepa-minority generate: sampling.sgms.lpips_weights: LPIPS weights folder not found: "
                           f"{missing}; give a folder holding {BACKBONE_FILE}")
    sampling["sgms"]["lpips_weights"] = str(folder)
    path = write_config(sampling=sampling)
    assert generate_job.main([path, "--dry-run"]) == 0
    config = load_config(path)
    shared_lpips.cache_clear()
    model, _ = load_models(config, "cpu")  # the sampler actor's loading: LPIPS beside the model and encoder
    assert shared_lpips.cache_info().currsize == 1
    method = SelfGuided.build(config.sampling, model, [WorkItem(1, 0)], None)
    assert method.distance is shared_lpips(str(folder), model.device) and shared_lpips.cache_info().misses == 1


@pytest.fixture(scope="module")
def model32(tmp_path_factory):
    """The tiny class UNet at 32 x 32 (fully convolutional: the size is its config's), past AlexNet's 31-px least."""
    unet = tiny_diffusion.tiny_unet(num_classes=10)
    unet.register_to_config(sample_size=32)
    folder = tmp_path_factory.mktemp("unet32")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return load_model("pixel-unet", folder)


def test_sgms_with_lpips_guides_and_a_batch_equals_single_rows(model32, folder):
    items = [WorkItem(1, 3), WorkItem(2, 7)]
    config = SamplingConfig(method="sgms", steps=2, sgms=SgmsConfig(strength=200.0, tau=1.0, distance="lpips",
                                                                    lpips_weights=str(folder)))
    batched, steps = generate_images(model32, items, config)
    assert steps == 2
    single, _ = generate_images(model32, items[1:], config)
    torch.testing.assert_close(batched[1:], single, rtol=0, atol=1e-4)  # as the pixels distance's test (test_sgms.py)
    unguided, _ = generate_images(model32, items, SamplingConfig(method="unguided", steps=2))
    assert (batched - unguided).abs().amax((1, 2, 3)).min() > 1e-3  # the LPIPS gradient moves every row


def test_images_smaller_than_alexnet_takes_are_refused(folder):
    small = images(6, (1, 3, MIN_SIDE - 1, 64)).float()
    with pytest.raises(ValueError, match=f"^sgms.distance lpips needs images of at least {MIN_SIDE} x {MIN_SIDE}"):
        shared_lpips(str(folder), torch.device("cpu"))(small, small)
