"""Exact JEPA-SCORE and the top-k objective: ours vs the references, side by side in one run.

1. Exact JS: batched vmapped VJPs (``jepa_score``) vs the naive per-image Jacobian, images/s and
   their agreement; and the batched score with the encoder's fused (SDPA) attention instead of the
   math path the guidance needs (this first-order path could run either: the attention-scope lever).
2. Top-k value + gradient: ``topk_log_volume`` (batched, exact J v) at several power-iteration
   settings vs the authors' algorithm (``topk_log_volume_reference``: batch 1, one column at a time,
   finite-difference J v, fp32 and reduced-precision autocast): seconds per image and cosine of each
   gradient to the exact top-k gradient (full Jacobian SVD + envelope theorem).

The encoder is the DINOv2-S/14-reg architecture with random weights (nothing can be downloaded
here; cost does not depend on the values), LayerScale at 1 so every block shapes the Jacobian.
Results go to benchmarks/results/jepa_score_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import platform

import torch
import torch.nn.functional as F

from benchmarks.paths import RESULTS, write_json
from benchmarks.timing import speedups, timed
from guidance import jepa_score, load_encoder, topk_log_volume
from guidance.reference import jepa_score_naive, topk_log_volume_exact, topk_log_volume_reference



def value_and_gradient(objective, images: torch.Tensor, **kwargs):
    x = images.clone().requires_grad_(True)
    value = objective(x=x, **kwargs)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


def with_fused_attention(encoder):
    """A copy of ``encoder`` on timm's fused attention (SDPA): first-order AD only, no JVP or double backward."""
    fused = copy.deepcopy(encoder)
    for module in fused.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return fused


def bench_exact(encoder, images: torch.Tensor) -> dict:
    fast, fast_s = timed(jepa_score, encoder, images)
    naive, naive_s = timed(jepa_score_naive, encoder, images)
    fused, fused_s = timed(jepa_score, with_fused_attention(encoder), images)
    count = len(images)
    return {
        "fused_attention_images_per_s": count / fused_s,
        "fused_attention_speedup_vs_math": fast_s / fused_s,
        "fused_attention_max_rel_diff": ((fused - fast).abs() / fast.abs()).max().item(),
        "images": count,
        "batched_images_per_s": count / fast_s,
        "naive_images_per_s": count / naive_s,
        "speedup": naive_s / fast_s,
        "max_abs_diff": (fast - naive).abs().max().item(),
        "max_rel_diff": ((fast - naive).abs() / naive.abs()).max().item(),
    }


def bench_topk(encoder, images: torch.Tensor, k: int, oversample: int) -> list[dict]:
    _, exact_grad = value_and_gradient(lambda x: topk_log_volume_exact(encoder, x, k), images)
    count, rows = len(images), []

    def record(label: str, batch: int, objective, **kwargs):
        def run():
            return [value_and_gradient(objective, part, **kwargs) for part in images.split(batch)]

        parts, seconds = timed(run)
        grad = torch.cat([g for _, g in parts])
        cos = F.cosine_similarity(grad.flatten(1), exact_grad.flatten(1), dim=1)
        rows.append({"variant": label, "batch": batch, "s_per_image": seconds / count,
                     "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()})

    for q in (0, 1, 2, 4):
        record(f"ours q={q}", count, lambda x, q=q: topk_log_volume(
            encoder, x, k, oversample, q, generator=torch.Generator().manual_seed(0)))
    for dtype in (None, torch.bfloat16):
        name = "fp32" if dtype is None else str(dtype).removeprefix("torch.")
        record(f"reference q=2 {name}", 1, lambda x, dtype=dtype: topk_log_volume_reference(
            encoder, x, k, oversample, 2, generator=torch.Generator().manual_seed(0), autocast_dtype=dtype))
    return speedups(rows, "s_per_image", reference="reference q=2 fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-size", type=int, default=112, help="224 is the paper's; 112 keeps CPU runs short")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--k", type=int, default=9)
    parser.add_argument("--oversample", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    encoder = load_encoder("vit_small_patch14_reg4_dinov2", "random", input_size=args.input_size,
                           model_args=dict(init_values=1.0)).to(args.device)
    images = torch.rand(args.images, 3, args.input_size, args.input_size, device=args.device)

    exact = bench_exact(encoder, images)
    print(f"\nExact JEPA-SCORE, {args.images} images at {args.input_size}px on {args.device}")
    print(f"  batched {exact['batched_images_per_s']:.3f} img/s | naive {exact['naive_images_per_s']:.3f} img/s "
          f"| speedup x{exact['speedup']:.2f} | max rel diff {exact['max_rel_diff']:.1e}")
    print(f"  batched, fused attention {exact['fused_attention_images_per_s']:.3f} img/s | "
          f"x{exact['fused_attention_speedup_vs_math']:.2f} vs the math path | "
          f"max rel diff {exact['fused_attention_max_rel_diff']:.1e}")

    topk = bench_topk(encoder, images, args.k, args.oversample)
    print(f"\nTop-k value + gradient (k={args.k}, p={args.oversample}); cosine to the exact top-k gradient")
    print(f"  {'variant':<26}{'batch':>6}{'s/image':>10}{'x vs ref':>10}{'cos mean':>10}{'cos min':>10}")
    for row in topk:
        print(f"  {row['variant']:<26}{row['batch']:>6}{row['s_per_image']:>10.3f}"
              f"{row['speedup_vs_reference']:>10.2f}{row['cosine_mean']:>10.4f}{row['cosine_min']:>10.4f}")

    out = write_json(RESULTS / f"jepa_score_{args.device.split(':')[0]}.json", {
        "settings": vars(args), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "exact": exact, "topk": topk,
    })
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
