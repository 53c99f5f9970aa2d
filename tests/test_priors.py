"""Pluggable world priors: any timm ViT and open_clip ViT image towers beside the DINOv2 table.

Tiny random models are built here, saved as users save them (timm's ``save_for_hf`` folder, a
safetensors file, an open_clip state dict), loaded back through ``load_encoder`` and compared
with the in-memory model; then the Jacobian machinery, the configs, ``score`` and the sampler stage.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import open_clip
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from guidance import jepa_score, jepa_scores, load_encoder, topk_log_volume
from guidance.encoder_specs import FAMILIES, encoder_dims
from guidance.encoders import MathMultiheadAttention, OpenClipTower
from guidance.reference import jepa_score_naive
from jobs import score as score_job
from pipeline.evaluate.features import ClipScorer
from pipeline.generate.config import EncoderConfig, load_config
from pipeline.generate.sampler_stage import SampleGenerator
from tests.conftest import cpu_manifest
from pipeline.settings import ConfigError

VIT = "vit_tiny_patch16_224"  # not in the DINOv2 table: patch 16, one CLS token, no registers
VIT_ARGS = dict(embed_dim=32, depth=2, num_heads=2)
SIZE = 32  # 2 x 2 patches of 16 pixels
MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)  # not ImageNet's: proves they come from the saved config
CLIP_CONFIG = {"embed_dim": 16,
               "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
               "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


def tiny_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(VIT, pretrained=False, img_size=SIZE, num_classes=0, **(VIT_ARGS | overrides)).eval()
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=MEAN, std=STD, input_size=(3, SIZE, SIZE))
    return model


def normalise(images: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory, vit):
    folder = tmp_path_factory.mktemp("tiny_vit")
    timm.models.save_for_hf(vit, folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """(model config .json, state dict .pt, the in-memory model) of a tiny open_clip ViT."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    config = folder / "TinyClipViT.json"
    config.write_text(json.dumps(CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(1)
    model = open_clip.create_model("TinyClipViT", pretrained=None).eval()
    torch.save(model.state_dict(), folder / "tiny_clip.pt")
    return str(config), str(folder / "tiny_clip.pt"), model


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_a_timm_folder_gives_the_cls_token_after_the_final_norm_with_its_own_mean_std_and_size(vit, vit_folder):
    encoder = load_encoder(f"timm:{VIT}", vit_folder)
    assert encoder.input_size == SIZE and encoder.embed_dim == 32
    torch.testing.assert_close(encoder.mean.flatten(), torch.tensor(MEAN))
    torch.testing.assert_close(encoder.std.flatten(), torch.tensor(STD))
    x = images()
    with torch.no_grad():
        want = vit.forward_features(normalise(x))[:, 0]  # forward_features ends with the final norm
        torch.testing.assert_close(encoder(x), want, rtol=1e-5, atol=1e-5)


def test_pool_output_is_the_mean_of_the_patch_tokens(vit, vit_folder):
    encoder = load_encoder(f"timm:{VIT}", vit_folder, output="pool")
    x = images()
    with torch.no_grad():
        want = vit.forward_features(normalise(x))[:, 1:].mean(1)
        torch.testing.assert_close(encoder(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(  # pinned; the CLS token (output "cls") would move it by 3.4
            encoder(x)[0, :6], torch.tensor([-1.041489, -0.188593, 0.357479, -0.526506, -1.968113, -0.101053]),
            atol=1e-4, rtol=0)


def test_a_new_family_is_one_row_of_the_family_table(vit, vit_folder, monkeypatch):
    """A made-up family ``vit:`` over timm, patch 16, added as one row: named, checked, sized and loaded by it."""
    monkeypatch.setitem(FAMILIES, "vit", replace(FAMILIES["timm"], name="vit", prefix="vit:", patch=16))
    encoder, same = (load_encoder(f"{prefix}{VIT}", vit_folder, output="pool") for prefix in ("vit:", "timm:"))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), same(x), rtol=0, atol=0)
    assert encoder_dims(f"vit:{VIT}", vit_folder) == (32, SIZE)
    with pytest.raises(ValueError, match="input_size must be a positive multiple of the patch size 16, got 24"):
        load_encoder(f"vit:{VIT}", vit_folder, input_size=24)


def test_a_timm_safetensors_file_loads_the_same_model(vit, vit_folder, tmp_path):
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    encoder = load_encoder(f"timm:{VIT}", tmp_path / "vit.safetensors", input_size=SIZE, model_args=VIT_ARGS)
    x = images()
    with torch.no_grad():
        # A bare weights file carries no config: mean / std are those of timm's registry for the name.
        mean, std = encoder.mean.flatten().tolist(), encoder.std.flatten().tolist()
        want = vit.forward_features(normalise(x, mean, std))[:, 0]
        torch.testing.assert_close(encoder(x), want, rtol=1e-5, atol=1e-5)


def test_open_clip_tower_is_encode_image_with_its_preprocess_config(clip_files):
    config, weights, model = clip_files
    encoder = load_encoder(f"open_clip:{config}", weights)
    assert isinstance(encoder.backbone, OpenClipTower) and encoder.input_size == SIZE and encoder.embed_dim == 16
    preprocess = open_clip.get_model_preprocess_cfg(model)
    x = images()
    with torch.no_grad():
        want = model.encode_image(normalise(x, preprocess["mean"], preprocess["std"]))
        torch.testing.assert_close(encoder(x), want, rtol=1e-5, atol=1e-5)
        pooled = load_encoder(f"open_clip:{config}", weights, output="pool")(x)
        tokens = model.visual.transformer(model.visual._embeds(normalise(x, preprocess["mean"], preprocess["std"])))
        torch.testing.assert_close(pooled, model.visual.ln_post(tokens)[:, 1:].mean(1) @ model.visual.proj,
                                   rtol=1e-5, atol=1e-5)


def test_the_clip_score_and_the_prior_share_one_open_clip_loader(clip_files):
    config, weights, model = clip_files
    scorer = ClipScorer(config, weights, "cpu")
    encoder = load_encoder(f"open_clip:{config}", weights)
    for name, tensor in model.visual.state_dict().items():
        torch.testing.assert_close(scorer.model.visual.state_dict()[name], tensor)
        torch.testing.assert_close(encoder.backbone.visual.state_dict()[name], tensor)


@pytest.mark.parametrize("family", ["timm", "open_clip"])
def test_exact_score_and_guidance_gradient_run_on_the_math_path(family, vit_folder, clip_files):
    name, weights = (f"timm:{VIT}", vit_folder) if family == "timm" else (f"open_clip:{clip_files[0]}", clip_files[1])
    encoder = load_encoder(name, weights).double()
    x = images(2, seed=3).double()
    exact, _ = jepa_scores(encoder, x, 4)  # vmapped VJPs
    naive = jepa_score_naive(encoder, x)
    assert ((exact - naive).abs() / naive.abs()).max() < 1e-6
    xg = x.clone().requires_grad_(True)
    topk_log_volume(encoder, xg, 4, 2, 2, torch.Generator().manual_seed(0)).sum().backward()  # JVPs, double backward
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0



def test_the_math_path_is_scoped_to_the_tower(clip_files):
    config, weights, model = clip_files
    encoder = load_encoder(f"open_clip:{config}", weights)
    kinds = {type(m) for m in encoder.backbone.modules()}
    assert MathMultiheadAttention in kinds and torch.nn.MultiheadAttention not in kinds
    assert not any(isinstance(m, MathMultiheadAttention) for m in model.modules())  # the in-memory model untouched
    assert not any(isinstance(m, MathMultiheadAttention) for m in ClipScorer(config, weights, "cpu").model.modules())


BAD = [
    ("timm:resnet18", "random", {}, "not a timm VisionTransformer"),
    ("timm:vit_nosuch_patch16", "random", {}, "unknown to timm; not a timm VisionTransformer"),
    ("open_clip:NoSuchArch", "x.pt", {}, "unknown open_clip architecture 'NoSuchArch'"),
    ("dinov3", "random", {}, "unknown encoder 'dinov3'; give a DINOv2 name"),
    (f"timm:{VIT}", "random", {"output": "avg"}, "output must be one of cls, pool"),
    (f"timm:{VIT}", "random", {"input_size": 0}, "input_size must be a positive integer, got 0"),
]


@pytest.mark.parametrize("name,weights,options,message", BAD, ids=[b[0] + str(b[2]) for b in BAD])
def test_bad_names_and_outputs_are_refused_in_one_line(name, weights, options, message):
    with pytest.raises(ValueError, match=message) as error:
        load_encoder(name, weights, **options)
    assert "\n" not in str(error.value)


def test_bad_weights_are_refused_never_random_nor_the_hub(clip_files, vit_folder, tmp_path):
    config, weights, _ = clip_files
    with pytest.raises(ValueError, match="loads from a local open_clip checkpoint file"):
        load_encoder(f"open_clip:{config}", "hub")
    with pytest.raises(FileNotFoundError, match="open_clip weights not found"):
        load_encoder(f"open_clip:{config}", tmp_path / "missing.pt")
    other = dict(CLIP_CONFIG, vision_cfg=dict(CLIP_CONFIG["vision_cfg"], width=48))
    (tmp_path / "WiderClipViT.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="could not load open_clip weights .* into WiderClipViT") as error:
        load_encoder(f"open_clip:{tmp_path / 'WiderClipViT.json'}", weights)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="holds a 'vit_tiny_patch16_224', not the requested 'vit_small_patch16_224'"):
        load_encoder("timm:vit_small_patch16_224", vit_folder)
    save_file(tiny_vit(embed_dim=48).state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="do not fit the encoder architecture") as error:
        load_encoder(f"timm:{VIT}", tmp_path / "wide.safetensors", input_size=SIZE, model_args=VIT_ARGS)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="runs at its own input size 32"):
        load_encoder(f"open_clip:{config}", weights, input_size=64)


def test_cls_output_of_a_vit_without_a_cls_token_is_refused(tmp_path):
    folder = tmp_path / "gap"
    timm.models.save_for_hf(tiny_vit(class_token=False, global_pool="avg"), folder, safe_serialization=True)
    with pytest.raises(ValueError, match="has no CLS token: use output 'pool'"):
        load_encoder(f"timm:{VIT}", folder)
    assert load_encoder(f"timm:{VIT}", folder, output="pool").embed_dim == 32


def test_the_generation_config_takes_them_and_refuses_bad_ones_naming_the_key(clip_files):
    config = EncoderConfig(name=f"open_clip:{clip_files[0]}", weights=clip_files[1], output="pool")
    assert config.input_size is None
    with pytest.raises(ConfigError, match="^encoder: .*loads from a local open_clip checkpoint"):
        EncoderConfig(name=f"open_clip:{clip_files[0]}")
    with pytest.raises(ConfigError, match="^encoder: output must be one of cls, pool"):
        EncoderConfig(output="mean")
    with pytest.raises(ConfigError, match="^encoder.name: unknown encoder 'timm:'"):
        EncoderConfig(name="timm:")


def test_score_cli_ranks_with_an_open_clip_prior(clip_files, tmp_path, capsys):
    config, weights, _ = clip_files
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    argv = [str(tmp_path), "--encoder", f"open_clip:{config}", "--weights", weights, "--encoder-output", "pool"]
    assert score_job.main(argv) == 0
    printed = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    encoder = load_encoder(f"open_clip:{config}", weights, output="pool")
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p)).copy()).permute(2, 0, 1).float() / 255
                          for p in sorted(tmp_path.glob("*.png"))])
    want = dict(zip(sorted(str(p) for p in tmp_path.glob("*.png")), jepa_score(encoder, pixels).tolist()))
    assert {path: float(score) for _, score, path in printed} == pytest.approx(want, abs=1e-3)
    assert score_job.main([str(tmp_path), "--encoder", "timm:resnet18", "--weights", "random"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_sampler_stage_guides_and_scores_with_a_timm_prior(write_config, vit_folder, tmp_path):
    """What a generate actor and a Serve replica load (load_models), guided and scored end to end."""
    path = write_config(encoder={"name": f"timm:{VIT}", "weights": str(vit_folder), "input_size": None,
                                 "output": "pool"}, work={"class_labels": [1], "samples_per_label": 2})
    config = load_config(path)
    stage = SampleGenerator(config, "run-1")
    assert stage.load_error is None and stage.encoder.name == f"timm:{VIT}"
    rows = stage(cpu_manifest(config).table).to_pylist()
    assert len(rows) == 2 and all(row["encoder"] == f"timm:{VIT}" and len(row["embedding"]) == 32 for row in rows)
    assert all(np.isfinite(row["jepa_score"]) and np.isfinite(row["topk_score"]) for row in rows)
    assert yaml.safe_load(open(path))["encoder"]["output"] == "pool"
