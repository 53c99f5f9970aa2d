"""Evaluate generated datasets against a reference: are the rare samples rare, and good?

One row per generated run (method), as in the paper's tables; rows a run committed under another
method (``output.retry_unguided``'s unguided fallback) are a row of their own, never mixed in:
  - rarity against the reference, in a feature space chosen by name (pipeline/evaluate/features.py
    ``FeatureSpace``): AvgkNN, LOF and Rarity Score (pipeline/evaluate/rarity.py), never through the
    JEPA-SCORE; and the prior check of the reference (pipeline/evaluate/prior.py);
  - the guidance objective (not an independent measure): the JEPA-SCORE distribution and the share
    below the reference's 10th percentile;
  - quality and coverage in the encoder's embedding space: Frechet distance and the k-NN metrics
    (precision, recall, density, coverage; pipeline/evaluate/metrics.py);
  - with local weights files: Inception FID / sFID, and CLIP score for prompted runs;
  - with a baseline run, the minority test of every other row in the rarity space, paired by seed
    (pipeline/evaluate/minority.py): closer to the reference's rare part, or only off the data.
Generated rows are streamed through Ray Data reading only stored scores and embeddings (images only
when FID or CLIP need them); nothing stored is recomputed. A reference image folder is embedded and
scored with the generated runs' own encoder (from ``_run.json``). Means and covariances see every
row; the k-NN metrics and rarity use one uniform subsample of at most ``max_samples`` per set (fixed seed).
``evaluation.md`` then ``evaluation.json`` (the completion marker) go to the output folder; the table
is logged to MLflow as a parent run with one child per generation run.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.cluster import connect_ray
from pipeline.curate.selection import valid_scores
from pipeline.evaluate.features import (CLIP_HINT, CLIP_SUFFIXES, INCEPTION_HINT, INCEPTION_SUFFIXES, EvalFeatures,
                                       FeatureSpace, FeatureSpec, check_weights_file)
from pipeline.evaluate.metrics import REFERENCE_QUANTILE, Gaussian, Moments, Subsample, manifold_metrics, score_summary, share_below
from pipeline.evaluate.minority import BASELINE, FIGURES, MinorityConfig, MinorityReference, minority_test
from pipeline.evaluate.prior import prior_summary
from pipeline.evaluate.rarity import DEFAULT_K, RaritySummary
from pipeline.evaluate.reference import find_reference
from pipeline.layout import missing_columns
from pipeline.rows import committed_footers
from pipeline.schema import DATA_DIR, EVALUATION_FILE, EVALUATION_TABLE_FILE, FAILURES_DIR, PRIOR_CHECK_PLOT, RUN_FILE
from pipeline.settings import TrackingConfig, flatten, to_dict
from pipeline.storage import Location, StorageConfig, StorageError, check_writable, delete, exists, list_files, read_bytes, resolve, write_bytes

log = logging.getLogger(__name__)
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
            raise ValueError("give at least one generated run (--generated URI)")
        if len(set(self.generated)) != len(self.generated):
            raise ValueError(f"a generated run is listed twice: {', '.join(self.generated)}")
        if self.nearest_k < 1:
            raise ValueError(f"nearest_k must be >= 1, got {self.nearest_k}")
        if self.max_samples <= max(self.nearest_k, self.rarity_k):
            raise ValueError(f"max_samples must exceed nearest_k ({self.nearest_k}) and rarity_k ({self.rarity_k}), "
                             f"got {self.max_samples}")
        if self.rarity_k < 1:
            raise ValueError(f"rarity_k must be >= 1, got {self.rarity_k}")
        if self.rarity_features and not self.reference:
            raise ValueError("rarity is measured against a reference: pass --reference with --rarity-features")
        if self.batch_size < 1 or self.actors < 1 or self.cpus_per_actor < 0:
            raise ValueError("batch_size and actors must be >= 1, cpus_per_actor >= 0")
        if (self.clip_weights is None) != (self.clip_arch is None):
            raise ValueError("CLIP score needs both --clip-weights and --clip-arch")
        if self.inception_weights and not self.reference:
            raise ValueError("FID / sFID compare against a reference: pass --reference with --inception-weights")
        if self.inception_weights:
            check_weights_file(self.inception_weights, "Inception", INCEPTION_SUFFIXES, INCEPTION_HINT)
        if self.clip_weights:
            check_weights_file(self.clip_weights, "CLIP", CLIP_SUFFIXES, CLIP_HINT)
        if self.reference:
            FeatureSpace.choose(self.rarity_features, self.inception_weights, self.clip_weights)
        if self.baseline is not None and self.baseline not in self.generated:
            raise ValueError(f"--baseline {self.baseline} is not one of the generated runs ({', '.join(self.generated)}): "
                             "pass one of the --generated URIs exactly as given")
        if self.baseline is not None and not self.reference:
            raise ValueError("the minority test measures against a reference: pass --reference with --baseline")
        if not 0 < self.minority_quantile < 1:
            raise ValueError(f"minority_quantile must lie strictly between 0 and 1, got {self.minority_quantile}")
        if self.minority_per_class and self.baseline is None:
            raise ValueError("--minority-per-class chooses the minority test's reference: pass --baseline with it")

    @property
    def rarity_space(self) -> FeatureSpace | None:
        """Where rarity is measured: the named space, else the most independent one given; None without a reference."""
        return FeatureSpace.choose(self.rarity_features, self.inception_weights, self.clip_weights) if self.reference else None


@dataclass
class SetStats:
    """What one set (a generated run or the reference) contributes to the table."""

    rows: int  # rows read
    invalid: int  # rows without a finite score or an embedding (counted, left out)
    scores: np.ndarray  # every valid row's JEPA-SCORE
    embedding: Gaussian  # of the CLS embeddings
    sample: np.ndarray  # uniform subsample of the embeddings, for the k-NN metrics
    encoders: set[str]  # the `encoder` column's values
    pool: Gaussian | None = None  # Inception pool3
    spatial: Gaussian | None = None  # Inception mixed_6/conv[:7]
    clip_score: float | None = None  # mean over prompted rows
    clip_rows: int = 0
    rarity: np.ndarray | None = None  # the subsample's features in the rarity space (the same rows as `sample`)
    rarity_scores: np.ndarray | None = None  # the same rows' JEPA-SCOREs, paired (the reference's prior check)
    topk_scores: np.ndarray | None = None  # the valid rows' stored top-k scores, when the set has them
    rarity_seeds: np.ndarray | None = None  # the rarity subsample's seeds (generated runs: the minority test pairs by them)
    rarity_labels: np.ndarray | None = None  # the rarity subsample's class labels (-1: none), when the set has them


class Collector:
    """Consumes Arrow batches of one set; memory stays bounded by the subsample and the moments."""

    def __init__(self, max_samples: int, seed: int, rarity_column: str | None = None):
        self.rows = self.invalid = 0
        self.scores: list[np.ndarray] = []
        self.subsample = Subsample(max_samples, seed)
        self.rarity_column = rarity_column
        self.rarity = Subsample(max_samples, seed)  # the same keys: the same rows as `subsample`
        self.rarity_scores = Subsample(max_samples, seed, np.float64)
        self.rarity_seeds = Subsample(max_samples, seed, np.int64)
        self.rarity_labels = Subsample(max_samples, seed, np.int64)
        self.moments: dict[str, Moments] = {}
        self.encoders: set[str] = set()
        self.clip: list[np.ndarray] = []
        self.topk: list[np.ndarray] = []

    def add(self, batch: pa.Table) -> None:
        self.rows += batch.num_rows
        valid = valid_scores(batch)
        valid = valid.filter(pc.is_valid(valid.column("embedding")))
        self.invalid += batch.num_rows - valid.num_rows
        if not valid.num_rows:
            return
        self.scores.append(valid.column("jepa_score").to_numpy())
        if "topk_score" in valid.column_names:
            self.topk.append(valid_scores(valid, "topk_score").column("topk_score").to_numpy())
        if "encoder" in valid.column_names:
            self.encoders |= set(valid.column("encoder").unique().to_pylist()) - {None}
        ids = valid.column("sample_id").to_pylist()
        embeddings = _matrix(valid.column("embedding"))
        self.subsample.add(ids, embeddings)
        for name in ("embedding", "pool", "spatial"):
            if name in valid.column_names:
                features = embeddings if name == "embedding" else _matrix(valid.column(name))
                self.moments.setdefault(name, Moments(features.shape[1])).add(features)
        if self.rarity_column:
            column = self.rarity_column
            self.rarity.add(ids, embeddings if column == "embedding" else _matrix(valid.column(column)))
            self.rarity_scores.add(ids, valid.column("jepa_score").to_numpy()[:, None])
            for name, kept in (("seed", self.rarity_seeds), ("class_label", self.rarity_labels)):
                if name in valid.column_names:
                    kept.add(ids, pc.fill_null(valid.column(name), -1).to_numpy()[:, None])
        if "clip_score" in valid.column_names:
            values = valid.column("clip_score").drop_null().to_numpy()
            self.clip.append(values)

    def result(self, what: str) -> SetStats:
        if "embedding" not in self.moments or self.moments["embedding"].count < 2:
            raise ValueError(f"{what} holds fewer than 2 rows with a finite JEPA-SCORE and an embedding "
                             f"({self.rows} rows read, {self.invalid} without): nothing to evaluate")
        clip = np.concatenate(self.clip) if self.clip else np.zeros(0)
        gaussian = {name: Gaussian.of(m) for name, m in self.moments.items()}
        rarity = (self.rarity.features, self.rarity_scores.features[:, 0]) if self.rarity_column else (None, None)
        seeds, labels = (kept.features[:, 0] if kept.rows is not None else None
                         for kept in (self.rarity_seeds, self.rarity_labels))
        return SetStats(self.rows, self.invalid, np.concatenate(self.scores), gaussian["embedding"],
                        self.subsample.features, self.encoders, gaussian.get("pool"), gaussian.get("spatial"),
                        float(clip.mean()) if len(clip) else None, len(clip), *rarity,
                        topk_scores=np.concatenate(self.topk) if sum(map(len, self.topk)) else None,
                        rarity_seeds=seeds, rarity_labels=labels)


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A list<float> column of equal-length rows as an (N, D) float64 array."""
    array = column.combine_chunks()
    lengths = pc.list_value_length(array)
    if pc.min(lengths).as_py() != pc.max(lengths).as_py():
        raise ValueError(f"feature rows of different lengths ({pc.min(lengths)} to {pc.max(lengths)}) in one set")
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), -1).astype(np.float64)


