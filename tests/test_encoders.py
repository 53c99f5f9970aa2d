"""load_encoder: every weights source through the real loading code; bad weights fail clearly."""

from __future__ import annotations

import logging

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from guidance import ENCODERS, load_encoder
from guidance.encoders import check_encoder_weights
from tests.conftest import ENCODER_NAME, TINY_ARGS, TINY_SIZE, build_tiny_vit


def expected_embedding(model, images, mean, std):
    """CLS token after the final norm, computed from timm's features directly."""
    tokens = model.forward_features((images - mean) / std)
    return tokens[:, 0]


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_small_patch14_dinov2"])
def test_folder_weights_give_the_cls_token_after_the_final_norm(tmp_path, name):
    model = build_tiny_vit(name, seed=3)
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    encoder = load_encoder(name, tmp_path, input_size=TINY_SIZE)
    images = torch.rand(2, 3, TINY_SIZE, TINY_SIZE)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        got = encoder(images)
        want = expected_embedding(model, images, mean, std)
    assert got.shape == (2, TINY_ARGS["embed_dim"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.norm(dim=1), torch.ones(2))  # not L2-normalised


def test_mean_and_std_come_from_timms_pretrained_config(tiny_encoder):
    cfg = timm.create_model(ENCODER_NAME, pretrained=False, **TINY_ARGS).pretrained_cfg
    assert tiny_encoder.mean.flatten().tolist() == pytest.approx(cfg["mean"])
    assert tiny_encoder.std.flatten().tolist() == pytest.approx(cfg["std"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_single_file_weights_load_the_same_model(tmp_path, tiny_encoder, suffix):
    state = build_tiny_vit().state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path)
    encoder = load_encoder(ENCODER_NAME, path, input_size=TINY_SIZE, model_args=TINY_ARGS)
    images = torch.rand(3, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), tiny_encoder(images))


def test_weights_are_really_loaded_not_random(tiny_vit_folder):
    loaded = [load_encoder(ENCODER_NAME, tiny_vit_folder, input_size=TINY_SIZE) for _ in range(2)]
    random = load_encoder(ENCODER_NAME, "random", input_size=TINY_SIZE, model_args=TINY_ARGS)
    images = torch.rand(2, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded[0](images), loaded[1](images))
        assert not torch.allclose(loaded[0](images), random(images))


def test_random_weights_only_when_asked_and_announced(caplog):
    with caplog.at_level(logging.WARNING):
        encoder = load_encoder(ENCODER_NAME, "random", input_size=TINY_SIZE, model_args=TINY_ARGS)
    assert encoder.embed_dim == TINY_ARGS["embed_dim"]
    assert "RANDOM weights" in caplog.text


def test_encoder_is_frozen_fp32_eval_on_the_math_attention_path(tiny_encoder):
    assert not tiny_encoder.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in tiny_encoder.parameters())
    attention = [m for m in tiny_encoder.modules() if hasattr(m, "fused_attn")]
    assert attention and not any(m.fused_attn for m in attention)
    out = tiny_encoder(torch.rand(1, 3, TINY_SIZE, TINY_SIZE, dtype=torch.bfloat16))
    assert out.dtype == torch.float32


def test_math_attention_is_scoped_to_the_encoder(tiny_encoder):
    other = timm.create_model(ENCODER_NAME, pretrained=False, img_size=TINY_SIZE, **TINY_ARGS)
    default = timm.layers.use_fused_attn()
    assert all(m.fused_attn == default for m in other.modules() if hasattr(m, "fused_attn"))
    assert default, "this torch build should default to fused attention, else the check above proves nothing"


@pytest.mark.parametrize("antialias", [False, True])
def test_resize_to_input_size_is_bilinear_with_configurable_antialias(tiny_vit_folder, antialias):
    encoder = load_encoder(ENCODER_NAME, tiny_vit_folder, input_size=TINY_SIZE, antialias=antialias)
    images = torch.rand(2, 3, 56, 56)
    resized = F.interpolate(images, size=(TINY_SIZE, TINY_SIZE), mode="bilinear", align_corners=False,
                            antialias=antialias)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), encoder(resized))
    torch.testing.assert_close(encoder.resize(images), resized)


