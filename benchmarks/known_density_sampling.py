"""Ground truth for the minority claim: do the samplers make samples that are truly rare in a world of known density?

The world is ``benchmarks/known_density.py``'s: a Gaussian bump on a 16 x 16 grey image at a 2-D latent drawn from a
3-component mixture. Rendering is injective, so a sample's latent can be read back from its pixels and its true
log-density looked up. This script

1. trains a tiny class-free DDPM (diffusers ``UNet2DModel``, epsilon objective) on fresh draws of the world, saves it
   as a diffusers pipeline folder and loads it back through ``guidance.presets.load_model("pixel-unet", folder)``;
2. trains the candidate JEPA-style MLP encoders of ``known_density.py`` and keeps the (encoder, k) whose exact top-k
   log-volume tracks the true log-density best on held-out world images (Spearman), as the guidance encoder;
3. samples the same seeds with every sampler: unguided, boost-and-skip, JEPA guidance (the library's exact step) and
   its two controls, reversed ("ascend") and random direction (docs/method.md, 'Controls'); SGMS has a named place,
   empty until it exists;
4. reads each sample's latent back (a least-squares fit of the renderer) and reports per sampler the share of valid
   images (within ``valid_tolerance`` of the renderer's image at the read-back latent), the share of valid samples in
   the world's truly rarest decile, their mean true log-density, and pixel AvgkNN against a reference drawn from the
   world (``pipeline/evaluate/rarity.py``), so the table shows whether AvgkNN agrees with the truth.

``minority_test_inputs`` hands each sampler's pixels and seeds, and the world's truly rare images as a minority
reference, to the minority test.

Run from the repository root: ``python -m benchmarks.known_density_sampling`` (minutes on 2 cores) or ``--quick``
(fewer samples, far shorter training: for tests, not for conclusions).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from torch import nn

from benchmarks import known_density
from benchmarks.known_density import World, agreement, jepa_scores
from benchmarks.paths import RESULTS, write_json
from guidance.generate import generate_images
from guidance.methods import GuidanceConfig, SamplingConfig
from guidance.models import WorkItem
from guidance.presets import load_model
from pipeline.demo.train import ddpm_step
from pipeline.evaluate.minority import MinorityConfig, MinorityReference, minority_test
from pipeline.evaluate.rarity import avg_knn

SGMS = "sgms"  # the sampler row kept empty until SGMS exists (another issue)


@dataclass(frozen=True)
class Settings:
    """The run's sizes (the full run; ``--quick`` shrinks them)."""

    samples: int = 200  # seeds per sampler, the same seeds in every row (200: 2 cores shared by eight people)
    batch: int = 100  # samples per generate call
    sampling_steps: int = 25  # DDIM steps, as the demo
    eta: float = 0.2  # strength of the JEPA step and its controls (the exact step's demo strength)
    tau: float = 0.8  # deferral: guide the last 80% of the steps
    oversample: int = 2  # sketch columns beyond k
    diffusion_steps: int = 900  # DDPM training steps (18 minutes on 2 cores shared by eight people, measured)
    diffusion_batch: int = 64
    diffusion_learning_rate: float = 2e-3
    diffusion_channels: tuple = (16, 32)  # UNet2DModel block widths
    ema_decay: float = 0.995
    density: known_density.Settings = field(default_factory=known_density.Settings)  # the encoders' data and recipe
    candidates: tuple = (("vicreg", 16, 0), ("sigreg", 16, 0))  # (objective, D, seed) of the guidance encoder
    reference_images: int = 2000  # the world's draws AvgkNN measures against
    truth_images: int = 20000  # the world's draws whose 10% log-density quantile is "truly rarest decile"
    valid_tolerance: float = 0.1  # valid: max |pixel - renderer at the read-back latent| <= this (pixels in [0, 1])


QUICK = Settings(samples=16, batch=16, sampling_steps=10, diffusion_steps=40, reference_images=400, truth_images=4000,
                 density=known_density.QUICK)


class GuidanceEncoder(nn.Module):
    """A known-density MLP encoder as the guidance encoder: [0, 1] RGB images (B, 3, 16, 16) -> (B, D).

    Carries the two attributes the sampler's checks read (``embed_dim``, ``input_size``); frozen.
    """

    def __init__(self, mlp: nn.Module, embed_dim: int, input_size: int):
        super().__init__()
        self.mlp = mlp.eval().requires_grad_(False)
        self.embed_dim = embed_dim
        self.input_size = input_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mlp(images)


@dataclass(frozen=True)
class Readback:
    """Latents read back from grey images, and how far each image is from the renderer's image there."""

    latents: np.ndarray  # (n, 2)
    pixel_error: np.ndarray  # (n,) max |image - render(latent)|


