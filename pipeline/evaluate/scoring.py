"""Rank a user's own images by world-prior rarity: exact JEPA-SCORE or its top-k approximation."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from guidance import jepa_score, load_encoder, topk_log_volume
from guidance.checks import check_rank
from pipeline.evaluate.config import OUTPUT_SUFFIXES, WEIGHT_CHOICES, ScoreConfig
from pipeline.images import find_images, read_image
from pipeline.settings import UserError
from pipeline.storage import StorageConfig, resolve, write_bytes


@dataclass(frozen=True)
class ScoredImage:
    path: str
    score: float


@dataclass(frozen=True)
class ScoreResult:
    rows: list[ScoredImage]  # rarest (lowest score) first, ties broken by path
    skipped: list[tuple[str, str]]  # (path, why) of files that could not be decoded or were too large


def score_images(config: ScoreConfig) -> ScoreResult:
    """Score every image that decodes within ``max_pixels``; the others are skipped and reported."""
    files = find_images(config.paths)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        encoder = load_encoder(config.encoder, config.weights, input_size=config.input_size,
                               output=config.encoder_output).to(device)
    except (ValueError, OSError, RuntimeError) as error:  # missing, truncated, mismatched or unfetchable weights
        raise UserError(f"encoder weights {config.weights}: {error}; pass --weights {WEIGHT_CHOICES}") from error
    if config.method == "topk":  # before any image is sketched
        try:
            check_rank(config.k, config.oversample, encoder.embed_dim, 3 * encoder.input_size**2)
        except ValueError as error:
            raise UserError(str(error)) from error
    scored: list[ScoredImage] = []
    skipped: list[tuple[str, str]] = []
    batches = [files[i : i + config.batch_size] for i in range(0, len(files), config.batch_size)]
    for batch in tqdm(batches, desc=f"{config.method} JEPA-SCORE", unit="batch"):
        decoded = []
        for path in batch:
            try:
                decoded.append((path, read_image(path, config.max_pixels)))
            except ValueError as error:
                skipped.append((str(path), str(error)))
        if not decoded:
            continue
        with torch.no_grad():
            images = torch.stack([encoder.resize(image[None].to(device))[0] for _, image in decoded])
        scores = _score(encoder, images, config)
        scored.extend(ScoredImage(str(path), float(score)) for (path, _), score in zip(decoded, scores))
    return ScoreResult(sorted(scored, key=lambda row: (row.score, row.path)), skipped)


def _score(encoder, images: torch.Tensor, config: ScoreConfig) -> torch.Tensor:
    if config.method == "exact":
        return jepa_score(encoder, images)
    generators = [torch.Generator(images.device).manual_seed(config.seed) for _ in range(len(images))]
    with torch.no_grad():
        return topk_log_volume(encoder, images, config.k, config.oversample, config.power_iters, generators)


def write_scores(rows: list[ScoredImage], output: str | Path, method: str) -> None:
    """Write ``path, score, method`` rows to a .csv or .parquet file (by its suffix), atomically."""
    output = Path(output)
    if output.suffix == ".csv":
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["path", "score", "method"])
        writer.writerows((row.path, repr(row.score), method) for row in rows)
        data = text.getvalue().encode()
    elif output.suffix == ".parquet":
        table = pa.table({
            "path": pa.array([row.path for row in rows], pa.string()),
            "score": pa.array([row.score for row in rows], pa.float64()),
            "method": pa.array([method] * len(rows), pa.string()),
        })
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        data = buffer.getvalue()
    else:
        raise UserError(f"output must end in {' or '.join(OUTPUT_SUFFIXES)}, got {output}")
    write_bytes(resolve(str(output), StorageConfig()), data)
