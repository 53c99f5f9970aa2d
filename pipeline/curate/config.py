"""The curation jobs' typed configs (filter and refresh), apart from the code that runs them so that the help
and the config checks load no Ray or torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.curate.dedup import SEARCHES
from pipeline.curate.diversity import SELECTIONS
from pipeline.curate.gate import DEFAULT_SPACE, pixel_space
from pipeline.pixels import PixelSpace
from pipeline.schema import SCORE_COLUMNS
from pipeline.settings import TrackingConfig, UserError
from pipeline.storage import StorageConfig

GROUP_COLUMNS = ("class_label", "prompt")


@dataclass(frozen=True)
class FilterConfig:
    """Which generated dataset to curate, how many rarest rows to keep, and where they go."""

    input: str
    """a completed generation output (holds its completion marker, _run.json)"""
    output: str
    """where the curated dataset goes"""
    keep_fraction: float | None = None
    """keep this fraction of the valid rows (of each group with `per`)"""
    keep: int | None = None
    """or keep this many rows (per group with `per`)"""
    per: str | None = None
    """"class_label" or "prompt": choose within each group"""
    max_score: float | None = None
    """never keep a row scoring above this"""
    by: str = "jepa_score"
    """the score to rank by: jepa_score (exact, the paper's metric) or topk_score"""
    allow_empty_groups: bool = False
    """curate a group whose quota rounds down to 0 (it keeps nothing) instead of refusing"""
    gate_reference: str | None = None
    """real images (a local folder, or a generated-schema run): keep only rows inside one's k-NN ball"""
    gate_space: str = DEFAULT_SPACE
    """the gate's feature space: pixels-N or pixels-N-grey"""
    gate_k: int = 5
    """the gate's balls: each real sample's distance to its k-th nearest real neighbour"""
    dedup_threshold: float | None = None
    """remove near-duplicates: rows whose cosine similarity to a rarer kept row is at least this (e.g. 0.95)"""
    dedup_search: str = "approximate"
    """how near-duplicates are found: approximate (a faiss inverted-file index) or exact (every pair)"""
    select: str = "rarest"
    """rarest (the lowest scores) or diverse-rarest (greedy k-center over the candidates)"""
    candidates: int = 4
    """with dedup or diverse-rarest: each group's rarest candidates x quota rows are the ones considered"""
    similarity_space: str = "embedding"
    """where near-duplicates and diversity are measured: embedding (the stored one) or pixels-N[-grey]"""
    balance_by: str | None = None
    """"class_label" or "prompt": report the kept set's balance over it (default: the per column)"""
    dominant_share: float = 0.5
    """warn when one group holds more than this share of the kept rows"""
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    max_rows_per_file: int = 1024
    """bounds each output Parquet file"""
    verbose: bool = False
    """Ray's own output too: Ray Data's operator progress and the workers' logs"""

    def __post_init__(self):
        if (self.keep_fraction is None) == (self.keep is None):
            raise UserError("give exactly one of keep_fraction (--keep-fraction) or keep (--keep)")
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise UserError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.keep is not None and self.keep < 1:
            raise UserError(f"keep must be >= 1, got {self.keep}")
        if self.per is not None and self.per not in GROUP_COLUMNS:
            raise UserError(f"per must be one of {', '.join(GROUP_COLUMNS)}, got {self.per!r}")
        if self.by not in SCORE_COLUMNS:
            raise UserError(f"by must be one of {', '.join(SCORE_COLUMNS)}, got {self.by!r}")
        if self.max_score is not None and not math.isfinite(self.max_score):
            raise UserError(f"max_score must be a finite number, got {self.max_score}")
        pixel_space(self.gate_space)
        if self.gate_k < 1:
            raise UserError(f"gate_k must be >= 1, got {self.gate_k}")
        if self.dedup_threshold is not None and not 0 < self.dedup_threshold <= 1:
            raise UserError(f"dedup_threshold is a cosine similarity in (0, 1] (e.g. 0.95), got {self.dedup_threshold}")
        if self.dedup_search not in SEARCHES:
            raise UserError(f"dedup_search must be one of {', '.join(SEARCHES)}, got {self.dedup_search!r}")
        if self.select not in SELECTIONS:
            raise UserError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.candidates < 1:
            raise UserError(f"candidates must be >= 1 (a multiple of each group's quota), got {self.candidates}")
        if self.similarity_space != "embedding" and PixelSpace.parse(self.similarity_space) is None:
            raise UserError(f"similarity_space must be embedding or a pixel space (pixels-N or pixels-N-grey, e.g. "
                            f"{DEFAULT_SPACE}), got {self.similarity_space!r}")
        if self.balance_by is not None and self.balance_by not in GROUP_COLUMNS:
            raise UserError(f"balance_by must be one of {', '.join(GROUP_COLUMNS)}, got {self.balance_by!r}")
        if not 0 < self.dominant_share <= 1:
            raise UserError(f"dominant_share must be in (0, 1], got {self.dominant_share}")

    @property
    def narrows(self) -> bool:
        """Whether the quota is taken from candidates by similarity (dedup or diverse-rarest), not by score alone."""
        return self.dedup_threshold is not None or self.select != "rarest"

    @property
    def balance(self) -> str | None:
        """The column the kept set's balance is reported over."""
        return self.per or self.balance_by

    @property
    def rule(self) -> dict:
        """What decides the rows kept: recorded in the marker and the selection, compared on a rerun."""
        gate = {"reference": self.gate_reference, "space": self.gate_space, "k": self.gate_k} if self.gate_reference else None
        dedup = ({"threshold": self.dedup_threshold, "search": self.dedup_search}
                 if self.dedup_threshold is not None else None)
        candidates = {"multiple": self.candidates, "space": self.similarity_space} if self.narrows else None
        return {"keep_fraction": self.keep_fraction, "keep": self.keep, "per": self.per, "max_score": self.max_score,
                "by": self.by, "gate": gate, "dedup": dedup, "select": self.select, "candidates": candidates}



@dataclass(frozen=True)
class RefreshConfig:
    """One scheduled refresh."""

    config: str
    """the generation config (YAML)"""
    root: str
    """the dataset's root URI"""
    version: str | None = None
    """default: the UTC date of the scheduled run, YYYY-MM-DD"""
    keep_versions: int = 3
    """versions kept under versions/ (LATEST's is never deleted)"""
    keep_fraction: float = 0.1
    """the curated share of each version"""
    per: str | None = None
    """curate per class_label or prompt"""
    allow_empty_groups: bool = False
    """curate a group whose quota rounds down to 0 (it keeps nothing) instead of refusing"""
    overrides: tuple[str, ...] = ()
    """extra --set overrides for the generation config"""

    def __post_init__(self):
        if self.keep_versions < 1:
            raise UserError(f"keep_versions must be >= 1, got {self.keep_versions}")
        if self.version is not None and (not self.version or "/" in self.version or self.version.startswith(".")):
            raise UserError(f"version {self.version!r} must be a plain folder name (e.g. 2026-11-28)")

