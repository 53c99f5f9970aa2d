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
  - with local weights files: Inception FID / sFID, against the whole reference and against its minority
    (cFID / sFID, the rarest ``minority_quantile`` by leave-one-out AvgkNN in the rarity space), and
    CLIP score and PickScore for prompted runs;
  - with a baseline run, the minority test of every other row in the rarity space, paired by seed
    (pipeline/evaluate/minority.py): closer to the reference's rare part, or only off the data.
Generated rows are streamed through Ray Data reading only stored scores and embeddings (images only
when FID or CLIP need them); nothing stored is recomputed. A reference image folder is embedded and
scored with the generated runs' own encoder (from ``_run.json``). Means and covariances see every
row; the k-NN metrics and rarity use one uniform subsample of at most ``max_samples`` per set (fixed seed).
``evaluation.md`` then ``evaluation.json`` (the completion marker) go to the output folder; the table
is logged to MLflow as a parent run with one child per generation run.

This module orchestrates; its parts live beside it: the config (``config.py``), the runs read
(``runs.py``), what a set contributes (``collect.py``) and the table (``table.py``).
"""


from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.evaluate.collect import Collector, SetStats
from pipeline.evaluate.config import EvaluateConfig
from pipeline.evaluate.runs import GeneratedRun, check_reference_run, labelled_runs, same_encoder, open_generated
from pipeline.evaluate.table import markdown, row_metrics
from pipeline.cluster import connect_ray
from pipeline.evaluate.features import EvalFeatures, FeatureSpec
from pipeline.evaluate.metrics import (REFERENCE_QUANTILE, Gaussian, knn_ready, manifold_metrics, score_summary,
                                       share_below)
from pipeline.evaluate.minority import BASELINE, MinorityConfig, MinorityReference, minority_mask, minority_test
from pipeline.evaluate.prior import prior_summary
from pipeline.evaluate.neighbours import Index
from pipeline.evaluate.rarity import RaritySummary, reference_index
from pipeline.evaluate.reference import find_reference
from pipeline.layout import missing_columns
from pipeline.schema import EVALUATION_FILE, EVALUATION_TABLE_FILE, PRIOR_CHECK_PLOT, RUN_FILE
from pipeline.settings import UserError, flatten, to_dict
from pipeline.storage import check_writable, commit, delete, exists, resolve

log = logging.getLogger(__name__)
READ_BATCH = 4096  # rows per driver-side batch when no model runs


def run_evaluation(config: EvaluateConfig) -> dict:
    """Evaluate every generated run against the reference; returns the report (evaluation.json)."""
    from pipeline.tracking import RunTracker, folder_name, run_name

    runs = labelled_runs([open_generated(uri, config.storage) for uri in config.generated])
    encoder = same_encoder(runs)
    target = resolve(config.output, config.storage) if config.output else None
    if target:
        check_writable(target)
        if exists(target.child(EVALUATION_FILE)):  # a failed rerun must not leave the old marker beside a new table
            delete(target.child(EVALUATION_FILE))
    parquet, images = find_reference(config.reference, config.storage) if config.reference else ([], [])
    if config.reference:
        _check_reference(config, encoder, parquet, images)
    if images:  # the reference's images are embedded by the runs' own encoder: its weights must still be readable
        _check_encoder_files(encoder)
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
    index = reference_index(reference.rarity, config.rarity_k, config.neighbours) if reference else None
    prior, plot = _prior_check(config, reference, index) if reference else (None, None)
    report = _report(config, encoder, runs, stats, reference, index, prior)
    table = markdown(report)

    with RunTracker(config.tracking, run_name=run_name("evaluate", " vs ".join(run.label for run in runs),
                                                       folder_name(config.output) if config.output else None),
                    tags={"generated_uris": ",".join(config.generated),
                          "reference_uri": config.reference or ""}) as parent:
        parent.log_params(flatten(to_dict(config)))
        if prior and prior["spearman"] is not None:
            parent.log_metrics({"prior_check_spearman": prior["spearman"], "prior_check_images": prior["images"]})
        for run, row in zip(runs, report["rows"]):
            with RunTracker(config.tracking, run_name=run_name("evaluate", run.method, folder_name(run.uri)),
                            tags={"input_uri": run.uri, "method": run.method,
                                  "generation_run_id": run.generation_run_id or "",
                                  "rarity_feature_space": row.get("rarity", {}).get("feature_space", ""),
                                  "minority_verdict": row.get("minority", {}).get("verdict", "")},
                            parent=parent) as child:
                child.log_metrics(row_metrics(row))
            row["evaluation_run_id"] = child.run_id
        report["evaluation_run_id"] = parent.run_id
        data = json.dumps(report, indent=2).encode()
        if plot:
            parent.log_artifact_bytes(PRIOR_CHECK_PLOT, plot)
        parent.log_artifact_bytes(EVALUATION_TABLE_FILE, table.encode())
        parent.log_artifact_bytes(EVALUATION_FILE, data)
        if target:
            files = {PRIOR_CHECK_PLOT: plot} if plot else {}
            commit(target, files | {EVALUATION_TABLE_FILE: table.encode()}, (EVALUATION_FILE, data))
        return report


def _actor_options(config: EvaluateConfig) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return dict(batch_size=config.batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=config.actors),
                num_cpus=config.cpus_per_actor, num_gpus=gpus)


def _spec(config: EvaluateConfig, encoder: dict | None, clip_score: bool) -> FeatureSpec | None:
    """What the actor computes for a set: the encoder's embedding and score (reference images), Inception
    (when given), CLIP (prompted runs' scores, or the clip rarity space), PickScore (prompted runs), pixels;
    None when nothing."""
    space = config.rarity_space
    clip_space = space is not None and space.name == "clip"
    clip = clip_space or (clip_score and config.clip_weights is not None)
    pickscore = config.pickscore_weights if clip_score else None
    pixels = space.name if space is not None and space.column == "pixels" else None
    if not (encoder or config.inception_weights or clip or pickscore or pixels):
        return None
    return FeatureSpec(encoder, config.inception_weights, config.clip_weights if clip else None,
                       config.clip_arch if clip else None, clip_features=clip_space, pixels=pixels,
                       pickscore_weights=pickscore, pickscore_processor=config.pickscore_processor if pickscore else None)


def _batches(config: EvaluateConfig, dataset, spec: FeatureSpec | None):
    if spec is not None:
        dataset = dataset.map_batches(EvalFeatures, fn_constructor_kwargs={
            "spec": spec, "threads": max(1, int(config.cpus_per_actor))}, **_actor_options(config))
    return dataset.iter_batches(batch_size=READ_BATCH if spec is None else config.batch_size, batch_format="pyarrow")


def _collector(config: EvaluateConfig, reference: bool = False) -> Collector:
    """A set's collector; the reference's also keeps its subsample's Inception rows (its minority's cFID / sFID)."""
    space = config.rarity_space
    return Collector(config.max_samples, config.seed, space.column if space else None,
                     inception_sample=reference and config.inception_weights is not None)


def _collect_reference(config: EvaluateConfig, dataset, spec: FeatureSpec | None, what: str) -> SetStats:
    collector = _collector(config, reference=True)
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
            raise UserError(f"{run.uri} holds rows of encoders {sorted(stats.encoders)} but its {RUN_FILE} names "
                             f"{run.encoder['name']}")
    return sets


def _reference_parquet_stats(config: EvaluateConfig, encoder: dict, files: list[str]) -> SetStats:
    """A reference already embedded and scored, read as stored and checked against the runs' encoder."""
    import ray

    location = resolve(config.reference, config.storage)
    spec = _spec(config, None, clip_score=False)
    dataset = ray.data.read_parquet(files, filesystem=location.filesystem).select_columns(_reference_columns(config))
    stats = _collect_reference(config, dataset, spec, f"reference {config.reference}")
    if stats.encoders != {encoder["name"]}:
        raise UserError(f"reference {config.reference} was embedded by {sorted(stats.encoders) or 'no named encoder'}"
                         f", not by the generated runs' {encoder['name']}: embed it with the same encoder")
    return stats