@dataclass(frozen=True)
class GeneratedRun:
    """A completed generation output and what its _run.json says."""

    uri: str
    location: Location
    files: list[str]
    method: str
    encoder: dict
    generation_run_id: str | None
    failed: int
    label: str = ""


def open_generated(uri: str, storage: StorageConfig) -> GeneratedRun:
    location = resolve(uri, storage)
    if not exists(location.child(RUN_FILE)):
        raise StorageError(f"{uri} is not a completed generation run (no {RUN_FILE}); finish it first")
    run = json.loads(read_bytes(location.child(RUN_FILE)))
    config = run.get("config", {})
    if "encoder" not in config or "sampling" not in config:
        raise ValueError(f"{uri}/{RUN_FILE} has no encoder / sampling config: was it written by jepa-minority generate?")
    files = [f.path for f in list_files(location.child(DATA_DIR), ".parquet")]
    if not files:
        raise ValueError(f"{uri} holds no data files ({DATA_DIR}/*.parquet): nothing to evaluate")
    rows = sum(footer.num_rows for footer in committed_footers(location))  # footers only; a corrupt file named
    if rows < 2:
        raise ValueError(f"{uri} holds fewer than 2 rows ({rows} committed): nothing to evaluate")
    return GeneratedRun(uri, location, files, config["sampling"]["method"], config["encoder"], run.get("last_run_id"),
                        len(list_files(location.child(FAILURES_DIR), ".json")))


