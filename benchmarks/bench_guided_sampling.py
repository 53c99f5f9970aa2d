"""Guided vs unguided sampling, per model family, side by side in one run, and where the time goes.

For each family (tiny random models built like the tests', saved and loaded through the presets;
a mid-size Stable Diffusion: SD 1.5's UNet and VAE layout at a fifth / a quarter of its widths, 256 px,
with the full DINOv2-S/14-reg architecture at 56 px, random weights; and the demo's digits DDPM with
its ViT world prior at 56 px, trained here): sampling wall time of
`unguided` and `jepa` (tau = 0.8) over the same seeds, their ratio, and the shift of the mean
exact JEPA-SCORE of the final images. Then a profile of one guided step, timed part by part:
the denoiser forward with graph and its backward, the decode (VAE for latent models) forward and
backward, and the encoder branch (top-k value and gradient at the image). Run from the repository root:
`python -m benchmarks.bench_guided_sampling`. Results go to
benchmarks/results/guided_sampling_<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import timm
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from benchmarks.paths import DIGITS_DDPM, DIGITS_ENCODER, RESULTS, write_json
from benchmarks.timing import timed
from guidance import jepa_score, load_encoder, topk_log_volume
from guidance.generate import generate_images
from guidance.methods import GuidanceConfig, SamplingConfig
from guidance.models import WorkItem
from guidance.presets import load_model
from guidance.schedules import noise_schedule, predict_clean
from tests import tiny_diffusion

PROMPTS = ["a photo of a cat", "a red car", "a bowl of fruit", "a mountain lake"]


def save_sd_shaped(folder: Path, scratch: Path, unet_width: int, vae_width: int, latent_size: int,
                   text_width: int, text_layers: int) -> Path:
    """A Stable Diffusion 1.5-shaped pipeline with random weights, widths scaled, saved to ``folder``.

    SD 1.5 itself is unet_width 320, vae_width 128, latent_size 64 (512 px), text_width 768, 12 layers.
    """
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(unet_width * m for m in (1, 2, 4, 4)),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=text_width, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=8 * latent_size,
        block_out_channels=tuple(vae_width * m for m in (1, 2, 4, 4)), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_config = tiny_diffusion.tiny_text_config()  # the tiny tokenizer's ids, CLIP's text layout at this width
    for key, value in dict(hidden_size=text_width, intermediate_size=4 * text_width, num_attention_heads=text_width // 64,
                           num_hidden_layers=text_layers, projection_dim=text_width).items():
        setattr(text_config, key, value)
    StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=CLIPTextModel(text_config), tokenizer=tiny_diffusion.tiny_tokenizer(scratch),
        scheduler=tiny_diffusion.sd_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def families(root: Path) -> dict[str, tuple[str, Path, float, callable]]:
    """family -> (preset, folder, cfg scale, seed -> work item)."""
    return {
        "pixel-unet": ("pixel-unet", tiny_diffusion.save_pixel_unet(root / "pixel"), 1.0, lambda s: WorkItem(s)),
        "class-unet": ("pixel-unet", tiny_diffusion.save_pixel_unet(root / "class", 10), 1.0,
                       lambda s: WorkItem(s, s % 10)),
        "dit": ("dit", tiny_diffusion.save_dit(root / "dit"), 4.0, lambda s: WorkItem(s, s % 1000)),
        "sd": ("sd", tiny_diffusion.save_sd(root / "sd", root / "t1"), 7.5,
               lambda s: WorkItem(s, prompt=PROMPTS[s % 4])),
        "sdxl": ("sdxl-base", tiny_diffusion.save_sdxl(root / "sdxl", root / "t2"), 5.0,
                 lambda s: WorkItem(s, prompt=PROMPTS[s % 4])),
        "mid-size sd": ("sd", save_sd_shaped(root / "sd-mid", root / "t3", 64, 32, 32, 256, 4), 7.5,
                        lambda s: WorkItem(s, prompt=PROMPTS[s % 4])),
        "demo digits": ("pixel-unet", DIGITS_DDPM, 1.0, lambda s: WorkItem(s, s % 10)),
    }


def profile_guided_step(model, items, cfg: float, encoder, guidance: GuidanceConfig, steps: int) -> dict:
    """Seconds of each part of one guided step (median of 3), at the middle timestep of the schedule."""
    schedule = noise_schedule(model.scheduler_config, steps, "ddim")
    t = schedule.timesteps[len(schedule.timesteps) // 2]
    denoiser = model.denoiser(items, cfg)
    x = torch.randn(len(items), *model.sample_shape, generator=torch.Generator().manual_seed(0)).to(model.device, model.dtype)

    def denoise():
        x_t = x.clone().requires_grad_(True)
        x0 = predict_clean(schedule, denoiser(x_t, t), x_t, t)[0]
        x0.backward(torch.ones_like(x0))

    with torch.no_grad():
        x0_hat = predict_clean(schedule, denoiser(x, t), x, t)[0]

    def decode():
        x0 = x0_hat.clone().requires_grad_(True)
        image = model.decode(x0)
        image.backward(torch.ones_like(image))

    image = model.decode(x0_hat).clamp(0, 1).float().detach()

    def encode():
        value = topk_log_volume(encoder, image.clone().requires_grad_(True), guidance.k, guidance.oversample,
                                guidance.power_iters, generator=torch.Generator().manual_seed(0))
        value.sum().backward()

    parts = {"denoiser_fwd_bwd_s": denoise, "decode_fwd_bwd_s": decode, "encoder_branch_s": encode}
    for part in parts.values():
        part()  # warm-up
    seconds = {name: sorted(timed(part)[1] for _ in range(3))[1] for name, part in parts.items()}
    total = sum(seconds.values())
    return seconds | {name.removesuffix("_s") + "_share": value / total for name, value in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed runs of each method (median)")
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        encoder_folder = root / "encoder"
        timm.models.save_for_hf(
            timm.create_model("vit_small_patch14_reg4_dinov2", img_size=28, num_classes=0, embed_dim=32, depth=2,
                              num_heads=2, init_values=1.0),
            encoder_folder, safe_serialization=True,
        )
        tiny_encoder = load_encoder("vit_small_patch14_reg4_dinov2", encoder_folder, input_size=28)
        demo_encoder = load_encoder("vit_small_patch14_reg4_dinov2", DIGITS_ENCODER, input_size=56)
        full_encoder = load_encoder("vit_small_patch14_reg4_dinov2", "random", input_size=56,
                                    model_args=dict(init_values=1.0))
        guidance = GuidanceConfig(tau=args.tau)
        rows = []
        for family, (preset, folder, cfg, item) in families(root).items():
            model = load_model(preset, folder)
            encoder = {"demo digits": demo_encoder, "mid-size sd": full_encoder}.get(family, tiny_encoder)
            items = [item(100 + i) for i in range(args.samples)]
            result = {"family": family, "encoder_input": encoder.input_size}
            configs = {method: SamplingConfig(method=method, steps=args.steps, cfg_scale=cfg, guidance=guidance)
                       for method in ("unguided", "jepa")}
            seconds = {method: [] for method in configs}
            for method, config in configs.items():
                generate_images(model, items[:1], config, encoder)  # warm-up
            for _ in range(args.rounds):  # alternate, so machine noise hits both alike; medians below
                for method, config in configs.items():
                    (images, _), elapsed = timed(generate_images, model, items, config, encoder)
                    seconds[method].append(elapsed)
                    result[f"{method}_score"] = jepa_score(encoder, encoder.resize(images)).mean().item()
            for method in configs:
                result[f"{method}_s"] = statistics.median(seconds[method])
            result["time_ratio"] = result["jepa_s"] / result["unguided_s"]
            result["score_shift"] = result["jepa_score"] - result["unguided_score"]
            result["guided_step_profile"] = profile_guided_step(model, items, cfg, encoder, guidance, args.steps)
            rows.append(result)

    print(f"\nGuided (jepa, tau={args.tau}) vs unguided, {args.samples} samples, {args.steps} steps")
    print(f"  {'family':<12}{'unguided s':>12}{'jepa s':>10}{'ratio':>8}{'score unguided':>16}{'jepa':>10}{'shift':>9}")
    for r in rows:
        print(f"  {r['family']:<12}{r['unguided_s']:>12.2f}{r['jepa_s']:>10.2f}{r['time_ratio']:>8.2f}"
              f"{r['unguided_score']:>16.2f}{r['jepa_score']:>10.2f}{r['score_shift']:>9.2f}")
    print("\nOne guided step, part by part (seconds; share of their sum)")
    print(f"  {'family':<14}{'denoiser fwd+bwd':>18}{'decode fwd+bwd':>16}{'encoder branch':>16}")
    for r in rows:
        p = r["guided_step_profile"]
        print(f"  {r['family']:<14}" + "".join(
            f"{p[name + '_s']:>9.3f} ({p[name + '_share']:>4.0%})" for name in ("denoiser_fwd_bwd", "decode_fwd_bwd",
                                                                             "encoder_branch")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = write_json(RESULTS / f"guided_sampling_{device}.json",
                     {"settings": vars(args), "torch": torch.__version__, "rows": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
