"""The prior check: does this encoder's exact JEPA-SCORE track rarity in the user's own data?

Guidance lowers the JEPA-SCORE; that finds images rare *in this data* only where the score falls with
rarity there. The check scores a reference (a folder of images or Parquet in the generated schema)
with the encoder and compares each image's score with its AvgkNN among the other reference images
(leave one out, pipeline/evaluate/rarity.py) in a feature space that does not see the encoder.

Sign convention: lower JEPA-SCORE = rarer, larger AvgkNN = rarer, so a score that tracks rarity has a
NEGATIVE Spearman correlation rho(score, AvgkNN). The verdict, with ``TRACKS`` = 0.1:
  - rho <= -0.1: "falls with rarity": guidance moves towards images rare in this data;
  - |rho| < 0.1: "does not track rarity": guidance finds images rare to this encoder, not in this data;
  - rho >= +0.1: "rises with rarity": guidance will push towards typical images.
0.1 is the conventional floor of a "weak" rank correlation; a p-value >= 0.05 (too few images to tell
the sign) is said in the same line. With labels, the per-class mean score is also correlated with
class frequency: positive when rarer classes score lower.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from pipeline.evaluate.features import EvalFeatures, FeatureSpace, FeatureSpec, decode
from pipeline.evaluate.metrics import subsample_key
from pipeline.nuisance import CHANGES, perturb
from pipeline.evaluate.neighbours import Index, search_record
from pipeline.evaluate.rarity import DEFAULT_K, RarityInputError, reference_index
from pipeline.evaluate.reference import find_reference
from guidance import jepa_score, jepa_scores
from pipeline.evaluate.config import PriorConfig
from pipeline.generate.preflight import check_encoder_files
from pipeline.schema import PRIOR_CHECK_FILE, PRIOR_CHECK_PLOT
from pipeline.settings import UserError, flatten, to_dict
from pipeline.storage import check_writable, commit, delete, exists, resolve

log = logging.getLogger(__name__)
TRACKS = 0.1  # |Spearman| below this: the score does not track rarity
SIGNIFICANCE = 0.05  # p-values at or above this are called out in the verdict
BINS = 10  # AvgkNN quantile bins of the plot's binned means
MAD_TO_STD = 1.4826  # the median absolute deviation times this is a normal's standard deviation


def verdict(rho: float | None, images: int, p_value: float | None = None, space: FeatureSpace | None = None,
            score: str = "JEPA-SCORE") -> str:
    """One plain line saying how ``score`` relates to rarity (Spearman with AvgkNN, negative = tracks)."""
    if rho is None:
        return (f"{score} cannot be compared with rarity here: the scores or the distances are constant "
                f"over {images:,} images")
    where = f"Spearman {rho:+.2f} on {images:,} images"
    if space is not None and not space.independent:
        where += ", in the encoder's own embedding: not independent of the score"
    if p_value is not None and p_value >= SIGNIFICANCE:
        where += f"; p = {p_value:.2f}: too few images to be sure of the sign"
    if rho <= -TRACKS:
        return f"{score} falls with rarity here ({where})"
    if rho >= TRACKS:
        return f"{score} rises with rarity here ({where}): guidance will push towards typical images"
    return (f"{score} does not track rarity here ({where}): guidance will find images that are rare to this "
            "encoder, not rare in this data")


def _spearman(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None, None
    result = spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)


def binned_means(avg_knn: np.ndarray, scores: np.ndarray, bins: int = BINS) -> list[dict]:
    """Mean score per AvgkNN quantile bin (equal counts), rarest bin last."""
    order = np.argsort(avg_knn, kind="stable")
    return [{"avg_knn": float(avg_knn[part].mean()), "jepa_score": float(scores[part].mean()), "images": len(part)}
            for part in np.array_split(order, min(bins, len(order))) if len(part)]


def class_frequency(scores: np.ndarray, labels: list[str]) -> dict:
    """Per-class count and mean score, and Spearman(per-class mean score, class frequency)."""
    names, inverse, counts = np.unique(np.asarray(labels, dtype=str), return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=scores) / counts
    rho, p_value = _spearman(means, counts.astype(np.float64))
    return {"spearman": rho, "p_value": p_value, "classes": {
        str(name): {"images": int(count), "jepa_score": float(mean)} for name, count, mean in zip(names, counts, means)}}


def prior_summary(scores: np.ndarray, features: np.ndarray, space: FeatureSpace, k: int = DEFAULT_K,
                  labels: list[str] | None = None, topk: tuple[int, np.ndarray] | None = None,
                  index: Index | None = None) -> tuple[dict, np.ndarray]:
    """The prior check on paired arrays (each image's JEPA-SCORE and its features in ``space``):
    the summary, and each image's AvgkNN among the others. ``topk`` = (the guidance k, each image's
    exact top-k log-volume) adds the same check of the score guidance descends, under ``topk``.
    ``index``: the features' ``reference_index`` when built already (else exact search); an approximate
    one's recall@k and AvgkNN change against exact search go under ``neighbours``."""
    scores = np.asarray(scores, np.float64)
    if len(scores) != len(features):
        raise RarityInputError(f"{len(scores)} scores but {len(features)} feature rows: they must be paired")
    if not np.isfinite(scores).all():
        raise RarityInputError("JEPA-SCOREs hold NaN or inf: drop the failed rows before the prior check")
    index = reference_index(features, k) if index is None else index
    rarity = index.within(k)[0].mean(axis=1)
    rho, p_value = _spearman(scores, rarity)
    summary = {"feature_space": space.name, "feature_space_description": space.description,
               "independent": space.independent, "k": k, "images": len(scores), "spearman": rho, "p_value": p_value,
               "threshold": TRACKS, "verdict": verdict(rho, len(scores), p_value, space),
               "binned": binned_means(rarity, scores), "neighbours": search_record(index, k)}
    if topk is not None:
        guidance_k, values = topk[0], np.asarray(topk[1], np.float64)
        if len(values) != len(scores) or not np.isfinite(values).all():
            raise RarityInputError("the top-k scores must be finite and paired with the JEPA-SCOREs")
        rho_k, p_k = _spearman(values, rarity)
        summary["topk"] = {"guidance_k": guidance_k, "spearman": rho_k, "p_value": p_k,
                           "verdict": verdict(rho_k, len(values), p_k, space, f"The top-{guidance_k} score")}
    if labels is not None:
        summary["class_frequency"] = class_frequency(scores, labels)
    return summary, rarity


