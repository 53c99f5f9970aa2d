"""Guided vs unguided sampling, per model family, side by side in one run.

For each family (tiny random models built like the tests', saved and loaded through the presets):
sampling wall time of `unguided` and `jepa` (tau = 0.8) over the same seeds, their ratio, and the
shift of the mean exact JEPA-SCORE of the final images. Run from the repository root:
`python -m benchmarks.bench_guided_sampling`. Results go to
benchmarks/results/guided_sampling_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import timm
import torch

from guidance import jepa_score, load_encoder
from guidance.generate import generate_images
from guidance.methods import GuidanceConfig, SamplingConfig
from guidance.models import WorkItem
from guidance.presets import load_model
from tests import tiny_diffusion

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["a photo of a cat", "a red car", "a bowl of fruit", "a mountain lake"]


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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tau", type=float, default=0.8)
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
        encoder = load_encoder("vit_small_patch14_reg4_dinov2", encoder_folder, input_size=28)
        rows = []
        for family, (preset, folder, cfg, item) in families(root).items():
            model = load_model(preset, folder)
            items = [item(100 + i) for i in range(args.samples)]
            result = {"family": family}
            for method in ("unguided", "jepa"):
                config = SamplingConfig(method=method, steps=args.steps, cfg_scale=cfg,
                                        guidance=GuidanceConfig(tau=args.tau))
                generate_images(model, items[:1], config, encoder)  # warm-up
                start = time.perf_counter()
                images, _ = generate_images(model, items, config, encoder)
                result[f"{method}_s"] = time.perf_counter() - start
                result[f"{method}_score"] = jepa_score(encoder, encoder.resize(images)).mean().item()
            result["time_ratio"] = result["jepa_s"] / result["unguided_s"]
            result["score_shift"] = result["jepa_score"] - result["unguided_score"]
            rows.append(result)

    print(f"\nGuided (jepa, tau={args.tau}) vs unguided, {args.samples} samples, {args.steps} steps, tiny models")
    print(f"  {'family':<12}{'unguided s':>12}{'jepa s':>10}{'ratio':>8}{'score unguided':>16}{'jepa':>10}{'shift':>9}")
    for r in rows:
        print(f"  {r['family']:<12}{r['unguided_s']:>12.2f}{r['jepa_s']:>10.2f}{r['time_ratio']:>8.2f}"
              f"{r['unguided_score']:>16.2f}{r['jepa_score']:>10.2f}{r['score_shift']:>9.2f}")
    RESULTS.mkdir(exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = RESULTS / f"guided_sampling_{device}.json"
    out.write_text(json.dumps({"settings": vars(args), "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