def _labelled(runs: list[GeneratedRun]) -> list[GeneratedRun]:
    """Rows are named by method; runs sharing a method are told apart by their folder names."""
    methods = [run.method for run in runs]
    return [replace(run, label=run.method if methods.count(run.method) == 1
                    else f"{run.method} ({run.uri.rstrip('/').rsplit('/', 1)[-1]})") for run in runs]


def _same_encoder(runs: list[GeneratedRun]) -> dict:
    first = runs[0].encoder
    for run in runs[1:]:
        if run.encoder != first:
            raise ValueError(f"{runs[0].uri} and {run.uri} were scored by different encoders ({first} vs {run.encoder}): "
                             "their JEPA-SCOREs and embeddings are not comparable; evaluate them separately")
    return first


def run_evaluation(config: EvaluateConfig) -> dict:
    """Evaluate every generated run against the reference; returns the report (evaluation.json)."""
    from pipeline.tracking import RunTracker, folder_name, run_name

    runs = _labelled([open_generated(uri, config.storage) for uri in config.generated])
    encoder = _same_encoder(runs)
    target = resolve(config.output, config.storage) if config.output else None
    if target:
        check_writable(target)
        if exists(target.child(EVALUATION_FILE)):  # a failed rerun must not leave the old marker beside a new table
            delete(target.child(EVALUATION_FILE))
    parquet, images = find_reference(config.reference, config.storage) if config.reference else ([], [])
    if config.reference:
        _check_reference(config, encoder, parquet, images)
    # every model loads once here first, on the CPU: a bad weights file fails before any data is read
    EvalFeatures(_spec(config, encoder if images else None, clip_score=True) or FeatureSpec(), device="cpu")
    connect_ray(dashboard=False, verbose=config.verbose)

    reference = None
    if parquet:
        reference = _reference_parquet_stats(config, encoder, parquet)
    elif images:
        reference = _reference_image_stats(config, encoder, images)
    stats, rows = {}, []
    for run in runs:
        log.info("reading %s (%d files)", run.uri, len(run.files))
        for row, row_stats in _generated_stats(config, run):
            rows.append(row)
            stats[row.label] = row_stats
    runs = rows
    prior, plot = _prior_check(config, reference) if reference else (None, None)
    report = _report(config, encoder, runs, stats, reference, prior)
    table = markdown(report)

    parent = RunTracker(config.tracking, run_name=run_name("evaluate", " vs ".join(run.label for run in runs),
                                                           folder_name(config.output) if config.output else None),
                        tags={"generated_uris": ",".join(config.generated), "reference_uri": config.reference or ""})
    status = "FAILED"
    try:
        parent.log_params(flatten(to_dict(config)))
        if prior and prior["spearman"] is not None:
            parent.log_metrics({"prior_check_spearman": prior["spearman"], "prior_check_images": prior["images"]})
        for run, row in zip(runs, report["rows"]):
            child = RunTracker(config.tracking, run_name=run_name("evaluate", run.method, folder_name(run.uri)),
                               tags={"mlflow.parentRunId": parent.run_id, "input_uri": run.uri, "method": run.method,
                                     "generation_run_id": run.generation_run_id or "",
                                     "rarity_feature_space": row.get("rarity", {}).get("feature_space", ""),
                                     "minority_verdict": row.get("minority", {}).get("verdict", "")})
            child.log_metrics(row_metrics(row))
            child.end("FINISHED")
            row["evaluation_run_id"] = child.run_id
        report["evaluation_run_id"] = parent.run_id
        data = json.dumps(report, indent=2).encode()
        if plot:
            parent.log_artifact_bytes(PRIOR_CHECK_PLOT, plot)
        parent.log_artifact_bytes(EVALUATION_TABLE_FILE, table.encode())
        parent.log_artifact_bytes(EVALUATION_FILE, data)
        if target:
            if plot:
                write_bytes(target.child(PRIOR_CHECK_PLOT), plot)
            write_bytes(target.child(EVALUATION_TABLE_FILE), table.encode())
            write_bytes(target.child(EVALUATION_FILE), data)  # last: the completion marker
        status = "FINISHED"
        return report
    finally:
        parent.end(status)


