"""Read a curated dataset for people: its versions, its rarest rows page by page, one row's image.

A dataset is either a refresh root (``versions/<V>/rarest/``, ``LATEST.json``) or one finished
output folder (a filter's or a generation's). Only complete outputs are shown: a version appears
once its ``_selection.json`` is written, a single folder once its completion marker is. Pure
pyarrow: the Serve replica reads only the id, score and condition columns to order rows, and reads
an image only when it is asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline.curate.selection import rarest, valid_scores
from pipeline.rows import read_committed
from pipeline.schema import LATEST_FILE, RAREST_DIR, RUN_FILE, SELECTION_FILE, VERSIONS_DIR
from pipeline.storage import Location, StorageConfig, exists, read_bytes, resolve

LISTED_COLUMNS = ["sample_id", "jepa_score", "topk_score", "class_label", "prompt", "method"]
SINGLE = "current"  # the version name of a dataset that is one output folder


class DatasetError(LookupError):
    """The dataset, a version or a sample is not there (or not complete yet)."""


@dataclass(frozen=True)
class Page:
    version: str
    versions: list[str]  # newest first
    total: int  # rows with a finite score in this version
    offset: int
    rows: list[dict]  # LISTED_COLUMNS + rank (1 = rarest), rarest first


class DatasetBrowser:
    """The rarest rows of a dataset's versions, ordered by (jepa_score, sample_id) as the filter orders them."""

    def __init__(self, uri: str, storage: StorageConfig):
        self.root = resolve(uri, storage)
        self._orders: dict[str, tuple[pa.Table, dict[str, str]]] = {}

    def versions(self) -> list[str]:
        """Complete versions, newest (by name) first."""
        if exists(self.root.child(SELECTION_FILE)) or exists(self.root.child(RUN_FILE)):
            return [SINGLE]
        folder = self.root.child(VERSIONS_DIR)
        selector = pafs.FileSelector(folder.path, allow_not_found=True)
        names = sorted((info.base_name for info in self.root.filesystem.get_file_info(selector)
                        if info.type == pafs.FileType.Directory), reverse=True)
        return [name for name in names if exists(folder.child(name, RAREST_DIR, SELECTION_FILE))]

    def latest(self) -> str:
        """The version LATEST.json names (else the newest complete one)."""
        versions = self.versions()
        if not versions:
            raise DatasetError(f"{self.root.uri} holds no complete dataset yet: expected {LATEST_FILE} and "
                               f"{VERSIONS_DIR}/<V>/rarest/{SELECTION_FILE} (a refresh root) or a finished output folder")
        marker = self.root.child(LATEST_FILE)
        if versions != [SINGLE] and exists(marker):
            named = json.loads(read_bytes(marker)).get("version")
            if named in versions:
                return named
        return versions[0]

    def page(self, version: str | None, offset: int, limit: int) -> Page:
        version = version or self.latest()
        order, _ = self._order(version)
        rows = order.slice(offset, limit).to_pylist()
        for rank, row in enumerate(rows, start=offset + 1):
            row["rank"] = rank
        return Page(version, self.versions(), order.num_rows, offset, rows)

    def image(self, version: str, sample_id: str) -> bytes:
        """The stored PNG of one row."""
        _, files = self._order(version)
        if sample_id not in files:
            raise DatasetError(f"no sample {sample_id!r} in version {version!r}")
        table = pads.dataset(files[sample_id], filesystem=self.root.filesystem, format="parquet").to_table(
            columns=["image"], filter=pc.field("sample_id") == sample_id)
        return table.column("image")[0]["bytes"].as_py()

    def rank(self, version: str, score: float) -> tuple[int, int]:
        """(rows of the version rarer than ``score``, rows in the version): where ``score`` would rank."""
        order, _ = self._order(version)
        return int(pc.sum(pc.less(order.column("jepa_score"), score)).as_py() or 0), order.num_rows

    def _location(self, version: str) -> Location:
        if version not in self.versions():
            raise DatasetError(f"version {version!r} is not a complete version of {self.root.uri}; "
                               f"complete versions: {', '.join(self.versions()) or 'none'}")
        return self.root if version == SINGLE else self.root.child(VERSIONS_DIR, version, RAREST_DIR)

    def _order(self, version: str) -> tuple[pa.Table, dict[str, str]]:
        if version not in self._orders:  # complete versions never change, so they are read once
            table = valid_scores(read_committed(self._location(version), [*LISTED_COLUMNS, "__filename"]))
            table = rarest(table, table.num_rows, max_score=None)
            files = dict(zip(table.column("sample_id").to_pylist(), table.column("__filename").to_pylist()))
            self._orders[version] = (table.drop_columns(["__filename"]), files)
        return self._orders[version]