def read_latents(world: World, grey: np.ndarray, iterations: int = 30) -> Readback:
    """The latent whose bump best fits each (n, size, size) image, by Gauss-Newton least squares on the renderer
    from the intensity-weighted centroid (the centroid alone is biased where the bump is cut by the border)."""
    grid = np.arange(world.size)
    weights = grey.clip(0, None) + 1e-12
    total = weights.sum((1, 2))
    centre = np.stack([(weights.sum(1) * grid).sum(1) / total, (weights.sum(2) * grid).sum(1) / total], 1)
    for _ in range(iterations):
        bump = world.bump(centre)
        dx = grid[None, None, :] - centre[:, 0, None, None]
        dy = grid[None, :, None] - centre[:, 1, None, None]
        jacobian = np.stack([bump * dx, bump * dy], -1).reshape(len(grey), -1, 2) / world.width ** 2  # d bump / d centre
        residual = (bump - grey).reshape(len(grey), -1)
        normal = jacobian.transpose(0, 2, 1) @ jacobian + 1e-9 * np.eye(2)
        step = np.linalg.solve(normal, (jacobian.transpose(0, 2, 1) @ residual[..., None]))[..., 0]
        centre = np.clip(centre - step, -world.size, 2 * world.size)  # an image with no bump must not run off
    error = np.abs(world.bump(centre) - grey).reshape(len(grey), -1).max(1)
    return Readback((centre - (world.size - 1) / 2) / world.pixels_per_unit, error)


def grey_pixels(images: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) grey-as-RGB images in [0, 1] -> (n, H, W) float64 (the channel mean)."""
    return images.double().mean(1).numpy()


@dataclass(frozen=True)
class Truth:
    """What the world knows about a set of images: the yardsticks the samplers are judged by."""

    world: World
    threshold: float  # the 10% quantile of the true log-density over the world's own draws
    tolerance: float  # valid: read-back pixel error <= this
    reference: np.ndarray  # (n, H * W) the world's images AvgkNN measures against
    neighbours: int

    def measure(self, grey: np.ndarray) -> dict:
        """Validity, the truly rarest decile's share, the mean true log-density and AvgkNN of (n, H, W) images."""
        readback = read_latents(self.world, grey)
        valid = readback.pixel_error <= self.tolerance
        log_density = self.world.log_density(readback.latents)
        rare = log_density <= self.threshold
        outside = (np.abs(readback.latents) > self.world.box).any(1)
        knn = avg_knn(grey.reshape(len(grey), -1), self.reference, self.neighbours)
        mean_of_valid = float(log_density[valid].mean()) if valid.any() else None
        return {"valid_share": float(valid.mean()),
                "rarest_decile_share_of_valid": float(rare[valid].mean()) if valid.any() else None,
                "valid_and_rarest_decile_share": float((valid & rare).mean()),
                "mean_true_log_density_of_valid": mean_of_valid,
                "outside_box_share_of_valid": float(outside[valid].mean()) if valid.any() else None,
                "avg_knn_mean": float(knn.mean()),
                "avg_knn_mean_of_valid": float(knn[valid].mean()) if valid.any() else None,
                "median_pixel_error": float(np.median(readback.pixel_error))}


def build_truth(world: World, settings: Settings) -> tuple[Truth, np.ndarray]:
    """The truth's yardsticks, and the world's own draws that set the rarest decile (their latents)."""
    truth_z = world.sample(settings.truth_images, np.random.default_rng(10))
    threshold = float(np.quantile(world.log_density(truth_z), known_density.RAREST))
    reference = grey_pixels(world.render(world.sample(settings.reference_images, np.random.default_rng(11))))
    truth = Truth(world, threshold, settings.valid_tolerance, reference.reshape(len(reference), -1),
                  settings.density.neighbours)
    return truth, truth_z


def check_readback(world: World, truth_z: np.ndarray) -> dict:
    """The readback against real rendered images: exact floats and 8-bit quantised ones (what a PNG stores)."""
    z = truth_z[:2000]
    grey = grey_pixels(world.render(z))
    exact, quantised = read_latents(world, grey), read_latents(world, np.round(grey * 255) / 255)
    return {"images": len(z),
            "max_latent_error": float(np.abs(exact.latents - z).max()),
            "max_latent_error_8bit": float(np.abs(quantised.latents - z).max()),
            "max_pixel_error": float(exact.pixel_error.max()),
            "max_pixel_error_8bit": float(quantised.pixel_error.max())}


