"""A world of known density: do the rarity yardsticks, and the JEPA-SCORE of small JEPA-style encoders,
rank images by their true rarity?

The world: a Gaussian bump rendered on a 16 x 16 grey image (repeated to RGB) at a 2-D latent position
z drawn from a stated 3-component Gaussian mixture with unequal weights, kept inside a box. Rendering
is injective (the bump's centre is its latent), so the true log-density of an image is the mixture's
log-density at its latent, up to one constant (the box's mass), which no ranking sees.

On held-out images it reports Spearman correlations with the true log-density of
1. the yardstick (``pipeline/evaluate/rarity.py``: AvgkNN, LOF, Rarity Score) in pixel space against a
   reference drawn from the world: larger = rarer, so a working yardstick correlates negatively;
2. the exact JEPA-SCORE (full: all D log singular values of the input Jacobian) and the top-k
   log-volume (the k largest) of MLP encoders trained here on two noisy views per image, with the demo
   recipe's objectives (``pipeline/demo/train.py``: VICReg, or LeJEPA's invariance + SIGReg). The score
   falls with rarity, so here positive is the right sign.
and, per metric, the share of the 10% it flags as rarest that are among the truly rarest 10% (chance 0.10).
All encoders are trained and measured side by side in one run.

Run from the repository root: ``python -m benchmarks.known_density`` (about 5 minutes on 2 cores) or
``--quick`` (about a minute: fewer images and steps, two encoders).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp
from scipy.stats import spearmanr
from torch import nn

from benchmarks.paths import RESULTS, write_json
from guidance.jepa_score import encoder_jacobian, log_singular_volume
from guidance.log_volume import LOG_FLOOR
from guidance.sigreg import sigreg
from pipeline.demo.train import EncoderTraining, encoder_loss
from pipeline.evaluate.rarity import avg_knn, local_outlier_factor, rarity_score

TOP_KS = (1, 2, 3, 4, 8)
RAREST = 0.10  # the share of images called "the rarest"
# The issue's own quick check (issue 19), Spearman of the score with the true log-density, for comparison.
ISSUE_QUICK_CHECK = {"vicreg D16 seed0": {"full": -0.44, "top2": -0.41}, "sigreg D16 seed0": {"full": 0.07, "top2": 0.86},
                     "sigreg D16 seed1": {"top2": 0.82}, "sigreg D32 seed0": {"top2": 0.59}, "sigreg D2 seed0": {"top2": -0.11}}


@dataclass(frozen=True)
class World:
    """The mixture over latent positions and how a latent is drawn as an image."""

    weights: tuple = (0.6, 0.3, 0.1)  # unequal, so the third component and the gaps between them are rare
    means: tuple = ((-1.0, -0.7), (1.1, -0.3), (-0.1, 1.3))
    stds: tuple = ((0.5, 0.35), (0.35, 0.55), (0.3, 0.3))  # per axis (diagonal covariances)
    box: float = 2.5  # latents outside [-box, box]^2 are redrawn, so every bump stays inside the image
    size: int = 16  # image side in pixels
    width: float = 1.5  # the bump's standard deviation in pixels
    reach: float = 0.42  # the box's half side maps to this fraction of the image side

    def log_density(self, z: np.ndarray) -> np.ndarray:
        """log p(z) of the untruncated mixture, (n,); the truncated one differs by a constant."""
        means, stds = np.array(self.means), np.array(self.stds)
        standard = (z[:, None, :] - means[None]) / stds[None]
        log_components = -0.5 * (standard ** 2).sum(-1) - np.log(2 * math.pi * stds.prod(-1))[None]
        return logsumexp(log_components + np.log(self.weights)[None], axis=1)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n latents from the mixture restricted to the box, (n, 2)."""
        kept = np.empty((0, 2))
        while len(kept) < n:
            component = rng.choice(len(self.weights), size=2 * n, p=self.weights)
            z = np.array(self.means)[component] + np.array(self.stds)[component] * rng.standard_normal((2 * n, 2))
            kept = np.concatenate([kept, z[(np.abs(z) <= self.box).all(1)]])
        return kept[:n]

    @property
    def pixels_per_unit(self) -> float:
        """How far the bump's centre moves, in pixels, per unit of latent."""
        return self.reach * self.size / self.box

    def centre(self, z: np.ndarray) -> np.ndarray:
        """The bump's centre of each latent, (n, 2): column, row in pixels."""
        return (self.size - 1) / 2 + z * self.pixels_per_unit

    def bump(self, centre: np.ndarray) -> np.ndarray:
        """The grey image of a bump at each centre, (n, size, size) float64 in [0, 1]."""
        grid = np.arange(self.size)
        dx = grid[None, None, :] - centre[:, 0, None, None]
        dy = grid[None, :, None] - centre[:, 1, None, None]
        return np.exp(-(dx ** 2 + dy ** 2) / (2 * self.width ** 2))

    def render(self, z: np.ndarray) -> torch.Tensor:
        """The bump at each latent: (n, 3, size, size) in [0, 1], one grey image repeated to RGB."""
        grey = self.bump(self.centre(z))
        return torch.from_numpy(grey).float()[:, None].expand(-1, 3, -1, -1).contiguous()


