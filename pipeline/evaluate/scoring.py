"""Rank a user's own images by world-prior rarity: exact JEPA-SCORE or its top-k approximation."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from guidance import jepa_score, load_encoder, topk_log_volume
from guidance.checks import check_rank, check_sketch
from guidance.encoders import check_encoder
from pipeline.evaluate.features import check_device
from pipeline.images import find_images, read_image
from pipeline.settings import UserError
from pipeline.storage import StorageConfig, StorageError, check_reachable, resolve, write_bytes

SCORE_METHODS = ("exact", "topk")
OUTPUT_SUFFIXES = (".csv", ".parquet")
WEIGHT_CHOICES = ("WEIGHTS (a .safetensors / .pth file, a timm model folder, or an open_clip checkpoint), 'hub' or "
                  "'hub:TAG' (downloads timm weights), or 'random' (untrained: the scores mean nothing)")


@dataclass(frozen=True)
class ScoreConfig:
    """What to score and how. Lower scores are rarer under the world prior."""

    paths: tuple[str, ...]  # image files or folders (searched recursively)
    weights: str | None = None  # required: a local file / folder, "hub[:TAG]" (downloads), or "random" (untrained)
    encoder: str = "vit_small_patch14_reg4_dinov2"  # a DINOv2 name, "timm:<ViT architecture>" or "open_clip:<architecture>"
    encoder_output: str = "cls"  # the embedding: "cls" (CLS token after the final norm) or "pool" (mean of the patch tokens)
    method: str = "exact"  # "exact" JEPA-SCORE (all singular values) or "topk" log-volume (randomized SVD)
    k: int = 9  # top-k singular values for method "topk"
    oversample: int = 2  # extra sketch columns for method "topk"
    power_iters: int = 2  # subspace iterations for method "topk"
    seed: int = 0  # seeds each image's sketch for method "topk"
    input_size: int | None = None  # the encoder's input size (unset: a model folder's, else 224 for DINOv2, else timm's)
    batch_size: int = 4  # images per encoder call
    max_pixels: int = 4096 * 4096  # larger images are skipped and reported, not decoded
    device: str = field(
        default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")  # torch device (default: cuda when available, else cpu)
    output: str | None = None  # optional .csv or .parquet table of the scores

    def __post_init__(self):
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
    try:
        encoder = load_encoder(config.encoder, config.weights, input_size=config.input_size,
                               output=config.encoder_output).to(config.device)
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
            images = torch.stack([encoder.resize(image[None].to(config.device))[0] for _, image in decoded])
        scores = _score(encoder, images, config)
        scored.extend(ScoredImage(str(path), float(score)) for (path, _), score in zip(decoded, scores))
    return ScoreResult(sorted(scored, key=lambda row: (row.score, row.path)), skipped)


def _score(encoder, images: torch.Tensor, config: ScoreConfig) -> torch.Tensor:
    if config.method == "exact":
        return jepa_score(encoder, images)
    generators = [torch.Generator(config.device).manual_seed(config.seed) for _ in range(len(images))]
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