def _actor_options(config: EvaluateConfig) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return dict(batch_size=config.batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=config.actors),
                num_cpus=config.cpus_per_actor, num_gpus=gpus)


def _spec(config: EvaluateConfig, encoder: dict | None, clip_score: bool) -> FeatureSpec | None:
    """What the actor computes for a set: the encoder's embedding and score (reference images), Inception
    (when given), CLIP (prompted runs' scores, or the clip rarity space), pixels; None when nothing."""
    space = config.rarity_space
    clip_space = space is not None and space.name == "clip"
    clip = clip_space or (clip_score and config.clip_weights is not None)
    pixels = space.name if space is not None and space.column == "pixels" else None
    if not (encoder or config.inception_weights or clip or pixels):
        return None
    return FeatureSpec(encoder, config.inception_weights, config.clip_weights if clip else None,
                       config.clip_arch if clip else None, clip_features=clip_space, pixels=pixels)


def _batches(config: EvaluateConfig, dataset, spec: FeatureSpec | None):
    if spec is not None:
        dataset = dataset.map_batches(EvalFeatures, fn_constructor_kwargs={
            "spec": spec, "threads": max(1, int(config.cpus_per_actor))}, **_actor_options(config))
    return dataset.iter_batches(batch_size=READ_BATCH if spec is None else config.batch_size, batch_format="pyarrow")