def robust_spread(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: a standard deviation that a few outlying scores cannot inflate."""
    values = np.asarray(values, np.float64)
    return float(MAD_TO_STD * np.median(np.abs(values - np.median(values))))


def nuisance_summary(scores: dict[str, np.ndarray], base: dict[str, np.ndarray],
                     moved: dict[str, dict[str, np.ndarray]]) -> dict:
    """Nuisance sensitivity (docs/method.md, 'Nuisance sensitivity'): for each nuisance and score, the
    median over the subsample of |score(nuisance(x)) - score(x)| over the score's robust spread across
    every checked image. ``scores``: score name -> every checked image's score; ``base``: score name ->
    the subsample's; ``moved``: nuisance -> score name -> the subsample's under that nuisance."""
    spread = {name: robust_spread(values) for name, values in scores.items()}
    nuisances = {}
    for nuisance, by_score in moved.items():
        nuisances[nuisance] = {"change": CHANGES[nuisance]}
        for name, values in by_score.items():
            change = float(np.median(np.abs(np.asarray(values, np.float64) - base[name])))
            nuisances[nuisance][name] = {"median_change": change,
                                         "ratio": change / spread[name] if spread[name] > 0 else None}
    return {"spread": spread, "nuisances": nuisances}


def nuisance_verdicts(nuisances: dict, titles: dict[str, str]) -> list[str]:
    """One line per nuisance that moves a score more than the score varies across images; else one line
    saying none does. ``titles``: score name -> how a line names it."""
    lines, measured = [], []
    for nuisance, entry in nuisances.items():
        ratios = {name: entry[name]["ratio"] for name in titles if entry[name]["ratio"] is not None}
        measured += [(ratio, nuisance, name) for name, ratio in ratios.items()]
        over = [f"{titles[name]} {ratio:.2f}x" for name, ratio in ratios.items() if ratio > 1]
        if over:
            lines.append(f"The score moves more under {nuisance} ({entry['change']}) than across images "
                         f"({', '.join(over)}): guidance will push {nuisance}")
    if lines:
        return lines
    if not measured:
        return ["Nuisance sensitivity cannot be measured here: the scores are constant over the images"]
    ratio, nuisance, name = max(measured)
    return [f"No nuisance moves the score more than it varies across images (the most: {nuisance}, "
            f"{ratio:.2f}x for {titles[name]})"]


def _chosen(ids: list[str], config: PriorConfig) -> list[str]:
    """Every id, or a uniform subsample of ``max_images`` of them (the same as the evaluation's, by seed)."""
    if len(ids) <= config.max_images:
        return sorted(ids)
    return sorted(sorted(ids, key=lambda i: subsample_key(config.seed, i))[: config.max_images])


def _label_file(path: Path) -> dict[str, str]:
    """A .json object or a two-column .csv (file name or sample id, label; a header row is allowed)."""
    if path.suffix == ".json":
        mapping = json.loads(path.read_text())
        if not isinstance(mapping, dict):
            raise UserError(f"labels file {path} must hold one JSON object mapping file name -> label")
        return {str(key): str(value) for key, value in mapping.items()}
    if path.suffix != ".csv":
        raise UserError(f"labels file {path} must be a .csv (file,label rows) or a .json object")
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if any(len(row) != 2 for row in rows):
        raise UserError(f"labels file {path}: every row must have two columns, file name and label")
    return {name: label for name, label in rows}


def _labels_for(ids: list[str], mapping: dict[str, str], where: str) -> list[str]:
    """Each id's label, by its full relative name or its base name."""
    missing = [i for i in ids if i not in mapping and Path(i).name not in mapping]
    if missing:
        raise UserError(f"{where} has no label for {len(missing)} image(s), e.g. {', '.join(missing[:3])}: "
                         "label every image or leave --labels out")
    return [mapping.get(i, mapping.get(Path(i).name)) for i in ids]


def _batches(config: PriorConfig) -> tuple[list[pa.Table], list[str] | None, int]:
    """The chosen reference rows in batches (``path`` or ``image`` column), their labels, and the total count."""
    parquet, images = find_reference(config.reference, config.storage)
    label_file = Path(config.labels).expanduser() if config.labels and Path(config.labels).expanduser().is_file() else None
    if images:
        root = Path(resolve(config.reference, config.storage).path)
        paths = {str(f.relative_to(root)): str(f) for f in images}
        ids = _chosen(list(paths), config)
        if config.labels and label_file is None:
            raise UserError(f"--labels {config.labels} is not a file: a folder of images takes a .csv / .json "
                             "file mapping file name -> label")
        labels = _labels_for(ids, _label_file(label_file), config.labels) if label_file else None
        table = pa.table({"sample_id": ids, "path": [paths[i] for i in ids]})
        return table.to_batches(config.batch_size), labels, len(paths)
    location = resolve(config.reference, config.storage)
    dataset = pads.dataset(parquet, filesystem=location.filesystem, format="parquet")
    column = config.labels if config.labels and label_file is None else None
    missing = [c for c in ("sample_id", "image", *([column] if column else [])) if c not in dataset.schema.names]
    if missing:
        raise UserError(f"reference {config.reference} lacks the column(s) {', '.join(missing)}: give Parquet in the "
                         "generated schema, a label column it holds, or a folder of images")
    every = dataset.to_table(columns=["sample_id"]).column("sample_id").to_pylist()
    ids = _chosen(every, config)
    table = dataset.to_table(columns=["sample_id", "image", *([column] if column else [])],
                             filter=pc.field("sample_id").isin(ids)).sort_by("sample_id")
    labels = None
    if column:
        if table.column(column).null_count:
            raise UserError(f"column {column} of {config.reference} is null in {table.column(column).null_count} "
                             "chosen row(s): label every row or leave --labels out")
        labels = [str(value) for value in table.column(column).to_pylist()]
        table = table.drop_columns([column])
    elif label_file:
        labels = _labels_for(table.column("sample_id").to_pylist(), _label_file(label_file), config.labels)
    return table.to_batches(config.batch_size), labels, len(every)


def _scores(encoder, pixels: torch.Tensor, guidance_k: int | None) -> dict[str, np.ndarray]:
    """The exact JEPA-SCORE and (with a guidance k) the exact top-k score of encoder-sized pixels."""
    if guidance_k is None:
        return {"jepa_score": jepa_score(encoder, pixels).cpu().numpy()}
    exact, topk = jepa_scores(encoder, pixels, guidance_k)
    return {"jepa_score": exact.cpu().numpy(), "topk_score": topk.cpu().numpy()}


def nuisance_check(encoder, images: list[torch.Tensor], ids: list[str], every: dict[str, np.ndarray],
                   config: PriorConfig) -> dict:
    """Nuisance sensitivity (docs/method.md, 'Nuisance sensitivity'): ``images`` ((1, 3, H, W) in [0, 1],
    each at its own size, ``ids`` theirs) scored as they are and under each of ``config.nuisances``
    (applied before the encoder's resize; noise seeded by ``config.seed`` and the id), against the
    spread of ``every`` (score name -> every checked image's score)."""
    def scored(name: str | None) -> dict[str, np.ndarray]:
        pixels = torch.cat([encoder.resize(image if name is None else perturb(
            name, image, torch.Generator().manual_seed(subsample_key(config.seed, i)))) for image, i in zip(images, ids)])
        parts = [_scores(encoder, part, config.guidance_k) for part in pixels.split(config.batch_size)]
        return {score: np.concatenate([part[score] for part in parts]) for score in every}

    base = scored(None)
    moved = {name: scored(name) for name in tqdm(config.nuisances, desc=f"JEPA-SCORE under nuisances, {len(ids)} images",
                                                 unit="nuisance")}
    measured = nuisance_summary(every, base, moved)
    titles = {"jepa_score": "JEPA-SCORE", "topk_score": f"the top-{config.guidance_k} score"}
    return {"images": len(ids), "seed": config.seed,
            "how": f"median over the images of |score(nuisance(x)) - score(x)| / the score's spread, {MAD_TO_STD} x its "
                   f"median absolute deviation over all {len(next(iter(every.values()))):,} checked images",
            **measured, "verdicts": nuisance_verdicts(measured["nuisances"], {s: titles[s] for s in every})}


def _probed(config: PriorConfig, batches: list[pa.RecordBatch], ids: list[str]) -> tuple[list[torch.Tensor], list[str]]:
    """The nuisance measurement's uniform subsample of the checked images, decoded, and their ids."""
    probed = sorted(sorted(ids, key=lambda i: subsample_key(config.seed, i))[: config.nuisance_images])
    table = pa.Table.from_batches(batches).filter(pc.field("sample_id").isin(probed)).sort_by("sample_id")
    return [torch.from_numpy(np.asarray(decode(row), np.float32) / 255).permute(2, 0, 1)[None]
            for row in table.to_pylist()], probed


def check_prior(config: PriorConfig) -> dict:
    """Score the reference, measure its rarity, correlate; returns (and writes) ``prior_check.json``."""
    from pipeline.report import score_against_rarity
    from pipeline.tracking import RunTracker

    space = config.space
    check_encoder_files(config.encoder)
    target = resolve(config.output, config.storage) if config.output else None
    if target:
        check_writable(target)
        if exists(target.child(PRIOR_CHECK_FILE)):  # a failed rerun must not leave the old marker beside a new plot
            delete(target.child(PRIOR_CHECK_FILE))
    batches, labels, total = _batches(config)
    chosen = sum(b.num_rows for b in batches)
    if chosen <= config.k:
        raise RarityInputError(f"the reference has {chosen} images but AvgkNN with k = {config.k} needs more than k: "
                               f"lower --k to at most {max(chosen - 1, 0)} or give more images")
    spec = FeatureSpec(to_dict(config.encoder), config.inception_weights if space.name == "inception" else None,
                       *((config.clip_weights, config.clip_arch) if space.name == "clip" else (None, None)),
                       clip_features=space.name == "clip", pixels=space.name if space.column == "pixels" else None,
                       topk=config.guidance_k)
    features = EvalFeatures(spec, device=config.device)
    ids, scores, topk, rows = [], [], [], []
    for batch in tqdm(batches, desc=f"JEPA-SCORE and {space.name} features", unit="batch"):
        out = features(pa.Table.from_batches([batch]))
        ids += out.column("sample_id").to_pylist()
        scores.append(out.column("jepa_score").to_numpy())
        if config.guidance_k is not None:
            topk.append(out.column("topk_score").to_numpy())
        rows.append(np.array(out.column(space.column).to_pylist(), np.float64))
    score = np.concatenate(scores)
    paired_topk = (config.guidance_k, np.concatenate(topk)) if config.guidance_k is not None else None
    located = np.concatenate(rows)
    summary, rarity = prior_summary(score, located, space, config.k, labels, paired_topk,
                                    reference_index(located, config.k, config.neighbours))
    every = {"jepa_score": score} | ({"topk_score": paired_topk[1]} if paired_topk else {})
    nuisance = None
    if config.nuisances:
        images, probed = _probed(config, batches, ids)
        nuisance = nuisance_check(features.encoder, [image.to(features.device) for image in images], probed, every, config)
    summary = {"reference": config.reference, "encoder": to_dict(config.encoder), "reference_images": total,
               "subsample": None if chosen == total else {"images": chosen, "seed": config.seed,
                                                          "how": "uniform over sample ids (blake2b of seed and id)"},
               **summary, **({"nuisance": nuisance} if nuisance else {})}
    title = summary["verdict"]
    if nuisance:
        title += "; its change under a nuisance / its spread across images: " + ", ".join(
            f"{name} {entry['jepa_score']['ratio']:.2f}x" for name, entry in nuisance["nuisances"].items()
            if entry["jepa_score"]["ratio"] is not None)
    plot = score_against_rarity(rarity, score, summary["binned"], title, space.name)

    with RunTracker(config.tracking, run_name="check-prior", tags={"reference_uri": config.reference}) as run:
        run.log_params(flatten(to_dict(config)))
        run.log_metrics({name: summary[name] for name in ("spearman", "p_value", "images") if summary[name] is not None})
        if summary.get("topk", {}).get("spearman") is not None:
            run.log_metrics({"topk_spearman": summary["topk"]["spearman"]})
        if nuisance:
            run.log_metrics({f"nuisance_{name}{'' if score_name == 'jepa_score' else '_topk'}": entry[score_name]["ratio"]
                             for name, entry in nuisance["nuisances"].items() for score_name in every
                             if entry[score_name]["ratio"] is not None})
        summary["run_id"] = run.run_id
        data = json.dumps(summary, indent=2).encode()
        run.log_artifact_bytes(PRIOR_CHECK_PLOT, plot)
        run.log_artifact_bytes(PRIOR_CHECK_FILE, data)
        if target:
            commit(target, {PRIOR_CHECK_PLOT: plot}, (PRIOR_CHECK_FILE, data))
        return summary