def train_diffusion(world: World, settings: Settings, folder: Path) -> dict:
    """DDPM epsilon-MSE at uniform t on fresh draws of the world (grey, in [-1, 1]); saved as a pipeline folder."""
    torch.manual_seed(0)
    channels = settings.diffusion_channels
    unet = UNet2DModel(sample_size=world.size, in_channels=1, out_channels=1, block_out_channels=channels,
                       layers_per_block=1, down_block_types=("DownBlock2D",) * len(channels),
                       up_block_types=("UpBlock2D",) * len(channels), norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=settings.diffusion_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, settings.diffusion_learning_rate,
                                                   total_steps=settings.diffusion_steps)
    ema = EMAModel(unet.parameters(), decay=settings.ema_decay)
    rng, generator = np.random.default_rng(12), torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(settings.diffusion_steps):
        x0 = world.render(world.sample(settings.diffusion_batch, rng))[:, :1] * 2 - 1
        loss = ddpm_step(unet, scheduler, (optimiser, schedule, ema), x0, generator)
    ema.copy_to(unet.parameters())
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(folder)
    return {"parameters": sum(p.numel() for p in unet.parameters()), "steps": settings.diffusion_steps,
            "last_loss": loss, "train_seconds": round(time.perf_counter() - started, 1)}


def choose_encoder(world: World, settings: Settings) -> tuple[GuidanceEncoder, int, dict]:
    """Train the candidates (known_density.py's recipe and data) and keep the (encoder, k) whose exact top-k
    log-volume has the highest Spearman with the true log-density on held-out world images (k + oversample <= D)."""
    density = settings.density
    train_z = world.sample(density.train_images, np.random.default_rng(0))
    held_z = world.sample(density.held_out_images, np.random.default_rng(1))
    train_images, held_images = world.render(train_z), world.render(held_z)
    log_density = world.log_density(held_z)
    rows, best = [], None
    for objective, dim, seed in settings.candidates:
        mlp = known_density.train(objective, dim, seed, train_images, world, density)
        ks = tuple(k for k in known_density.TOP_KS if k + settings.oversample <= dim)
        scores = jepa_scores(mlp, held_images, ks)
        spearman = {k: agreement(scores[f"top{k}"], log_density, rarer_is_larger=False)["spearman_with_log_density"]
                    for k in ks}
        k = max(spearman, key=spearman.get)
        rows.append({"name": f"{objective} D{dim} seed{seed}", "spearman_topk_with_log_density": spearman})
        if best is None or spearman[k] > best[2]:
            best = (GuidanceEncoder(mlp, dim, world.size), k, spearman[k], rows[-1]["name"])
    encoder, k, rho, name = best
    return encoder, k, {"chosen": name, "k": k, "spearman_topk_with_log_density": rho, "candidates": rows}


def samplers(settings: Settings, k: int) -> dict[str, SamplingConfig | None]:
    """Every row of the table: its sampling config, or None for a sampler that does not exist yet."""
    steps = settings.sampling_steps
    guidance = GuidanceConfig(eta=settings.eta, tau=settings.tau, k=k, oversample=settings.oversample)
    jepa = SamplingConfig(method="jepa", steps=steps, guidance=guidance)
    return {"unguided": SamplingConfig(method="unguided", steps=steps),
            "boost-and-skip": SamplingConfig(method="bns", steps=steps),
            f"jepa exact step, eta {settings.eta:g}": jepa,
            "control: ascend": replace(jepa, guidance=replace(guidance, direction="ascend")),
            "control: random direction": replace(jepa, guidance=replace(guidance, direction="random")),
            SGMS: None}