def _reference_image_stats(config: EvaluateConfig, encoder: dict, files: list[Path]) -> SetStats:
    """Real images, embedded and scored (exact JEPA-SCORE) here by the generated runs' encoder."""
    import ray

    log.info("embedding and scoring %d reference images with %s", len(files), encoder["name"])
    root = Path(resolve(config.reference, config.storage).path)
    dataset = ray.data.from_items([{"sample_id": str(f.relative_to(root)), "path": str(f)} for f in files])
    return _collect_reference(config, dataset, _spec(config, encoder, clip_score=False), f"reference {config.reference}")


def _reference_columns(config: EvaluateConfig) -> list[str]:
    """What a Parquet reference must hold: its stored scores and embeddings, and images when features need them."""
    return (["sample_id", "jepa_score", "embedding", "encoder"] + (["image"] if _spec(config, None, False) else [])
            + (["class_label"] if config.minority_per_class else []))


def _check_encoder_files(encoder: dict) -> None:
    """The runs' encoder weights exist, whole and finite (read, not loaded), or one line says what is wrong."""
    from guidance.encoder_specs import check_encoder_weights

    try:
        check_encoder_weights(encoder["name"], encoder["weights"])
    except (ValueError, OSError) as error:
        raise UserError(str(error)) from error


def _check_reference(config: EvaluateConfig, encoder: dict, parquet: list[str], images: list[Path]) -> None:
    """A Parquet reference's columns and input size, and a size that rarity's k can use: before any model runs."""
    location = resolve(config.reference, config.storage)
    count = len(images)
    if parquet:
        dataset = pads.dataset(parquet, filesystem=location.filesystem, format="parquet")
        missing = [c for c in _reference_columns(config) if c not in dataset.schema.names]
        if missing:
            raise UserError(f"reference {config.reference} lacks the column(s) {', '.join(missing)}: give Parquet in "
                             "the generated schema (pipeline/schema.py) or a folder of images to embed here")
        check_reference_run(location, config.reference, encoder)
        count = dataset.count_rows()
    if count <= config.rarity_k:
        raise UserError(f"reference {config.reference} holds {count} rows but rarity with k = {config.rarity_k} "
                         f"needs more than k: lower --rarity-k to at most {max(count - 1, 0)} or give a larger reference")
    if config.minority_per_class and not parquet:
        raise UserError(f"--minority-per-class needs the reference's class labels: give Parquet with a class_label "
                         f"column, not the image folder {config.reference}")
    minority = round(config.minority_quantile * min(count, config.max_samples))
    if config.inception_weights and minority < 2:
        raise UserError(f"cFID / sFID against the reference's minority need at least 2 minority rows, but "
                         f"{config.minority_quantile} of {count} is {minority}: raise --minority-quantile or give a "
                         "larger reference")
    if config.baseline and not knn_ready(minority, config.nearest_k):
        raise UserError(f"the minority test's reference would hold about {minority} rows ({config.minority_quantile} "
                         f"of {count}), but k-NN balls of --nearest-k {config.nearest_k} need more: raise "
                         "--minority-quantile, lower --nearest-k or give a larger reference")


