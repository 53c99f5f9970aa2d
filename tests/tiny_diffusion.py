"""Tiny random diffusers pipelines of every supported family, saved with ``save_pretrained``.

Built fresh in the tests (seeded), written to a folder, and loaded back through the presets'
loading code, exactly as users' real checkpoints are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


def tiny_unet(num_classes: int | None = None) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_classes,
    )


def save_pixel_unet(folder: Path, num_classes: int | None = None) -> Path:
    """DDPM-format pixel UNet (google/ddpm-* style scheduler: linear betas, clipped x0)."""
    DDPMPipeline(unet=tiny_unet(num_classes), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def truncated_copy(pipeline: Path, folder: Path) -> Path:
    """A copy of a saved pixel-UNet pipeline whose UNet weights file is cut in half (a broken download)."""
    shutil.copytree(pipeline, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def misfit_copy(pipeline: Path, folder: Path) -> Path:
    """A copy of a saved class-conditional UNet pipeline whose config no longer fits its weights: every file
    reads (a preflight passes it), but loading the UNet fails (a mismatched checkpoint)."""
    shutil.copytree(pipeline, folder)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"num_class_embeds": 12}))
    return folder


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )


def save_dit(folder: Path) -> Path:
    """DiT with 1000 classes (the null class 1000 that DiTPipeline hard-codes exists) and a tiny VAE."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=2,
        attention_head_dim=8, num_embeds_ada_norm=1000, norm_num_groups=4,
    )
    DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: every character is a token (plumbing only)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(chars + [c + "</w>" for c in chars])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_text_config(**extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=600, projection_dim=32, **extra,
    )


def sd_scheduler() -> DDIMScheduler:
    """Stable Diffusion's DDIM config: scaled-linear betas, leading spacing with offset 1, no clipping."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def save_sd(folder: Path, scratch: Path) -> Path:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
    )
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(tiny_text_config())
    StableDiffusionPipeline(
        unet=unet, vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tiny_tokenizer(scratch / "tok"),
        scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def save_sdxl(folder: Path, scratch: Path) -> Path:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80, cross_attention_dim=64,
    )
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(tiny_text_config(hidden_act="gelu"))
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(hidden_act="gelu"))
    tokenizer = tiny_tokenizer(scratch / "tok")
    StableDiffusionXLPipeline(
        unet=unet, vae=tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, scheduler=sd_scheduler(),
    ).save_pretrained(folder)
    return folder
