"""Shared fixtures: tiny DINOv2-architecture ViTs saved and loaded through the product's code, and
closed-form parts whose right answers are known: encoders (their Jacobians), Gaussian data's denoiser
and a guidance objective with a closed-form gradient."""

from __future__ import annotations

import os
import tempfile

# Hugging Face `datasets` reads its cache folder once, when first imported, and reuses a cached copy of a
# folder it has loaded before: every test session gets a fresh one, so no test reads another run's rows.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hf-datasets-")

import numpy as np
import pytest
import timm
import torch
import yaml
from torch import nn

from guidance import load_encoder
from pipeline.generate.preflight import for_device
from pipeline.generate.work import build_manifest
from pipeline.settings import TrackingConfig

ENCODER_NAME = "vit_small_patch14_reg4_dinov2"
TINY_SIZE = 28  # 2 x 2 patches of 14 pixels
# A DINOv2-S architecture shrunk to test size; LayerScale at 1 so the blocks matter at random init.
TINY_ARGS = dict(embed_dim=32, depth=2, num_heads=2, init_values=1.0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def migrated_mlflow_stores(tmp_path_factory):
    """Every new MLflow store of a test starts as a copy of one store migrated once (tests/private_apis.py)."""
    from tests.private_apis import migrate_new_mlflow_stores_once

    undo = migrate_new_mlflow_stores_once(tmp_path_factory.mktemp("mlflow_schema"))
    yield
    undo()


def build_tiny_vit(name: str = ENCODER_NAME, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    args = TINY_ARGS | overrides
    return timm.create_model(name, pretrained=False, img_size=TINY_SIZE, num_classes=0, **args).eval()


@pytest.fixture(scope="session")
def tiny_vit_folder(tmp_path_factory):
    """A tiny random DINOv2 ViT saved in timm's folder layout (config.json + model.safetensors)."""
    folder = tmp_path_factory.mktemp("tiny_dinov2")
    timm.models.save_for_hf(build_tiny_vit(), folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_encoder(tiny_vit_folder):
    return load_encoder(ENCODER_NAME, tiny_vit_folder, input_size=TINY_SIZE)


@pytest.fixture(scope="session")
def tiny_encoder64(tiny_vit_folder):
    """The same tiny encoder in float64, for comparisons that must agree to 1e-6 or better."""
    return load_encoder(ENCODER_NAME, tiny_vit_folder, input_size=TINY_SIZE).double()


class LinearEncoder(nn.Module):
    """f(x) = A x with A = U diag(sigma) V^T: the Jacobian is A, its singular values are sigma."""

    def __init__(self, sigma: torch.Tensor, image_shape=(3, 4, 4), seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.Size(image_shape).numel()
        u = torch.linalg.qr(torch.randn(len(sigma), len(sigma), generator=generator, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(pixels, len(sigma), generator=generator, dtype=torch.float64)).Q
        self.register_buffer("matrix", u @ torch.diag(sigma.double()) @ v.T)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) @ self.matrix.T


class SmoothEncoder(nn.Module):
    """f(x) = W2 tanh(W1 x + b): a small smooth nonlinear encoder (float64), full rank D."""

    def __init__(self, dim: int = 8, hidden: int = 24, image_shape=(3, 4, 4), seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.Size(image_shape).numel()
        self.w1 = nn.Parameter(torch.randn(hidden, pixels, generator=generator, dtype=torch.float64) / pixels**0.5)
        self.b = nn.Parameter(torch.randn(hidden, generator=generator, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(dim, hidden, generator=generator, dtype=torch.float64) / hidden**0.5)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(images.flatten(1) @ self.w1.T + self.b) @ self.w2.T


class GaussianDenoiser:
    """The exact noise prediction for data x0 ~ N(0, s^2 I): E[eps | x_t] = c_t x_t with
    c_t = sqrt(1 - abar_t) / (abar_t s^2 + 1 - abar_t) (float64; ``abar`` from a NoiseSchedule)."""

    def __init__(self, alphas_cumprod: torch.Tensor, data_std: float):
        self.alphas_cumprod = alphas_cumprod.double()
        self.data_std = data_std

    def gain(self, t: int) -> float:
        abar = float(self.alphas_cumprod[t])
        return (1 - abar) ** 0.5 / (abar * self.data_std**2 + 1 - abar)

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return self.gain(t) * x


def feature_energy(encoder, images, k, oversample, power_iters, generator=None, memory=None) -> torch.Tensor:
    """A guidance objective with a closed-form gradient: 1/2 ||f(x)||^2 per image, so for a
    LinearEncoder f(x) = A x the gradient is A^T A x. Same signature as the top-k objectives."""
    return 0.5 * encoder(images.double()).square().sum(1)


# Pinned values, diffusers' golden slices: computed once on CPU with the torch of infra/constraints.txt. fp32
# noise between CPUs is about 1e-6; the smallest change a pinned test guards moves its slice by 7e-4.
PINNED_ATOL = 1e-4


def assert_pinned(images, expected: list[float]) -> None:
    """The first image's last channel, bottom-right 3 x 3 pixels, against pinned values. ``images``: NHWC
    numpy (as the diffusers pipelines return them) or NCHW torch (as generate_images does)."""
    if isinstance(images, torch.Tensor):
        images = images.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images[0, -3:, -3:, -1].ravel(), expected, atol=PINNED_ATOL, rtol=0)


def rand_images(batch: int, shape=(3, 4, 4), seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.rand((batch, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-protocol server on 127.0.0.1 with authentication; its user's keys are in the
    environment (the standard AWS chain), as a user's would be, for the driver and Ray workers."""
    from tests.services import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("moto") / "moto.log")
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update({"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """A local Ray cluster on loopback (2 CPUs), started after the AWS environment so workers inherit it.

    Ray ends an idle worker process beyond the CPU count after a second, so each test's pipeline would
    start its task workers afresh and import Ray Data again (seconds each on two cores): the session's
    cluster keeps up to 8 idle workers for the tests that follow, as a long job's cluster would."""
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             _system_config={"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 3_600_000})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def class_unet(tmp_path_factory):
    from tests import tiny_diffusion

    return tiny_diffusion.save_pixel_unet(tmp_path_factory.mktemp("class_unet"), num_classes=10)


def tracking_section(folder) -> dict:
    """An MLflow store under ``folder``/mlruns: runs in sqlite, artifacts beside them."""
    return {"tracking_uri": f"sqlite:///{folder}/mlruns/mlflow.db", "artifact_location": str(folder / "mlruns" / "artifacts")}


@pytest.fixture
def tracking(tmp_path):
    return TrackingConfig(**tracking_section(tmp_path))


@pytest.fixture
def write_config(tmp_path, class_unet, tiny_vit_folder):
    """A YAML config for the tiny class-conditional job, with per-test changes merged in."""

    def write(**sections) -> str:
        config = {
            "model": {"preset": "pixel-unet", "source": str(class_unet)},
            "encoder": {"name": ENCODER_NAME, "weights": str(tiny_vit_folder), "input_size": TINY_SIZE},
            "sampling": {"method": "jepa", "steps": 3, "guidance": {"tau": 1.0, "k": 4}},
            "work": {"class_labels": [0, 3, 7], "samples_per_label": 4},
            "output": {"uri": str(tmp_path / "out"), "max_rows_per_file": 4, "row_group_size": 2},
            "ray": {"actors": 2, "cpus_per_actor": 0.5, "batch_size": 2},
            "tracking": tracking_section(tmp_path),
        }
        for section, values in sections.items():
            config[section] = config.get(section, {}) | values
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    return write


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """A tiny Stable Diffusion pipeline folder (UNet, VAE, CLIP text encoder and tokenizer)."""
    from tests import tiny_diffusion

    root = tmp_path_factory.mktemp("sd")
    return tiny_diffusion.save_sd(root / "pipeline", root / "scratch")


@pytest.fixture(scope="session")
def nan_class_unet(tmp_path_factory):
    """The tiny class UNet with a broken (NaN) embedding for class 9: every class-9 sample fails."""
    from diffusers import DDPMPipeline

    from tests import tiny_diffusion

    folder = tmp_path_factory.mktemp("nan_class_unet")
    pipeline = DDPMPipeline.from_pretrained(tiny_diffusion.save_pixel_unet(folder, num_classes=10))
    with torch.no_grad():
        pipeline.unet.class_embedding.weight[9] = float("nan")
    pipeline.save_pretrained(folder)
    return folder


def cpu_manifest(config):
    """The manifest as a run on CPU samplers makes it (model.dtype resolved)."""
    return build_manifest(for_device(config, gpus_per_actor=0.0))


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """Random Inception-v3 weights in torch-fidelity's layout (torchvision's modules, a 1008-way fc), with
    batch-norm statistics taken from random images so that features stay near unit scale."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 299, 299) * 2 - 1)
    fc = torch.nn.Linear(2048, 1008)
    state = model.state_dict() | {"fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()}
    state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random open_clip model: its config .json and its weights file."""
    import json

    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                              "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / "tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip").eval()
    torch.save(model.state_dict(), folder / "tiny-clip.pt")
    return folder / "tiny-clip.json", folder / "tiny-clip.pt", model
