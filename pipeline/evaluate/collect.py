"""What one set (a generated run or the reference) contributes to the table, streamed batch by batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.curate.selection import valid_scores
from pipeline.evaluate.metrics import Gaussian, Moments, Subsample, subsample_keys
from pipeline.settings import UserError


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
    pool_sample: np.ndarray | None = None  # the rarity subsample's Inception pool3 rows, when kept (the reference's)
    spatial_sample: np.ndarray | None = None  # and their spatial rows: the minority slice's cFID / sFID
    pickscore: float | None = None  # mean over prompted rows
    pickscore_rows: int = 0


class Collector:
    """Consumes Arrow batches of one set; memory stays bounded by the subsample and the moments."""

    def __init__(self, max_samples: int, seed: int, rarity_column: str | None = None, inception_sample: bool = False):
        self.rows = self.invalid = 0
        self.scores: list[np.ndarray] = []
        self.seed = seed
        self.subsample = Subsample(max_samples)
        self.rarity_column = rarity_column
        self.rarity = Subsample(max_samples)  # offered the same keys: the same rows as `subsample`, in one order
        self.rarity_scores = Subsample(max_samples, np.float64)
        self.rarity_seeds = Subsample(max_samples, np.int64)
        self.rarity_labels = Subsample(max_samples, np.int64)
        # the same rows' Inception features, when asked (the reference's, for its minority slice)
        self.inception_sample = {name: Subsample(max_samples)
                                 for name in (("pool", "spatial") if inception_sample else ())}
        self.moments: dict[str, Moments] = {}
        self.encoders: set[str] = set()
        self.prompted: dict[str, list[np.ndarray]] = {"clip_score": [], "pickscore": []}
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
        keys = subsample_keys(self.seed, valid.column("sample_id").to_pylist())
        embeddings = _matrix(valid.column("embedding"))
        self.subsample.add(keys, embeddings)
        for name in ("embedding", "pool", "spatial"):
            if name in valid.column_names:
                features = embeddings if name == "embedding" else _matrix(valid.column(name))
                self.moments.setdefault(name, Moments(features.shape[1])).add(features)
                if name in self.inception_sample:
                    self.inception_sample[name].add(keys, features)
        if self.rarity_column:
            column = self.rarity_column
            self.rarity.add(keys, embeddings if column == "embedding" else _matrix(valid.column(column)))
            self.rarity_scores.add(keys, valid.column("jepa_score").to_numpy()[:, None])
            for name, kept in (("seed", self.rarity_seeds), ("class_label", self.rarity_labels)):
                if name in valid.column_names:
                    kept.add(keys, pc.fill_null(valid.column(name), -1).to_numpy()[:, None])
        for name, values in self.prompted.items():
            if name in valid.column_names:
                values.append(valid.column(name).drop_null().to_numpy())

    def result(self, what: str) -> SetStats:
        if "embedding" not in self.moments or self.moments["embedding"].count < 2:
            raise UserError(f"{what} holds fewer than 2 rows with a finite JEPA-SCORE and an embedding "
                             f"({self.rows} rows read, {self.invalid} without): nothing to evaluate")
        clip, pickscore = (np.concatenate(values) if values else np.zeros(0) for values in self.prompted.values())
        gaussian = {name: Gaussian.of(m) for name, m in self.moments.items()}
        rarity = (self.rarity.features, self.rarity_scores.features[:, 0]) if self.rarity_column else (None, None)
        seeds, labels = (kept.features[:, 0] if kept.rows is not None else None
                         for kept in (self.rarity_seeds, self.rarity_labels))
        return SetStats(self.rows, self.invalid, np.concatenate(self.scores), gaussian["embedding"],
                        self.subsample.features, self.encoders, gaussian.get("pool"), gaussian.get("spatial"),
                        float(clip.mean()) if len(clip) else None, len(clip), *rarity,
                        topk_scores=np.concatenate(self.topk) if sum(map(len, self.topk)) else None,
                        rarity_seeds=seeds, rarity_labels=labels,
                        pickscore=float(pickscore.mean()) if len(pickscore) else None, pickscore_rows=len(pickscore),
                        pool_sample=self._kept("pool"), spatial_sample=self._kept("spatial"))

    def _kept(self, name: str) -> np.ndarray | None:
        kept = self.inception_sample.get(name)
        return None if kept is None or kept.rows is None else kept.features


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A list<float> column of equal-length rows as an (N, D) float64 array."""
    array = column.combine_chunks()
    lengths = pc.list_value_length(array)
    if pc.min(lengths).as_py() != pc.max(lengths).as_py():
        raise ValueError(f"feature rows of different lengths ({pc.min(lengths)} to {pc.max(lengths)}) in one set")
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), -1).astype(np.float64)