def _collector(config: EvaluateConfig) -> Collector:
    space = config.rarity_space
    return Collector(config.max_samples, config.seed, space.column if space else None)


def _collect(config: EvaluateConfig, dataset, spec: FeatureSpec | None, what: str) -> SetStats:
    collector = _collector(config)
    for batch in _batches(config, dataset, spec):
        collector.add(batch)
    return collector.result(what)


def _generated_stats(config: EvaluateConfig, run: GeneratedRun) -> list[tuple[GeneratedRun, SetStats]]:
    """The run's own rows, then one set per other method in its rows (the unguided fallback's); a fallback
    set too small to evaluate (< 2 usable rows) is named in the log and left out of the table."""
    import ray

    spec = _spec(config, None, clip_score=True)
    topk = [] if "topk_score" in missing_columns(run.location) else ["topk_score"]  # older runs have none
    columns = ["sample_id", "seed", "jepa_score", *topk, "embedding", "encoder", "method"] + (["image", "prompt"] if spec else [])
    dataset = ray.data.read_parquet(run.files, filesystem=run.location.filesystem).select_columns(columns)
    by_method: dict[str, Collector] = {}
    for batch in _batches(config, dataset, spec):
        for method in pc.unique(batch.column("method")).to_pylist():
            part = batch.filter(pc.equal(batch.column("method"), method))
            by_method.setdefault(method, _collector(config)).add(part)
    sets = [(run, by_method.pop(run.method, _collector(config)).result(run.uri))]
    for method, collector in sorted(by_method.items()):
        if collector.rows - collector.invalid < 2:
            log.warning("%s holds %d %s row(s) (fallback): too few to evaluate, left out", run.uri, collector.rows, method)
            continue
        fallback = replace(run, method=method, label=f"{method} (fallback in {run.label})", failed=0)
        sets.append((fallback, collector.result(f"{run.uri}'s {method} rows")))
    for _, stats in sets:
        if stats.encoders - {run.encoder["name"]}:
            raise ValueError(f"{run.uri} holds rows of encoders {sorted(stats.encoders)} but its {RUN_FILE} names "
                             f"{run.encoder['name']}")
    return sets


def _reference_parquet_stats(config: EvaluateConfig, encoder: dict, files: list[str]) -> SetStats:
    """A reference already embedded and scored, read as stored and checked against the runs' encoder."""
    import ray

    location = resolve(config.reference, config.storage)
    spec = _spec(config, None, clip_score=False)
    dataset = ray.data.read_parquet(files, filesystem=location.filesystem).select_columns(_reference_columns(config))
    stats = _collect(config, dataset, spec, f"reference {config.reference}")
    if stats.encoders != {encoder["name"]}:
        raise ValueError(f"reference {config.reference} was embedded by {sorted(stats.encoders) or 'no named encoder'}"
                         f", not by the generated runs' {encoder['name']}: embed it with the same encoder")
    return stats


def _reference_image_stats(config: EvaluateConfig, encoder: dict, files: list[Path]) -> SetStats:
    """Real images, embedded and scored (exact JEPA-SCORE) here by the generated runs' encoder."""
    import ray

    log.info("embedding and scoring %d reference images with %s", len(files), encoder["name"])
    root = Path(resolve(config.reference, config.storage).path)
    dataset = ray.data.from_items([{"sample_id": str(f.relative_to(root)), "path": str(f)} for f in files])
    return _collect(config, dataset, _spec(config, encoder, clip_score=False), f"reference {config.reference}")


def _reference_columns(config: EvaluateConfig) -> list[str]:
    """What a Parquet reference must hold: its stored scores and embeddings, and images when features need them."""
    return (["sample_id", "jepa_score", "embedding", "encoder"] + (["image"] if _spec(config, None, False) else [])
            + (["class_label"] if config.minority_per_class else []))


