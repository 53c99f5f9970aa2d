"""The evaluation's table: a row as MLflow metrics, and the Markdown in the paper's layout."""

from __future__ import annotations

import math

from pipeline.evaluate.minority import FIGURES


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
    for name in ("clip_score", "pickscore"):
        if row.get(name) is not None:
            values[name] = row[name]
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
    ("cFID (minority) ↓", lambda r: _fmt(r.get("inception", {}).get("cfid_minority"))),
    ("sFID (minority) ↓", lambda r: _fmt(r.get("inception", {}).get("sfid_minority"))),
    ("CLIP ↑", lambda r: _fmt(r.get("clip_score"))),
    ("PickScore ↑", lambda r: _fmt(r.get("pickscore"))),
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
        if report["inception_minority"]:
            minority = report["inception_minority"]
            notes.append(f"FID / sFID against the whole reference, cFID / sFID (minority) against its rarest "
                         f"{minority['quantile']:.0%} by leave-one-out AvgkNN{' within each class' if minority['per_class'] else ''} "
                         f"in {rarity['feature_space']} ({minority['rows']} rows); Inception inputs resized as "
                         "Clean-FID's clean mode (docs/method.md, 'Quality metrics').")
        notes.append(f"Reference: {reference['uri']}, {reference['rows'] - reference['invalid']} samples, JEPA-SCORE "
                     f"{reference['jepa_score']['mean']:.2f} ± {reference['jepa_score']['std']:.2f}, "
                     f"10th percentile {reference['p10']:.2f}.")
        notes.append(f"FD uses every sample; precision / recall / density / coverage use k = {settings['nearest_k']} "
                     f"on at most {settings['max_samples']} samples per set (uniform, seed {settings['seed']}).")
    else:
        notes.append("No reference given: rarity only.")
    if report["settings"]["pickscore_weights"]:
        notes.append("PickScore: mean over prompted rows of the model's logit scale x cosine of image and prompt "
                     "(PickScore_v1); a run without prompts (class-conditional) has none: its cell is empty (—).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