@dataclass(frozen=True)
class Settings:
    """The run's sizes (the full run; ``--quick`` shrinks them)."""

    train_images: int = 2000  # also the yardstick's reference
    held_out_images: int = 1500
    steps: int = 400
    batch_size: int = 256
    learning_rate: float = 1e-3
    hidden: int = 256  # the MLP's width
    view_noise: float = 0.1  # std of the pixel noise of each view
    sigreg_slices: int = 64  # SIGReg directions per step (fewer than the recipe's 256: 2 CPU cores)
    neighbours: int = 5  # k of AvgkNN, LOF and Rarity Score
    encoders: tuple = (("vicreg", 16, 0), ("vicreg", 32, 0), ("sigreg", 16, 0), ("sigreg", 16, 1),
                       ("sigreg", 32, 0), ("sigreg", 2, 0))  # (objective, D, seed)


QUICK = Settings(train_images=600, held_out_images=400, steps=80, encoders=(("vicreg", 16, 0), ("sigreg", 16, 0)))


class Grey(nn.Module):
    """(B, 3, H, W) -> (B, H * W): the channel mean, flattened (the world's images are grey)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(1).flatten(1)


def mlp_encoder(dim: int, world: World, settings: Settings) -> nn.Module:
    """(B, 3, H, W) -> (B, D): a two-hidden-layer GELU MLP on the grey pixels, smooth so its Jacobian is."""
    return nn.Sequential(Grey(), nn.Linear(world.size ** 2, settings.hidden), nn.GELU(),
                         nn.Linear(settings.hidden, settings.hidden), nn.GELU(), nn.Linear(settings.hidden, dim))


def train(objective: str, dim: int, seed: int, images: torch.Tensor, world: World, settings: Settings) -> nn.Module:
    """The demo recipe's objective on the embedding itself (no expander), two noisy views per image."""
    torch.manual_seed(seed)
    encoder = mlp_encoder(dim, world, settings)
    recipe = EncoderTraining(objective=objective, sigreg_slices=settings.sigreg_slices, seed=seed)
    optimiser = torch.optim.AdamW(encoder.parameters(), lr=settings.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(settings.steps):
        batch = images[torch.randint(len(images), (settings.batch_size,), generator=generator)]
        a, b = (encoder(batch + settings.view_noise * torch.randn(batch.shape, generator=generator)) for _ in range(2))
        loss = encoder_loss(a, b, recipe, generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return encoder.eval()


@torch.no_grad()
def jepa_scores(encoder: nn.Module, images: torch.Tensor, ks: tuple) -> dict[str, np.ndarray]:
    """Exact JEPA-SCORE ("full") and top-k log-volumes ("top{k}") from one Jacobian SVD per image."""
    full, top = [], {k: [] for k in ks}
    for part in images.split(250):
        jacobians = encoder_jacobian(encoder, part)  # the product's exact (B, D, N) Jacobians
        full.append(log_singular_volume(jacobians))
        log_sigma = torch.linalg.svdvals(jacobians.double()).clamp_min(LOG_FLOOR).log()  # descending
        for k in ks:
            top[k].append(log_sigma[:, :k].sum(-1))
    return {"full": torch.cat(full).numpy()} | {f"top{k}": torch.cat(v).numpy() for k, v in top.items()}


def agreement(metric: np.ndarray, log_density: np.ndarray, rarer_is_larger: bool) -> dict:
    """Spearman with the true log-density, and the share of the metric's rarest 10% in the true rarest 10%."""
    known = np.isfinite(metric)
    count = round(RAREST * len(metric))
    truly_rarest = set(np.argsort(log_density)[:count])
    order = np.argsort(np.where(known, -metric if rarer_is_larger else metric, np.inf))
    return {"spearman_with_log_density": float(spearmanr(metric[known], log_density[known]).statistic),
            "share_flagged_in_rarest_10pct": len(truly_rarest & set(order[:count])) / count}


def run(settings: Settings, world: World = World()) -> dict:
    started = time.perf_counter()
    train_z = world.sample(settings.train_images, np.random.default_rng(0))
    held_z = world.sample(settings.held_out_images, np.random.default_rng(1))
    train_images, held_images = world.render(train_z), world.render(held_z)
    log_density = world.log_density(held_z)

    pixels, reference = held_images[:, 0].flatten(1).numpy(), train_images[:, 0].flatten(1).numpy()
    k = settings.neighbours
    rarity = rarity_score(pixels, reference, k)
    yardstick = {"avg_knn": agreement(avg_knn(pixels, reference, k), log_density, rarer_is_larger=True),
                 "lof": agreement(local_outlier_factor(pixels, reference, k), log_density, rarer_is_larger=True),
                 "rarity_score": agreement(rarity, log_density, rarer_is_larger=True)
                 | {"uncovered_share": float(np.mean(~np.isfinite(rarity)))}}
    print("yardstick in pixel space:", json.dumps(yardstick), flush=True)

    encoders = []
    for objective, dim, seed in settings.encoders:
        start = time.perf_counter()
        encoder = train(objective, dim, seed, train_images, world, settings)
        trained = time.perf_counter() - start
        scores = jepa_scores(encoder, held_images, tuple(k for k in TOP_KS if k <= dim))
        with torch.no_grad():
            heldout_sigreg = sigreg(encoder(held_images), torch.Generator().manual_seed(0)).item()
        rows = {name: agreement(values, log_density, rarer_is_larger=False) for name, values in scores.items()}
        encoders.append({
            "name": f"{objective} D{dim} seed{seed}", "objective": objective, "embed_dim": dim, "seed": seed,
            "train_seconds": round(trained, 1), "heldout_sigreg": heldout_sigreg,
            "spearman_with_log_density": {name: row["spearman_with_log_density"] for name, row in rows.items()},
            "share_lowest_top2_in_rarest_10pct": rows["top2"]["share_flagged_in_rarest_10pct"],
            "share_lowest_full_in_rarest_10pct": rows["full"]["share_flagged_in_rarest_10pct"],
        })
        print(json.dumps(encoders[-1]), flush=True)
    return {
        "note": "Spearman with the true log-density on held-out images. Yardstick: larger = rarer, so negative is "
                "right. JEPA-SCORE / top-k: lower = rarer, so positive is right. Shares: of the 10% each metric "
                "calls rarest, how many are among the truly rarest 10% (chance 0.10). All encoders trained and "
                "measured side by side in this one run.",
        "world": asdict(world), "settings": asdict(settings),
        "yardstick_pixel_space": yardstick, "encoders": encoders, "issue_quick_check": ISSUE_QUICK_CHECK,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about a minute: fewer images and steps, two encoders")
    parser.add_argument("--output", type=Path, default=RESULTS / "known_density_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # on 2 shared cores a second thread made a training step 25x slower (measured)
    result = run(QUICK if args.quick else Settings())
    write_json(args.output, result)
    print(f"{result['seconds']} s; wrote {args.output}")


if __name__ == "__main__":
    main()