def _check_reference(config: EvaluateConfig, encoder: dict, parquet: list[str], images: list[Path]) -> None:
    """A Parquet reference's columns and input size, and a size that rarity's k can use: before any model runs."""
    location = resolve(config.reference, config.storage)
    count = len(images)
    if parquet:
        dataset = pads.dataset(parquet, filesystem=location.filesystem, format="parquet")
        missing = [c for c in _reference_columns(config) if c not in dataset.schema.names]
        if missing:
            raise ValueError(f"reference {config.reference} lacks the column(s) {', '.join(missing)}: give Parquet in "
                             "the generated schema (pipeline/schema.py) or a folder of images to embed here")
        _check_reference_run(location, config.reference, encoder)
        count = dataset.count_rows()
    if count <= config.rarity_k:
        raise ValueError(f"reference {config.reference} holds {count} rows but rarity with k = {config.rarity_k} "
                         f"needs more than k: lower --rarity-k to at most {max(count - 1, 0)} or give a larger reference")
    if config.minority_per_class and not parquet:
        raise ValueError(f"--minority-per-class needs the reference's class labels: give Parquet with a class_label "
                         f"column, not the image folder {config.reference}")
    minority = round(config.minority_quantile * min(count, config.max_samples))
    if config.baseline and minority <= config.nearest_k:
        raise ValueError(f"the minority test's reference would hold about {minority} rows ({config.minority_quantile} "
                         f"of {count}), but k-NN balls of --nearest-k {config.nearest_k} need more: raise "
                         "--minority-quantile, lower --nearest-k or give a larger reference")


def _prior_check(config: EvaluateConfig, reference: SetStats) -> tuple[dict, bytes]:
    """The prior check on the reference's subsample: its JEPA-SCORE against its own rarity, and the plot."""
    from pipeline.report import score_against_rarity

    space = config.rarity_space
    summary, within = prior_summary(reference.rarity_scores, reference.rarity, space, config.rarity_k)
    return summary, score_against_rarity(within, reference.rarity_scores, summary["binned"], summary["verdict"], space.name)


def _check_reference_run(location: Location, uri: str, encoder: dict) -> None:
    """A reference that is itself a generation run must have been scored at the same input size."""
    if location.path.endswith(".parquet") or not exists(location.child(RUN_FILE)):
        return
    theirs = json.loads(read_bytes(location.child(RUN_FILE))).get("config", {}).get("encoder", {})
    if theirs.get("input_size") != encoder["input_size"]:
        raise ValueError(f"reference {uri} was scored at input size {theirs.get('input_size')}, the generated runs at "
                         f"{encoder['input_size']}: their JEPA-SCOREs are not comparable")


def _report(config: EvaluateConfig, encoder: dict, runs: list[GeneratedRun], stats: dict[str, SetStats],
            reference: SetStats | None, prior: dict | None) -> dict:
    threshold = float(np.quantile(reference.scores, REFERENCE_QUANTILE)) if reference else None
    if reference:
        for run in runs:
            dims = (stats[run.label].embedding.mean.shape, reference.embedding.mean.shape)
            if dims[0] != dims[1]:
                raise ValueError(f"reference embeddings have dimension {dims[1][0]}, {run.uri}'s {dims[0][0]}: "
                                 "the reference must be embedded with the generated runs' encoder")
    rows = []
    for run in runs:
        mine = stats[run.label]
        row = {"method": run.label, "uri": run.uri, "generation_run_id": run.generation_run_id,
               "rows": mine.rows, "invalid": mine.invalid, "failed_in_input": run.failed,
               "jepa_score": score_summary(mine.scores)}
        if mine.topk_scores is not None:
            row["topk_score"] = score_summary(mine.topk_scores)
        if reference:
            row["jepa_score"]["rarer_than_reference_p10"] = share_below(mine.scores, threshold)
            row["embedding"] = {"fd": mine.embedding.distance(reference.embedding), "samples": len(mine.sample)}
            row["embedding"] |= manifold_metrics(reference.sample, mine.sample, config.nearest_k)
            rarity = RaritySummary.of(mine.rarity, reference.rarity, config.rarity_space.name, config.rarity_k)
            row["rarity"] = to_dict(rarity) | {"samples": len(mine.rarity)}
        if mine.pool is not None:
            row["inception"] = {"fid": mine.pool.distance(reference.pool), "sfid": mine.spatial.distance(reference.spatial)}
        if config.clip_weights:
            row["clip_score"] = mine.clip_score
            row["clip_rows"] = mine.clip_rows
        rows.append(row)
    if config.baseline:
        _minority_tests(config, runs, stats, reference, rows)
    space = config.rarity_space
    return {
        "encoder": encoder,
        "reference": None if reference is None else {
            "uri": config.reference, "rows": reference.rows, "invalid": reference.invalid,
            "jepa_score": score_summary(reference.scores), "p10": threshold, "knn_samples": len(reference.sample)},
        "rarity": None if space is None else {
            "feature_space": space.name, "description": space.description, "independent": space.independent,
            "k": config.rarity_k, "reference_samples": len(reference.rarity),
            "samples": "the k-NN metrics' subsample: every row when a set has at most max_samples, else a uniform "
                       "subsample of max_samples"},
        "prior_check": prior,
        "minority": None if not config.baseline else {
            "baseline": next(r["method"] for r in rows if r.get("minority", {}).get("verdict") == BASELINE),
            "baseline_uri": config.baseline, "quantile": config.minority_quantile,
            "per_class": config.minority_per_class, "precision_margin": MinorityConfig().precision_margin,
            "resamples": MinorityConfig().resamples},
        "settings": {"max_samples": config.max_samples, "nearest_k": config.nearest_k, "seed": config.seed,
                     "subsample": "uniform over sample ids (blake2b of seed and id); moments use every row",
                     "inception_weights": config.inception_weights, "clip_arch": config.clip_arch},
        "rows": rows,
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }


