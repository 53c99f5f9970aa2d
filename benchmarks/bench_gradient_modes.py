"""The envelope gradient two ways: double backward (ours) vs forward-over-reverse, side by side.

With the sketch basis Q held fixed (the envelope theorem, docs/method.md, 'Envelope gradient'), the
top-k objective L(x) = sum_{i<=k} log sigma_i(M(x)), M = Q^T J(x) (r x N), has
dL/dM = G = U_k Sigma_k^-1 V_k^T, so

  grad L(x) = sum_j d/dx [ q_j^T J(x) g_j ]      (g_j the j-th row of G, held fixed)
            = sum_j d/de [ J(x + e g_j)^T q_j ]   (symmetry of the Hessian of q_j^T f)

- double backward (``guidance.log_volume``): the r VJPs q_j^T J keep their graph, then one backward;
- forward-over-reverse: the r VJPs without a graph, G from their SVD, then one ``jvp`` over a ``vjp``
  per sketch column (vmapped over the columns): no second-order graph is kept.

Both are checked against the double-backward gradient in float64 (a float64 copy of the encoder)
and timed in alternating rounds on the same images and basis, for the DINOv2-S/14-reg architecture
(random weights) and the demo's ViT world prior (trained here), both at 56 px. Results:
benchmarks/results/gradient_modes_<device>.json. Run from the repository root:
``python -m benchmarks.bench_gradient_modes``.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F
from torch.func import jvp, vjp, vmap

from benchmarks.paths import DIGITS_ENCODER, RESULTS, write_json
from benchmarks.timing import timed
from guidance import load_encoder
from guidance.log_volume import LOG_FLOOR, projected_log_volume, sketch_range

ENCODER = "vit_small_patch14_reg4_dinov2"


def double_backward(encoder, images: torch.Tensor, basis: torch.Tensor, k: int):
    """(L, grad L): the product's path, the VJPs' graph differentiated once more."""
    x = images.detach().requires_grad_(True)
    value = projected_log_volume(encoder, x, basis, k)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


def forward_over_reverse(encoder, images: torch.Tensor, basis: torch.Tensor, k: int):
    """(L, grad L): VJPs without a graph, then sum_j jvp(x -> J(x)^T q_j, g_j)."""
    x = images.detach()
    _, pullback = vjp(encoder, x)
    (rows,) = vmap(pullback, in_dims=2)(basis)  # rows[j, b] = q_j^T J for image b: (r, B, C, H, W)
    u, sigma, vh = torch.linalg.svd(rows.flatten(2).transpose(0, 1).double(), full_matrices=False)
    kept = sigma[:, :k] > LOG_FLOOR  # a clamped singular value contributes a constant, no gradient
    value = sigma[:, :k].clamp_min(LOG_FLOOR).log().sum(-1)
    weights = torch.where(kept, 1 / sigma[:, :k], torch.zeros_like(sigma[:, :k]))
    g = (u[:, :, :k] * weights[:, None, :]) @ vh[:, :k]  # dL/dM: (B, r, N)
    g = g.to(x.dtype).transpose(0, 1).reshape(rows.shape)

    def column(q: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        return jvp(lambda y: vjp(encoder, y)[1](q)[0], (x,), (direction,))[1]

    return value, vmap(column, in_dims=(2, 0))(basis, g).sum(0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min().item()


def bench_encoder(label: str, encoder, images: torch.Tensor, k: int = 9, oversample: int = 2, power_iters: int = 1,
                  rounds: int = 5) -> dict:
    """Both modes on ``images`` (on the encoder's device) and one sketch basis: times and accuracy."""
    basis = sketch_range(encoder, images, k + oversample, power_iters, torch.Generator().manual_seed(0))
    exact_value, exact_grad = double_backward(copy.deepcopy(encoder).double(), images.double(), basis.double(), k)
    modes = {"double backward": double_backward, "forward-over-reverse": forward_over_reverse}
    times = {name: [] for name in modes}
    results = {}
    for _ in range(rounds):
        for name, mode in modes.items():
            results[name], seconds = timed(mode, encoder, images, basis, k)
            times[name].append(seconds)
    row = {"encoder": label, "seconds": times}
    base = statistics.median(times["double backward"])
    print(f"\n{label}, {len(images)} images, r = {k + oversample}:")
    for name, (value, grad) in results.items():
        row[name] = {
            "median_s": statistics.median(times[name]),
            "speedup_vs_double_backward": base / statistics.median(times[name]),
            "value_max_relative_error": ((value - exact_value).abs() / exact_value.abs()).max().item(),
            "gradient_min_cosine_to_float64": cosine(grad, exact_grad),
        }
        r = row[name]
        print(f"  {name:>22}: {r['median_s']:.3f} s | x{r['speedup_vs_double_backward']:.2f} | value error "
              f"{r['value_max_relative_error']:.1e} | gradient cosine to float64 {r['gradient_min_cosine_to_float64']:.7f}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--k", type=int, default=9)
    parser.add_argument("--oversample", type=int, default=2)
    parser.add_argument("--power-iters", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.rand(args.images, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    encoders = {
        "DINOv2-S/14-reg architecture, random weights, 56 px": load_encoder(ENCODER, "random", input_size=56),
        "demo ViT (trained), 56 px": load_encoder(ENCODER, DIGITS_ENCODER, input_size=56),
    }
    rows = [bench_encoder(label, encoder, images, args.k, args.oversample, args.power_iters, args.rounds)
            for label, encoder in encoders.items()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = write_json(RESULTS / f"gradient_modes_{device}.json",
                     {"settings": vars(args), "torch": torch.__version__, "rows": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