def sample(model, config: SamplingConfig, encoder: GuidanceEncoder, seeds: np.ndarray, batch: int) -> torch.Tensor:
    """One image per seed, (n, 3, H, W) in [0, 1], ``batch`` seeds per call (each row from its own seed)."""
    parts = [generate_images(model, [WorkItem(int(seed)) for seed in part], config, encoder)[0]
             for part in np.array_split(seeds, max(1, len(seeds) // batch))]
    return torch.cat(parts)


@dataclass
class Run:
    """A run's record (the JSON) and its arrays (for the minority test)."""

    record: dict
    images: dict[str, torch.Tensor]  # sampler -> (n, 3, H, W) in [0, 1]
    seeds: np.ndarray
    world_images: torch.Tensor  # the world's own draws that set the rarest decile
    world_log_density: np.ndarray
    threshold: float


def minority_test_inputs(run: Run) -> dict:
    """What the minority test takes: per sampler (samples (N, H * W) float64 grey pixels, seeds (N,)), and the
    world's truly rarest-decile images as the minority reference and all its draws as the typical one."""
    def pixels(images: torch.Tensor) -> np.ndarray:
        grey = grey_pixels(images)
        return grey.reshape(len(grey), -1)

    world = pixels(run.world_images)
    return {"samplers": {name: (pixels(images), run.seeds) for name, images in run.images.items()},
            "minority_reference": world[run.world_log_density <= run.threshold], "reference": world}


def minority_verdicts(run: Run) -> dict:
    """Each sampler's minority test against unguided, with the test's minority reference chosen from the world's
    own draws as on real data (the top quarter by leave-one-out AvgkNN), and how truly rare that choice is."""
    inputs = minority_test_inputs(run)
    reference = MinorityReference(inputs["reference"], MinorityConfig())
    truly_rare = run.world_log_density <= run.threshold
    baseline, baseline_seeds = inputs["samplers"]["unguided"]
    tests = {}
    for name, (samples, seeds) in inputs["samplers"].items():
        if name == "unguided":
            continue
        test = minority_test(samples, baseline, reference, (seeds, baseline_seeds), bounds=(0.0, 1.0))
        tests[name] = {key: test[key] for key in ("verdict", "fd_minority", "fd_all", "nearest_minority_share",
                                                   "precision_all", "avg_knn")} | {"intervals": test["intervals"]}
    return {"samplers": tests, "minority_rows": int(reference.mask.sum()),
            "truly_rare_share_of_chosen_minority": float(truly_rare[reference.mask].mean())}


def run(settings: Settings, world: World = World(), model_folder: Path | None = None) -> Run:
    started = time.perf_counter()
    truth, truth_z = build_truth(world, settings)
    readback = check_readback(world, truth_z)
    world_row = truth.measure(grey_pixels(world.render(truth_z[:settings.samples * 4])))
    print("readback:", json.dumps(readback), "\nworld's own draws:", json.dumps(world_row), flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        folder = model_folder or Path(scratch) / "known-density-ddpm"
        diffusion = train_diffusion(world, settings, folder)
        model = load_model("pixel-unet", folder)
    print("diffusion:", json.dumps(diffusion), flush=True)
    encoder, k, encoder_record = choose_encoder(world, settings)
    print("encoder:", json.dumps(encoder_record), flush=True)

    seeds = np.arange(settings.samples)
    rows, images = {}, {}
    for name, config in samplers(settings, k).items():
        if config is None:
            rows[name] = {"status": "not implemented yet (another issue): its row is filled once it exists"}
            continue
        start = time.perf_counter()
        images[name] = sample(model, config, encoder, seeds, settings.batch)
        seconds = time.perf_counter() - start
        topk = jepa_scores(encoder, images[name], (k,))[f"top{k}"]
        rows[name] = {"method": config.method, "direction": config.guidance.direction if config.method == "jepa" else None,
                      "seconds": round(seconds, 1), "mean_exact_topk_score": float(topk.mean())} \
            | truth.measure(grey_pixels(images[name]))
        print(name, json.dumps(rows[name]), flush=True)
    world_images = world.render(truth_z)
    result = Run({}, images, seeds, world_images, world.log_density(truth_z), truth.threshold)
    minority = minority_verdicts(result)
    for name, test in minority.pop("samplers").items():
        rows[name]["minority_test"] = test
        print(name, "minority test:", test["verdict"], flush=True)
    record = {
        "note": "Per sampler, the same seeds. valid_share: images within valid_tolerance (max abs pixel error) of the "
                "renderer's image at the read-back latent. rarest_decile_share_of_valid: of the valid samples, the "
                "share whose true log-density is below the 10% quantile of the world's own draws (the world itself: "
                "0.10). mean_exact_topk_score: the guidance objective (lower = rarer to the encoder), not evidence. "
                "avg_knn_mean: pixel AvgkNN against the world's reference draws (larger = rarer). minority_test: "
                "the minority test (pipeline/evaluate/minority.py) against unguided, its minority chosen from the "
                "world's draws by leave-one-out AvgkNN as on real data; minority_test_reference says how much of "
                f"that chosen minority is truly in the rarest decile (chance 0.10). The '{SGMS}' row waits for SGMS.",
        "minority_test_reference": minority,
        "world": asdict(world), "settings": asdict(settings), "truth_threshold_log_density": truth.threshold,
        "readback_on_rendered_images": readback, "world_own_draws": world_row, "diffusion": diffusion,
        "guidance_encoder": encoder_record, "guidance_step": "the library's exact step (guidance.GuidanceConfig "
        f"defaults: full gradient, pre-step placement, fresh sketch, q=2) at eta {settings.eta:g}, tau {settings.tau:g}, "
        f"k {k}", "samplers": rows, "seconds": round(time.perf_counter() - started, 1),
    }
    result.record = record
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a minute or so: tiny training and few samples (tests)")
    parser.add_argument("--output", type=Path, default=RESULTS / "known_density_sampling.json")
    parser.add_argument("--model-folder", type=Path, default=None,
                        help="keep the trained DDPM pipeline folder here (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # known_density.py: a second thread made training far slower on 2 shared cores
    result = run(QUICK if args.quick else Settings(), model_folder=args.model_folder).record
    write_json(args.output, result)
    print(f"{result['seconds']} s; wrote {args.output}")


if __name__ == "__main__":
    main()