def _minority_tests(config: EvaluateConfig, runs: list[GeneratedRun], stats: dict[str, SetStats],
                    reference: SetStats, rows: list[dict]) -> None:
    """Each row's minority test against the baseline run's own rows (docs/method.md, 'The minority test')."""
    space = config.rarity_space
    base = next(run for run in runs if run.uri == config.baseline)  # the run's own rows come before its fallback's
    chosen = MinorityReference(reference.rarity, MinorityConfig(config.minority_quantile, config.minority_per_class,
                                                                config.rarity_k, config.nearest_k, seed=config.seed),
                               reference.rarity_labels)
    bounds = (0.0, 1.0) if space.column == "pixels" else None
    theirs = stats[base.label]
    for run, row in zip(runs, rows):
        if run is base:
            row["minority"] = {"verdict": BASELINE, **chosen.figures(theirs.rarity).whole(), "baseline_run": base.label}
            continue
        mine = stats[run.label]
        row["minority"] = minority_test(mine.rarity, theirs.rarity, chosen, (mine.rarity_seeds, theirs.rarity_seeds),
                                        bounds) | {"baseline_run": base.label}


def row_metrics(row: dict) -> dict[str, float]:
    """A table row as flat MLflow metrics (values that exist and are finite)."""
    values = {"rows": row["rows"], "invalid": row["invalid"], "failed_in_input": row["failed_in_input"]}
    score = row["jepa_score"]
    values |= {"jepa_score_mean": score["mean"], "jepa_score_std": score["std"]}
    values |= {f"jepa_score_{name}": value for name, value in score["quantiles"].items()}
    if "rarer_than_reference_p10" in score:
        values["rarer_than_reference_p10"] = score["rarer_than_reference_p10"]
    if "topk_score" in row:
        values |= {"topk_score_mean": row["topk_score"]["mean"], "topk_score_std": row["topk_score"]["std"]}
    values |= {f"embedding_{name}": value for name, value in row.get("embedding", {}).items()}
    values |= row.get("inception", {})
    rarity = row.get("rarity")
    if rarity:
        values |= {"rarity_avg_knn": rarity["avg_knn"], "rarity_lof": rarity["lof"],
                   "rarity_score_uncovered": rarity["rarity_score_uncovered"], "rarity_samples": rarity["samples"]}
        values |= {f"rarity_avg_knn_{name}": value for name, value in rarity["avg_knn_quantiles"].items()}
        if rarity["rarity_score"] is not None:
            values["rarity_score"] = rarity["rarity_score"]
    if row.get("clip_score") is not None:
        values["clip_score"] = row["clip_score"]
    minority = row.get("minority", {})
    values |= {f"minority_{name}": minority[name] for name in FIGURES if name in minority}
    for name, (low, high) in minority.get("intervals", {}).items():
        values |= {f"minority_{name}_diff_low": low, f"minority_{name}_diff_high": high}
    return {key: float(value) for key, value in values.items() if math.isfinite(value)}


