"""The evaluate package's typed configs: the evaluate job's (what to evaluate against what, and which metrics),
the score job's and the prior check's. Light to import (no torch): the help reads them before any model loads,
and the checks that need the feature code import it when they run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from guidance.methods import GuidanceConfig
from pipeline.evaluate.neighbours import check_mode
from pipeline.evaluate.rarity import DEFAULT_K
from pipeline.generate.config import EncoderConfig
from pipeline.settings import TrackingConfig, UserError
from pipeline.storage import StorageConfig, StorageError, check_reachable, resolve

if TYPE_CHECKING:
    from pipeline.evaluate.features import FeatureSpace

SCORE_METHODS = ("exact", "topk")
OUTPUT_SUFFIXES = (".csv", ".parquet")
WEIGHT_CHOICES = ("WEIGHTS (a .safetensors / .pth file, a timm model folder, or an open_clip checkpoint), 'hub' or "
                  "'hub:TAG' (downloads timm weights), or 'random' (untrained: the scores mean nothing)")


@dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate against what, and which metrics (the weights-file ones only when given)."""

    generated: tuple[str, ...]
    """completed generation outputs (each holds _run.json), one table row each"""
    reference: str | None = None
    """a folder of real images, or Parquet with jepa_score / embedding / encoder"""
    output: str | None = None
    """where evaluation.md and evaluation.json go"""
    max_samples: int = 10_000
    """per set, for the k-NN metrics (a uniform subsample with `seed`)"""
    nearest_k: int = 5
    """k of the k-NN balls (Naeem et al. 2020 use 5)"""
    seed: int = 0
    """chooses the k-NN subsample"""
    inception_weights: str | None = None
    """torch-fidelity Inception .pth: FID and sFID, and both against the reference's minority (cFID)"""
    clip_weights: str | None = None
    """an open_clip checkpoint: CLIP score of prompted runs"""
    clip_arch: str | None = None
    """the checkpoint's open_clip architecture, or a model config .json"""
    pickscore_weights: str | None = None
    """a local PickScore_v1 folder (transformers CLIPModel): PickScore of prompted runs"""
    pickscore_processor: str | None = None
    """the folder of its CLIP-H processor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K); None = the weights folder"""
    rarity_features: str | None = None
    """a FeatureSpace name; None = the most independent one available"""
    rarity_k: int = DEFAULT_K
    """k of AvgkNN, LOF and Rarity Score"""
    neighbours: str = "auto"
    """rarity's neighbour search: exact, approximate (a faiss index) or auto (approximate above 100,000 reference rows)"""
    baseline: str | None = None
    """one of the generated runs: the minority test's baseline (e.g. the unguided run)"""
    minority_quantile: float = 0.25
    """the rarest share of the reference (leave-one-out AvgkNN) that is its minority"""
    minority_per_class: bool = False
    """choose that share within each class (a Parquet reference with class_label)"""
    batch_size: int = 16
    """images per actor call (reference images, FID, CLIP)"""
    actors: int = 1
    """actors in the pool that runs the models"""
    cpus_per_actor: float = 1.0
    """fractions keep small machines from stalling"""
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    verbose: bool = False
    """Ray's own output too: Ray Data's operator progress and the workers' logs"""

    def __post_init__(self):
        from pipeline.evaluate.features import (CLIP_HINT, CLIP_SUFFIXES, INCEPTION_HINT, INCEPTION_SUFFIXES,
                                                FeatureSpace, check_pickscore_folders, check_weights_file)  # torch

        if not self.generated:
            raise UserError("give at least one generated run (--generated URI)")
        if len(set(self.generated)) != len(self.generated):
            raise UserError(f"a generated run is listed twice: {', '.join(self.generated)}")
        if self.nearest_k < 1:
            raise UserError(f"nearest_k must be >= 1, got {self.nearest_k}")
        if self.max_samples <= max(self.nearest_k, self.rarity_k):
            raise UserError(f"max_samples must exceed nearest_k ({self.nearest_k}) and rarity_k ({self.rarity_k}), "
                             f"got {self.max_samples}")
        if self.rarity_k < 1:
            raise UserError(f"rarity_k must be >= 1, got {self.rarity_k}")
        check_mode(self.neighbours)
        if self.rarity_features and not self.reference:
            raise UserError("rarity is measured against a reference: pass --reference with --rarity-features")
        if self.batch_size < 1 or self.actors < 1 or self.cpus_per_actor < 0:
            raise UserError("batch_size and actors must be >= 1, cpus_per_actor >= 0")
        if (self.clip_weights is None) != (self.clip_arch is None):
            raise UserError("CLIP score needs both --clip-weights and --clip-arch")
        if self.inception_weights and not self.reference:
            raise UserError("FID / sFID compare against a reference: pass --reference with --inception-weights")
        if self.inception_weights:
            check_weights_file(self.inception_weights, "Inception", INCEPTION_SUFFIXES, INCEPTION_HINT)
        if self.clip_weights:
            check_weights_file(self.clip_weights, "CLIP", CLIP_SUFFIXES, CLIP_HINT)
        if self.pickscore_processor and not self.pickscore_weights:
            raise UserError("--pickscore-processor goes with --pickscore-weights: pass the PickScore_v1 folder too")
        if self.pickscore_weights:
            check_pickscore_folders(self.pickscore_weights, self.pickscore_processor)
        if self.reference:
            FeatureSpace.choose(self.rarity_features, self.inception_weights, self.clip_weights)
        if self.baseline is not None and self.baseline not in self.generated:
            raise UserError(f"--baseline {self.baseline} is not one of the generated runs ({', '.join(self.generated)}): "
                             "pass one of the --generated URIs exactly as given")
        if self.baseline is not None and not self.reference:
            raise UserError("the minority test measures against a reference: pass --reference with --baseline")
        if not 0 < self.minority_quantile < 1:
            raise UserError(f"minority_quantile must lie strictly between 0 and 1, got {self.minority_quantile}")
        if self.minority_per_class and self.baseline is None:
            raise UserError("--minority-per-class chooses the minority test's reference: pass --baseline with it")

    @property
    def rarity_space(self) -> FeatureSpace | None:
        """Where rarity is measured: the named space, else the most independent one given; None without a reference."""
        from pipeline.evaluate.features import FeatureSpace  # torch

        return FeatureSpace.choose(self.rarity_features, self.inception_weights, self.clip_weights) if self.reference else None