def test_antialias_is_off_by_default(tiny_encoder):
    assert tiny_encoder.antialias is False


def test_table_lists_dinov2_with_and_without_registers_in_all_sizes():
    for size in ("small", "base", "large", "giant"):
        for registers in ("", "_reg4"):
            assert f"vit_{size}_patch14{registers}_dinov2" in ENCODERS


def test_unknown_encoder_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown encoder 'dino'.*vit_small_patch14_reg4_dinov2"):
        load_encoder("dino", "random")


def test_missing_weights_file_is_an_error_never_a_random_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder weights not found.*'random'"):
        load_encoder(ENCODER_NAME, tmp_path / "absent.safetensors")


def test_pickle_checkpoint_that_is_not_weights_only_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": build_tiny_vit()}, path)  # pickles the module class, not just tensors
    with pytest.raises(ValueError, match="not weights-only"):
        load_encoder(ENCODER_NAME, path, input_size=TINY_SIZE, model_args=TINY_ARGS)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(build_tiny_vit().state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="could not read encoder weights"):
        load_encoder(ENCODER_NAME, path, input_size=TINY_SIZE, model_args=TINY_ARGS)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "deeper.safetensors"
    safetensors.torch.save_file(build_tiny_vit(depth=3).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit the encoder architecture"):
        load_encoder(ENCODER_NAME, path, input_size=TINY_SIZE, model_args=TINY_ARGS)


def test_folder_of_another_architecture_is_refused(tiny_vit_folder):
    with pytest.raises(ValueError, match="holds a 'vit_small_patch14_reg4_dinov2', not the requested"):
        load_encoder("vit_base_patch14_dinov2", tiny_vit_folder, input_size=TINY_SIZE)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_encoder(ENCODER_NAME, tmp_path)


def test_unsupported_weights_suffix_is_refused(tmp_path):
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="must end in one of"):
        load_encoder(ENCODER_NAME, path)


def test_hub_weights_offline_fail_with_instructions(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="could not fetch weights.*pass weights="):
        load_encoder(ENCODER_NAME, "hub:lvd142m", input_size=TINY_SIZE, model_args=TINY_ARGS)


@pytest.mark.parametrize("size", [0, 30])
def test_input_size_must_be_a_multiple_of_the_patch(size):
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        load_encoder(ENCODER_NAME, "random", input_size=size)


@pytest.mark.gpu
def test_encoder_on_cuda_matches_cpu(tiny_vit_folder):
    cpu = load_encoder(ENCODER_NAME, tiny_vit_folder, input_size=TINY_SIZE)
    gpu = load_encoder(ENCODER_NAME, tiny_vit_folder, input_size=TINY_SIZE).cuda()
    images = torch.rand(2, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(gpu(images.cuda()).cpu(), cpu(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_holding_nan_or_inf_are_refused_at_load(tmp_path, suffix, value):
    """Every embedding, and so every score, would be NaN: refused before any image is scored."""
    state = build_tiny_vit().state_dict()
    state["blocks.1.mlp.fc1.weight"][3, 2] = value
    path = tmp_path / f"diverged{suffix}"
    safetensors.torch.save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    message = (f"encoder weights {path} hold NaN or infinite values in 1 tensor(s) (blocks.1.mlp.fc1.weight): "
               "the checkpoint is broken; use another one")
    with pytest.raises(ValueError) as refused:
        load_encoder(ENCODER_NAME, path, input_size=TINY_SIZE, model_args=TINY_ARGS)
    assert str(refused.value) == message
    if suffix == ".safetensors":  # the light check (generate's preflight) reads the tensors too, building nothing
        with pytest.raises(ValueError) as light:
            check_encoder_weights(ENCODER_NAME, path)
        assert str(light.value) == message


def test_a_folder_that_states_its_input_size_runs_at_it_unless_told_otherwise(tiny_vit_folder):
    """`jepa-minority score --weights models/digits-sigreg-vit` needs no --input-size: the folder says 56."""
    assert load_encoder(ENCODER_NAME, tiny_vit_folder).input_size == TINY_SIZE
    assert load_encoder(ENCODER_NAME, tiny_vit_folder, input_size=2 * TINY_SIZE).input_size == 2 * TINY_SIZE