COLUMNS = [  # (header, how to read it from a row): the paper's layout, lower / higher is better as marked
    ("samples", lambda r: f"{r['rows'] - r['invalid']}"),
    ("AvgkNN ↑", lambda r: _fmt(r.get("rarity", {}).get("avg_knn"))),
    ("LOF ↑", lambda r: _fmt(r.get("rarity", {}).get("lof"))),
    ("Rarity Score ↑", lambda r: _fmt(r.get("rarity", {}).get("rarity_score"))),
    ("uncovered", lambda r: _fmt(r.get("rarity", {}).get("rarity_score_uncovered"))),
    ("JEPA-SCORE (objective) ↓", lambda r: f"{r['jepa_score']['mean']:.2f} ± {r['jepa_score']['std']:.2f}"),
    ("below ref. p10 (objective) ↑", lambda r: _fmt(r["jepa_score"].get("rarer_than_reference_p10"))),
    ("FD (encoder) ↓", lambda r: _fmt(r.get("embedding", {}).get("fd"))),
    ("precision ↑", lambda r: _fmt(r.get("embedding", {}).get("precision"))),
    ("recall ↑", lambda r: _fmt(r.get("embedding", {}).get("recall"))),
    ("density ↑", lambda r: _fmt(r.get("embedding", {}).get("density"))),
    ("coverage ↑", lambda r: _fmt(r.get("embedding", {}).get("coverage"))),
    ("FID ↓", lambda r: _fmt(r.get("inception", {}).get("fid"))),
    ("sFID ↓", lambda r: _fmt(r.get("inception", {}).get("sfid"))),
    ("CLIP ↑", lambda r: _fmt(r.get("clip_score"))),
    ("minority test", lambda r: r["minority"]["verdict"] if "minority" in r else "—"),
    ("FD to minority ↓", lambda r: _fmt(r.get("minority", {}).get("fd_minority"))),
    ("nearest is minority ↑", lambda r: _fmt(r.get("minority", {}).get("nearest_minority_share"))),
    ("top-k score ↓", lambda r: f"{r['topk_score']['mean']:.2f} ± {r['topk_score']['std']:.2f}" if "topk_score" in r else "—"),
]


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def markdown(report: dict) -> str:
    """The table (columns without any value left out), then what it was measured against."""
    rows = report["rows"]
    columns = [(name, cell) for name, cell in COLUMNS if any(cell(r) != "—" for r in rows)]
    lines = ["| method | " + " | ".join(name for name, _ in columns) + " |",
             "| --- | " + " | ".join("---" for _ in columns) + " |"]
    lines += [f"| {r['method']} | " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    encoder = report["encoder"]
    notes = [f"Encoder: {encoder['name']} ({encoder['weights']}, input {encoder['input_size']}). "
             "JEPA-SCORE: mean ± std of the exact score, lower is rarer; top-k score: of the exact top-k "
             "log-volume at each run's guidance k; both are the guidance objective, not independent measures of rarity."]
    reference = report["reference"]
    if reference:
        settings, rarity = report["settings"], report["rarity"]
        notes.append(f"Rarity against the reference in feature space {rarity['feature_space']} ({rarity['description']})"
                     f": AvgkNN, LOF and Rarity Score (larger = rarer; uncovered = share outside every reference "
                     f"ball), k = {rarity['k']}, on the k-NN subsample ({rarity['reference_samples']} reference rows).")
        notes.append(f"Prior check of the reference: {report['prior_check']['verdict']}.")
        if report["minority"]:
            minority = report["minority"]
            notes.append(f"Minority test against {minority['baseline']} (docs/method.md, 'The minority test'): the "
                         f"minority is the reference's rarest {minority['quantile']:.0%} by leave-one-out AvgkNN"
                         f"{' within each class' if minority['per_class'] else ''} in {rarity['feature_space']}; "
                         "minority = closer to it by FD than the baseline (bootstrap interval excluding 0) with "
                         f"precision at most {minority['precision_margin']} below the baseline's; off-data = rarer by "
                         "AvgkNN but not closer; only minority runs are rarer than the baseline in the data.")
        notes.append(f"Reference: {reference['uri']}, {reference['rows'] - reference['invalid']} samples, JEPA-SCORE "
                     f"{reference['jepa_score']['mean']:.2f} ± {reference['jepa_score']['std']:.2f}, "
                     f"10th percentile {reference['p10']:.2f}.")
        notes.append(f"FD uses every sample; precision / recall / density / coverage use k = {settings['nearest_k']} "
                     f"on at most {settings['max_samples']} samples per set (uniform, seed {settings['seed']}).")
    else:
        notes.append("No reference given: rarity only.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