@dataclass(frozen=True)
class ScoreConfig:
    """What to score and how. Lower scores are rarer under the world prior."""

    paths: tuple[str, ...]
    """image files or folders (searched recursively)"""
    weights: str | None = None
    """required: a local file / folder, "hub[:TAG]" (downloads), or "random" (untrained)"""
    encoder: str = "vit_small_patch14_reg4_dinov2"
    """a DINOv2 name, timm:<ViT architecture> or open_clip:<architecture>"""
    encoder_output: str = "cls"
    """the embedding: "cls" (CLS token after the final norm) or "pool" (mean of the patch tokens)"""
    method: str = "exact"
    """"exact" JEPA-SCORE (all singular values) or "topk" log-volume (randomized SVD)"""
    k: int = 9
    """top-k singular values for the "topk" method"""
    oversample: int = 2
    """extra sketch columns for the "topk" method"""
    power_iters: int = 2
    """subspace iterations for the "topk" method"""
    seed: int = 0
    """seeds each image's sketch for the "topk" method"""
    input_size: int | None = None
    """the encoder's input size (unset: a model folder's, else 224 for DINOv2, else timm's)"""
    batch_size: int = 4
    """images per encoder call"""
    max_pixels: int = 4096 * 4096
    """larger images are skipped and reported, not decoded"""
    device: str | None = None
    """torch device (default: cuda when available, else cpu)"""
    output: str | None = None
    """optional .csv or .parquet table of the scores"""

    def __post_init__(self):
        from guidance.checks import check_sketch
        from guidance.encoders import check_encoder  # torch
        from pipeline.evaluate.features import check_device  # torch

        if not self.paths:
            raise UserError("paths is empty: pass image files or folders to score")
        if not self.weights:
            raise UserError(f"no encoder weights given: pass --weights {WEIGHT_CHOICES}")
        check_encoder(self.encoder, self.weights, self.encoder_output, self.input_size)
        check_device(self.device)
        if self.method not in SCORE_METHODS:
            raise UserError(f"method must be one of {', '.join(SCORE_METHODS)}, got {self.method!r}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_pixels < 1:
            raise UserError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.method == "topk":
            check_sketch(self.k, self.oversample, self.power_iters)
        if self.output is not None:
            check_output(Path(self.output))


def check_output(output: Path) -> None:
    """The scores' table can be written there: checked before any image is scored, writing nothing."""
    if output.suffix not in OUTPUT_SUFFIXES:
        raise UserError(f"output must end in {' or '.join(OUTPUT_SUFFIXES)}, got {output}")
    if output.is_dir():
        raise UserError(f"output {output} is a folder: give a file name ending in {' or '.join(OUTPUT_SUFFIXES)}")
    try:
        check_reachable(resolve(str(output.parent), StorageConfig()))
    except StorageError as error:
        raise UserError(f"output {output}: {error}") from error


@dataclass(frozen=True)
class PriorConfig:
    """What to check: the reference, the encoder that scores it, the feature space rarity is measured in."""

    reference: str
    """a local folder of images, or Parquet in the generated schema (local or s3://)"""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """the world prior whose score is checked"""
    features: str | None = None
    """a FeatureSpace name; None = the most independent one available"""
    labels: str | None = None
    """a Parquet column, or a .csv / .json file mapping file name (or sample id) -> label"""
    k: int = DEFAULT_K
    """neighbours of AvgkNN"""
    neighbours: str = "auto"
    """AvgkNN's neighbour search: exact, approximate (a faiss index) or auto (approximate above 100,000 images)"""
    guidance_k: int | None = GuidanceConfig.k
    """the top-k score (guidance descends it) is checked at this k; None: not"""
    max_images: int = 2000
    """a uniform subsample (seeded) above this: every image costs D backward passes"""
    seed: int = 0
    """chooses the subsample"""
    nuisances: tuple[str, ...] = ("brightness", "contrast", "blur", "noise", "dilation", "erosion")
    """measure how far the score moves under these small changes of an image"""
    nuisance_images: int = 64
    """the nuisance measurement's uniform subsample: each nuisance scores each of them once more"""
    inception_weights: str | None = None
    clip_weights: str | None = None
    clip_arch: str | None = None
    batch_size: int = 16
    """images per encoder call"""
    device: str | None = None
    """torch device (default: cuda when available, else cpu)"""
    output: str | None = None
    """where prior_check.png and prior_check.json (last) go"""
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        from pipeline.evaluate.features import (CLIP_HINT, CLIP_SUFFIXES, INCEPTION_HINT, INCEPTION_SUFFIXES,
                                                FeatureSpace, check_device, check_weights_file)  # torch

        from pipeline.nuisance import CHANGES  # torch

        if self.k < 1 or self.max_images <= self.k:
            raise UserError(f"need k >= 1 and max_images > k, got k = {self.k}, max_images = {self.max_images}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        check_mode(self.neighbours)
        check_device(self.device)
        if self.guidance_k is not None and self.guidance_k < 1:
            raise UserError(f"guidance_k must be >= 1 (the top-k score's k), got {self.guidance_k}")
        unknown = [name for name in self.nuisances if name not in CHANGES]
        if unknown:
            raise UserError(f"unknown nuisance(s) {', '.join(unknown)}: choose from {', '.join(CHANGES)}, or none")
        if self.nuisance_images < 1:
            raise UserError(f"nuisance_images must be >= 1, got {self.nuisance_images}; turn the measurement off "
                             "with no nuisances instead")
        if (self.clip_weights is None) != (self.clip_arch is None):
            raise UserError("the clip feature space needs both --clip-weights and --clip-arch")
        if self.inception_weights:
            check_weights_file(self.inception_weights, "Inception", INCEPTION_SUFFIXES, INCEPTION_HINT)
        if self.clip_weights:
            check_weights_file(self.clip_weights, "CLIP", CLIP_SUFFIXES, CLIP_HINT)
        FeatureSpace.choose(self.features, self.inception_weights, self.clip_weights)

    @property
    def space(self) -> FeatureSpace:
        from pipeline.evaluate.features import FeatureSpace  # torch

        return FeatureSpace.choose(self.features, self.inception_weights, self.clip_weights)