def _prior_check(config: EvaluateConfig, reference: SetStats, index: Index) -> tuple[dict, bytes]:
    """The prior check on the reference's subsample: its JEPA-SCORE against its own rarity, and the plot."""
    from pipeline.report import score_against_rarity

    space = config.rarity_space
    summary, within = prior_summary(reference.rarity_scores, reference.rarity, space, config.rarity_k, index=index)
    return summary, score_against_rarity(within, reference.rarity_scores, summary["binned"], summary["verdict"], space.name)



def _report(config: EvaluateConfig, encoder: dict, runs: list[GeneratedRun], stats: dict[str, SetStats],
            reference: SetStats | None, index: Index | None, prior: dict | None) -> dict:
    threshold = float(np.quantile(reference.scores, REFERENCE_QUANTILE)) if reference else None
    if reference:
        for run in runs:
            dims = (stats[run.label].embedding.mean.shape, reference.embedding.mean.shape)
            if dims[0] != dims[1]:
                raise UserError(f"reference embeddings have dimension {dims[1][0]}, {run.uri}'s {dims[0][0]}: "
                                 "the reference must be embedded with the generated runs' encoder")
    chosen = _chosen_minority(config, reference) if config.baseline else None
    minority = _minority_inception(config, reference, chosen) if reference and reference.pool_sample is not None else None
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
            rarity = RaritySummary.against(mine.rarity, index, config.rarity_space.name, config.rarity_k)
            row["rarity"] = to_dict(rarity) | {"samples": len(mine.rarity)}
        if mine.pool is not None:
            row["inception"] = {"fid": mine.pool.distance(reference.pool), "sfid": mine.spatial.distance(reference.spatial),
                                "cfid_minority": mine.pool.distance(minority["pool"]),
                                "sfid_minority": mine.spatial.distance(minority["spatial"])}
        if config.clip_weights:
            row["clip_score"] = mine.clip_score
            row["clip_rows"] = mine.clip_rows
        if config.pickscore_weights:
            row["pickscore"] = mine.pickscore
            row["pickscore_rows"] = mine.pickscore_rows
        rows.append(row)
    if chosen is not None:
        _minority_tests(config, runs, stats, chosen, rows)
    space = config.rarity_space
    return {
        "encoder": encoder,
        "reference": None if reference is None else {
            "uri": config.reference, "rows": reference.rows, "invalid": reference.invalid,
            "jepa_score": score_summary(reference.scores), "p10": threshold, "knn_samples": len(reference.sample)},
        "rarity": None if space is None else {
            "feature_space": space.name, "description": space.description, "independent": space.independent,
            "k": config.rarity_k, "reference_samples": len(reference.rarity), "neighbours": config.neighbours,
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
                     "inception_weights": config.inception_weights, "clip_arch": config.clip_arch,
                     "pickscore_weights": config.pickscore_weights},
        "inception_minority": None if minority is None else {
            "rows": minority["rows"], "quantile": config.minority_quantile, "per_class": config.minority_per_class,
            "resize": "Clean-FID's clean: Pillow bicubic to 299 per float channel, then uint8"},
        "rows": rows,
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }


