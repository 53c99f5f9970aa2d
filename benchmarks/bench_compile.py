"""The torch.compile lever: eager vs compiled, side by side, with what compiling costs.

On the demo's models (the digits DDPM and the ViT world prior trained here, 56 px, batch ``--batch``):
1. the denoising network compiled in place (``model.compile: true``, ``load_model(compile_network=True)``):
   unguided sampling and JEPA-guided sampling (the demo's eta and tau), seconds per batch;
2. the encoder compiled (``torch.compile(encoder)``): the exact JEPA-SCORE and the top-k value plus
   its gradient, seconds per batch.
Each compiled variant's first call (where compilation happens, with an empty inductor cache as in
a fresh actor) is timed apart, so the table shows the one-off cost and how many batches repay it.
Rounds alternate eager and compiled so machine noise hits both alike; compiled results are checked against eager ones, and the graphs dynamo compiled
are counted (none means the calls fell back to eager). Results:
benchmarks/results/compile_<device>.json. Run from the repository root:
``python -m benchmarks.bench_compile``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

from benchmarks.paths import DIGITS_DDPM, DIGITS_ENCODER, RESULTS, write_json
from benchmarks.timing import timed
from guidance import jepa_score, load_encoder, load_model
from guidance.generate import generate_images
from guidance.log_volume import topk_log_volume
from guidance.methods import GuidanceConfig, SamplingConfig
from guidance.models import WorkItem

ENCODER = "vit_small_patch14_reg4_dinov2"


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process.

    torch has no public count: this reads the private ``torch._dynamo.utils.counters["stats"]
    ["unique_graphs"]``, here only (tests/test_private_apis.py fails, naming it, when torch changes it).
    """
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compare(name: str, eager, compiled, rounds: int) -> dict:
    """Time ``eager()`` and ``compiled()`` (zero-argument calls returning a tensor), first call apart."""
    reference, eager_first = timed(eager)
    graphs_before = graphs_compiled()
    result, compiled_first = timed(compiled)
    graphs = graphs_compiled() - graphs_before
    eager_s, compiled_s = [], []
    for _ in range(rounds):
        eager_s.append(timed(eager)[1])
        compiled_s.append(timed(compiled)[1])
    eager_median, compiled_median = statistics.median(eager_s), statistics.median(compiled_s)
    saved = eager_median - compiled_median
    compile_s = compiled_first - compiled_median
    row = {
        "variant": name, "graphs_compiled": graphs, "eager_s": eager_s, "compiled_s": compiled_s,
        "eager_first_s": eager_first, "compiled_first_s": compiled_first, "compile_s": compile_s,
        "speedup": eager_median / compiled_median,
        "break_even_batches": compile_s / saved if saved > 0 else None,
        "max_abs_difference": (result - reference).abs().max().item(),
    }
    print(f"  {name}: eager {eager_median:.3f} s | compiled {compiled_median:.3f} s | x{row['speedup']:.2f} | "
          f"compiling {compile_s:.0f} s ({graphs} graphs) | "
          f"repaid after {row['break_even_batches'] or float('inf'):.0f} batches | "
          f"max |difference| {row['max_abs_difference']:.1e}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (the demo's 25)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # cold: what a fresh actor pays

    eager_model = load_model("pixel-unet", DIGITS_DDPM)
    compiled_model = load_model("pixel-unet", DIGITS_DDPM, compile_network=True)
    encoder = load_encoder(ENCODER, DIGITS_ENCODER, input_size=56)
    compiled_encoder = torch.compile(encoder)
    items = [WorkItem(seed, class_label=seed % 10) for seed in range(args.batch)]
    unguided = SamplingConfig(method="unguided", steps=args.steps)
    guided = SamplingConfig(method="jepa", steps=args.steps, guidance=GuidanceConfig(eta=0.03, tau=0.8))
    images = torch.rand(args.batch, 3, 56, 56, generator=torch.Generator().manual_seed(0))

    def value_and_gradient(world_prior):
        x = images.clone().requires_grad_(True)
        value = topk_log_volume(world_prior, x, k=9, oversample=2, power_iters=1,
                                generator=torch.Generator().manual_seed(0))
        return torch.autograd.grad(value.sum(), x)[0]

    print(f"torch.compile, demo models, batch {args.batch}, {args.steps} steps, {args.rounds} rounds")
    rows = [
        compare("denoiser compiled: unguided sampling",
                lambda: generate_images(eager_model, items, unguided)[0],
                lambda: generate_images(compiled_model, items, unguided)[0], args.rounds),
        compare("denoiser compiled: JEPA-guided sampling",
                lambda: generate_images(eager_model, items, guided, encoder)[0],
                lambda: generate_images(compiled_model, items, guided, encoder)[0], args.rounds),
        compare("encoder compiled: exact JEPA-SCORE",
                lambda: jepa_score(encoder, images), lambda: jepa_score(compiled_encoder, images), args.rounds),
        compare("encoder compiled: top-k value + gradient (q = 1)",
                lambda: value_and_gradient(encoder), lambda: value_and_gradient(compiled_encoder), args.rounds),
    ]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = write_json(RESULTS / f"compile_{device}.json",
                     {"settings": vars(args), "torch": torch.__version__, "rows": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
