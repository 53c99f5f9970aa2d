"""The GPU benchmark: full-size architectures with random weights on one H200, in under 10 minutes.

Stored: benchmarks/results/gpu_h200.json (docs/results.md, "At full size on one H200"). Run from the
repository root, ``python -m benchmarks.gpu_h200`` on a GPU; ``--smoke`` checks the script on CPU at tiny
sizes, and ``--stages`` reruns some stages (each failing stage is recorded in the JSON and the next runs).

Architectures (random weights: cost does not depend on the values): DINOv2 ViT-S/14 with registers
at 224 (LayerScale at 1); a Stable Diffusion 1.5-sized UNet (860M parameters, 64x64 latents), VAE
(512 px) and CLIP text encoder, saved as a pipeline folder and loaded through ``load_model``.
Stages, each printed and written as it finishes:

1. exact JEPA-SCORE, images/s: fp32; TF32 matmuls; TF32 with larger vmapped chunks and Jacobian
   groups; fused (SDPA) attention in the encoder for this first-order path. Each checked against
   a float64 reference on the first images (the issue allows TF32 within 0.1 %).
2. the encoder branch of a guided step (top-k value + gradient at 224): ours batched (q = 2, and
   warm start q = 0 along a path of nearby images) vs the authors' algorithm (batch 1, fp16 autocast
   and fp32), seconds per image and cosine to the exact top-k gradient.
3. the envelope gradient by double backward (ours) vs forward-over-reverse
   (``benchmarks.bench_gradient_modes``), 4 images, each checked against a float64 gradient;
4. sampling, images/s and peak memory at several batch sizes: unguided vs JEPA guidance, self-guided
   minority sampling (SGMS) and MinorityPrompt (every step guided or optimised, so each method's cost is
   measured directly), bf16 UNet / VAE with the fp32 encoder branch, and once in fp32 for the bf16 lever;
5. one guided step at the largest batch, part by part (``benchmarks.bench_guided_sampling``):
   UNet forward + backward, VAE decode forward + backward, encoder branch.
6. the cheaper-guidance levers of ``benchmarks.bench_guided_cost`` (the same settings, a TAESD-sized
   AutoencoderTiny with random weights as the guidance decoder), 10 steps at tau 0.8: each setting's
   time as a ratio to unguided, measured side by side, and peak memory with and without
   ``micro_batch``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import platform
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_gradient_modes import bench_encoder as gradient_modes
from benchmarks.bench_guided_cost import save_taesd_shaped, sd_settings
from benchmarks.bench_guided_sampling import profile_guided_step, save_sd_shaped
from benchmarks.bench_jepa_score import with_fused_attention
from benchmarks.paths import RESULTS, write_json
from benchmarks.timing import timed
from guidance import jepa_score, load_encoder, load_model
from guidance.generate import generate_images
from guidance.log_volume import SketchMemory, topk_log_volume
from guidance.methods import MINORITY_PROMPT_SETTINGS, GuidanceConfig, SamplingConfig, SgmsConfig
from guidance.models import WorkItem
from guidance.reference import topk_log_volume_exact, topk_log_volume_reference
from tests import tiny_diffusion

ENCODER = "vit_small_patch14_reg4_dinov2"
PROMPTS = ["a photo of a dog", "a red car on a bridge", "a bowl of fruit", "a mountain lake at dawn"]


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def save_sd15(folder: Path, scratch: Path, smoke: bool) -> Path:
    """An SD-1.5-sized text-to-image pipeline with random weights (tiny with ``smoke``), saved to ``folder``."""
    if smoke:
        return tiny_diffusion.save_sd(folder, scratch)
    return save_sd_shaped(folder, scratch, unet_width=320, vae_width=128, latent_size=64, text_width=768, text_layers=12)


def exact_score_stage(encoder, device: str, count: int, size: int) -> list[dict]:
    images = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    reference = jepa_score(copy.deepcopy(encoder).double(), images[:2].double())
    fused = with_fused_attention(encoder)
    variants = [
        ("fp32", encoder, False, dict()),
        ("tf32", encoder, True, dict()),
        ("tf32, chunks 128, 8 GiB groups", encoder, True, dict(chunk_size=128, max_jacobian_bytes=8 * 2**30)),
        ("tf32, fused attention", fused, True, dict()),
    ]
    rows = []
    for name, model, tf32, options in variants:
        set_tf32(tf32)
        reset_peak(device)
        try:
            jepa_score(model, images, **options)  # warm-up at the measured size (allocator, kernels)
            scores, seconds = timed(jepa_score, model, images, **options)
        except RuntimeError as error:  # e.g. a fused kernel without the batching rule vmap needs
            rows.append({"variant": name, "error": str(error)[:500]})
            print(f"  exact score {name}: failed ({str(error)[:120]})", flush=True)
            continue
        relative = ((scores[:2].cpu() - reference.cpu()).abs() / reference.abs().cpu()).max().item()
        rows.append({"variant": name, "images": count, "images_per_s": count / seconds,
                     "max_rel_diff_vs_float64": relative, "peak_memory_gib": peak_memory_gib(device)})
        print(f"  exact score {name}: {count / seconds:.2f} images/s, max rel diff vs float64 {relative:.1e}", flush=True)
    set_tf32(False)
    return rows


def guided_branch_stage(encoder, device: str, count: int, size: int, path_steps: int = 3) -> list[dict]:
    """Top-k value + gradient at the encoder input, along a path of nearby images (consecutive steps)."""
    g = torch.Generator().manual_seed(1)
    start, end = torch.rand(count, 3, size, size, generator=g), torch.rand(count, 3, size, size, generator=g)
    path = [(start + (end - start) * s / 40).to(device) for s in range(path_steps)]

    def value_and_grad(objective, images):
        x = images.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x).sum(), x)
        return grad

    memory = SketchMemory()
    variants = {
        "ours q=2": (count, lambda x: topk_log_volume(encoder, x, power_iters=2, generator=torch.Generator().manual_seed(0))),
        "ours q=0": (count, lambda x: topk_log_volume(encoder, x, power_iters=0, generator=torch.Generator().manual_seed(0))),
        "ours warm q=0": (count, lambda x: topk_log_volume(encoder, x, power_iters=0, generator=torch.Generator().manual_seed(0),
                                                          memory=memory)),
        "reference q=2 fp16": (1, lambda x: topk_log_volume_reference(encoder, x, generator=torch.Generator().manual_seed(0),
                                                                      autocast_dtype=torch.float16)),
        "reference q=2 fp32": (1, lambda x: topk_log_volume_reference(encoder, x, generator=torch.Generator().manual_seed(0))),
    }
    exact = value_and_grad(lambda x: topk_log_volume_exact(encoder, x, 9), path[-1])
    rows = []
    for name, (batch, objective) in variants.items():
        for images in path[:-1]:  # warm-up; for the warm start, the steps before the measured one
            value_and_grad(objective, images[:batch] if batch == 1 else images)
        reset_peak(device)
        grads, seconds = timed(lambda: torch.cat([value_and_grad(objective, part) for part in path[-1].split(batch)]))
        cosine = F.cosine_similarity(grads.flatten(1), exact.flatten(1), dim=1)
        rows.append({"variant": name, "batch": batch, "s_per_image": seconds / count,
                     "cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
                     "peak_memory_gib": peak_memory_gib(device)})
        print(f"  guided branch {name}: {seconds / count:.3f} s/image, cosine {cosine.mean().item():.4f}", flush=True)
    reference = next(r for r in rows if r["variant"] == "reference q=2 fp16")
    for row in rows:
        row["speedup_vs_reference_fp16"] = reference["s_per_image"] / row["s_per_image"]
    return rows


def sampling_methods(steps: int) -> dict[str, SamplingConfig]:
    """The timed methods, every step guided or optimised so each one's own cost is measured directly: JEPA,
    SGMS (its default distance) and MinorityPrompt (the authors' SD 1.5 settings, t_lo 0)."""
    base = dict(steps=steps, cfg_scale=7.5)
    return {
        "unguided": SamplingConfig(method="unguided", **base),
        "jepa q=2": SamplingConfig(method="jepa", guidance=GuidanceConfig(tau=1.0), **base),
        "jepa warm q=0": SamplingConfig(method="jepa", guidance=GuidanceConfig(tau=1.0, power_iters=0, warm_start=True),
                                        **base),
        "sgms": SamplingConfig(method="sgms", sgms=SgmsConfig(tau=1.0), **base),
        "minority-prompt": SamplingConfig(method="minority-prompt",
                                          minority_prompt=replace(MINORITY_PROMPT_SETTINGS["sd-1.5"], t_lo=0.0), **base),
    }


def sampling_stage(model, encoder, device: str, batches: list[int], steps: int, dtype_label: str) -> list[dict]:
    rows = []
    for batch in batches:
        items = [WorkItem(seed, prompt=PROMPTS[seed % len(PROMPTS)]) for seed in range(batch)]
        for name, config in sampling_methods(steps).items():
            generate_images(model, items, replace(config, steps=1), encoder)  # warm-up at the measured batch size
            reset_peak(device)
            (_, guided), seconds = timed(generate_images, model, items, config, encoder)
            rows.append({"dtype": dtype_label, "batch": batch, "method": name, "steps": steps, "guided_steps": guided,
                         "images_per_s": batch / seconds, "s_per_image_step": seconds / (batch * steps),
                         "peak_memory_gib": peak_memory_gib(device)})
            print(f"  sampling {dtype_label} batch {batch} {name}: {batch / seconds:.3f} images/s "
                  f"({seconds / (batch * steps):.3f} s per image-step)", flush=True)
    return rows


def cheap_guidance_stage(folder: Path, taesd: Path, encoder, device: str, dtype, batch: int, steps: int) -> dict:
    """Every bench_guided_cost setting at this size: seconds, ratio to unguided, peak memory (one round)."""
    items = [WorkItem(seed, prompt=PROMPTS[seed % len(PROMPTS)]) for seed in range(batch)]
    plain = load_model("sd", folder, dtype=dtype, device=device)
    cheap = load_model("sd", folder, dtype=dtype, device=device, guidance_decoder=taesd)
    settings = sd_settings() | {"exact, micro_batch 1": (GuidanceConfig(tau=0.8, micro_batch=1), False)}
    rows = {}
    for name, (guidance, use_taesd) in settings.items():
        model = cheap if use_taesd else plain
        config = SamplingConfig(method="unguided" if guidance is None else "jepa", steps=steps, cfg_scale=7.5,
                                guidance=guidance or GuidanceConfig())
        generate_images(model, items, replace(config, steps=2), encoder)  # warm-up at the measured batch size
        reset_peak(device)
        seconds = timed(generate_images, model, items, config, encoder)[1]
        rows[name] = {"seconds": seconds, "peak_memory_gib": peak_memory_gib(device)}
    for name, row in rows.items():
        row["time_ratio"] = row["seconds"] / rows["unguided"]["seconds"]
        print(f"  cheap guidance {name}: {row['time_ratio']:.2f}x unguided, peak {row['peak_memory_gib']}", flush=True)
    return {"batch": batch, "steps": steps, "tau": 0.8, "rows": rows,
            "taesd_note": "random weights: only its time is measured, not how well its gradient matches the VAE's"}


STAGES = ("exact_score", "guided_branch", "gradient_modes", "sampling", "guided_step_profile", "cheap_guidance",
          "sampling_float32")


def run_stage(result: dict, name: str, stage, save, wanted: set[str]) -> None:
    """``result[name] = stage()`` if ``name`` is wanted, saved at once; a failing stage is recorded with its error, and
    the next one runs (on a lent GPU there is one try: a later stage must not be lost to an earlier one's failure)."""
    if name not in wanted:
        return
    try:
        result[name] = stage()
    except Exception as error:  # noqa: BLE001 - recorded in the JSON and printed, never swallowed
        result[name] = {"error": f"{type(error).__name__}: {error}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        print(f"  {name}: failed ({type(error).__name__}: {str(error)[:200]})", flush=True)
    save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is (a CPU check)")
    parser.add_argument("--batches", default="1,4,8", help="sampling batch sizes")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per measured run (all guided)")
    parser.add_argument("--exact-images", type=int, default=16)
    parser.add_argument("--branch-images", type=int, default=8)
    parser.add_argument("--skip-fp32-sampling", action="store_true", help="leave out the fp32 run of the bf16 lever")
    parser.add_argument("--stages", default=",".join(STAGES), help="the stages to run, comma-separated")
    parser.add_argument("--out", type=Path, help="the JSON written after each stage (default: benchmarks/results/"
                                                 "gpu_h200.json, or gpu_smoke.json with --smoke)")
    parser.add_argument("--dry-run", action="store_true",
                        help="parse the arguments and build every sampling config, then stop (no model; any device)")
    args = parser.parse_args()
    wanted = set(args.stages.split(","))
    if wanted - set(STAGES):
        parser.error(f"unknown stage(s) {', '.join(sorted(wanted - set(STAGES)))}: choose from {', '.join(STAGES)}")
    if args.dry_run:
        print("sampling methods:", ", ".join(sampling_methods(args.steps)))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.smoke and device != "cuda":
        raise SystemExit("no CUDA device: this is the H200 benchmark; use --smoke for a CPU check of the script")
    batches = [int(b) for b in args.batches.split(",")] if not args.smoke else [1, 2]
    size = 28 if args.smoke else 224
    out = args.out or RESULTS / ("gpu_smoke.json" if args.smoke else "gpu_h200.json")
    result = {"settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
              "device": torch.cuda.get_device_name() if device == "cuda" else platform.machine(),
              "versions": {name: importlib.metadata.version(name) for name in ("torch", "diffusers", "transformers", "timm")}}

    def save() -> None:
        write_json(out, result)

    started = time.perf_counter()
    model_args = dict(init_values=1.0) | (dict(embed_dim=32, depth=2, num_heads=2) if args.smoke else {})
    torch.manual_seed(0)
    encoder = load_encoder(ENCODER, "random", input_size=size, model_args=model_args).to(device)
    print(f"encoder {ENCODER} at {size} px on {device}", flush=True)
    run_stage(result, "exact_score", lambda: exact_score_stage(encoder, device, 4 if args.smoke else args.exact_images,
                                                               size), save, wanted)
    run_stage(result, "guided_branch", lambda: guided_branch_stage(encoder, device, 2 if args.smoke else args.branch_images,
                                                                   size), save, wanted)
    branch_images = torch.rand(2 if args.smoke else 4, 3, size, size, generator=torch.Generator().manual_seed(2))
    run_stage(result, "gradient_modes", lambda: gradient_modes(f"{ENCODER} at {size} px", encoder, branch_images.to(device),
                                                               rounds=3), save, wanted)

    with tempfile.TemporaryDirectory() as scratch:
        folder = save_sd15(Path(scratch) / "sd15", Path(scratch) / "tokenizer", args.smoke)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = load_model("sd", folder, dtype=dtype, device=device)
        result["unet_parameters"] = sum(p.numel() for p in model.network.parameters())
        steps = 2 if args.smoke else args.steps
        run_stage(result, "sampling", lambda: sampling_stage(model, encoder, device, batches, steps,
                                                             str(dtype).removeprefix("torch.")), save, wanted)
        items = [WorkItem(seed, prompt="a photo of a dog") for seed in range(batches[-1])]
        run_stage(result, "guided_step_profile",
                  lambda: profile_guided_step(model, items, 7.5, encoder, GuidanceConfig(), steps), save, wanted)
        taesd = save_taesd_shaped(Path(scratch) / "taesd")
        run_stage(result, "cheap_guidance", lambda: cheap_guidance_stage(
            folder, taesd, encoder, device, dtype, batches[-1] if not args.smoke else 1, 2 if args.smoke else 10), save, wanted)
        if dtype != torch.float32 and not args.skip_fp32_sampling and "sampling_float32" in wanted:
            del model
            model = load_model("sd", folder, dtype=torch.float32, device=device)
            run_stage(result, "sampling_float32", lambda: sampling_stage(model, encoder, device, batches[1:2], steps,
                                                                         "float32"), save, wanted)
    result["seconds"] = time.perf_counter() - started
    save()
    print(f"\n{time.perf_counter() - started:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