def _chosen_minority(config: EvaluateConfig, reference: SetStats) -> MinorityReference:
    """The reference's minority for the minority test: its rarest ``minority_quantile`` by leave-one-out AvgkNN in the
    rarity space (docs/method.md, 'The minority test'), chosen once for the test and for cFID."""
    return MinorityReference(reference.rarity, MinorityConfig(config.minority_quantile, config.minority_per_class,
                                                              config.rarity_k, config.nearest_k, seed=config.seed),
                             reference.rarity_labels)


def _minority_inception(config: EvaluateConfig, reference: SetStats, chosen: MinorityReference | None) -> dict:
    """Gaussians of the reference minority's Inception pool and spatial rows: its rarest ``minority_quantile`` by
    leave-one-out AvgkNN in the rarity space, the minority test's choice (docs/method.md, 'Quality metrics'),
    taken from the test's ``chosen`` minority when there is one."""
    if chosen is not None:
        mask = chosen.mask
    else:
        labels = reference.rarity_labels if config.minority_per_class else None
        mask = minority_mask(reference.rarity, config.rarity_k, config.minority_quantile, labels)
    return {"pool": Gaussian.of_rows(reference.pool_sample[mask]),
            "spatial": Gaussian.of_rows(reference.spatial_sample[mask]), "rows": int(mask.sum())}


def _minority_tests(config: EvaluateConfig, runs: list[GeneratedRun], stats: dict[str, SetStats],
                    chosen: MinorityReference, rows: list[dict]) -> None:
    """Each row's minority test against the baseline run's own rows (docs/method.md, 'The minority test')."""
    space = config.rarity_space
    base = next(run for run in runs if run.uri == config.baseline)  # the run's own rows come before its fallback's
    bounds = (0.0, 1.0) if space.column == "pixels" else None
    theirs = stats[base.label]
    for run, row in zip(runs, rows):
        if run is base:
            row["minority"] = {"verdict": BASELINE, **chosen.figures(theirs.rarity).whole(), "baseline_run": base.label}
            continue
        mine = stats[run.label]
        row["minority"] = minority_test(mine.rarity, theirs.rarity, chosen, (mine.rarity_seeds, theirs.rarity_seeds),
                                        bounds) | {"baseline_run": base.label}
