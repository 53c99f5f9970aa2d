"""The evaluate job's typed config: what to evaluate against what, and which metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.evaluate.features import (CLIP_HINT, CLIP_SUFFIXES, INCEPTION_HINT, INCEPTION_SUFFIXES, FeatureSpace,
                                        check_weights_file)
from pipeline.evaluate.rarity import DEFAULT_K
from pipeline.settings import TrackingConfig, UserError
from pipeline.storage import StorageConfig


READ_BATCH = 4096  # rows per driver-side batch when no model runs

@dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate against what, and which metrics (the weights-file ones only when given)."""

    generated: tuple[str, ...]  # completed generation outputs (each holds _run.json), one table row each
    reference: str | None = None  # a folder of real images, or Parquet with jepa_score / embedding / encoder
    output: str | None = None  # where evaluation.md and evaluation.json go
    max_samples: int = 10_000  # per set, for the k-NN metrics (a uniform subsample with `seed`)
    nearest_k: int = 5  # k of the k-NN balls (Naeem et al. 2020 use 5)
    seed: int = 0  # chooses the k-NN subsample
    inception_weights: str | None = None  # torch-fidelity Inception .pth: FID and sFID
    clip_weights: str | None = None  # an open_clip checkpoint: CLIP score of prompted runs
    clip_arch: str | None = None  # the checkpoint's open_clip architecture, or a model config .json
    rarity_features: str | None = None  # a FeatureSpace name; None = the most independent one available
    rarity_k: int = DEFAULT_K  # k of AvgkNN, LOF and Rarity Score
    baseline: str | None = None  # one of the generated runs: the minority test's baseline (e.g. the unguided run)
    minority_quantile: float = 0.25  # the rarest share of the reference (leave-one-out AvgkNN) that is its minority
    minority_per_class: bool = False  # choose that share within each class (a Parquet reference with class_label)
    batch_size: int = 16  # images per actor call (reference images, FID, CLIP)
    actors: int = 1  # actors in the pool that runs the models
    cpus_per_actor: float = 1.0  # fractions keep small machines from stalling
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    verbose: bool = False  # Ray's own output too: Ray Data's operator progress and the workers' logs

    def __post_init__(self):
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
        return FeatureSpace.choose(self.rarity_features, self.inception_weights, self.clip_weights) if self.reference else None
