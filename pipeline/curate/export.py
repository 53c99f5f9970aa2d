"""Export a complete generation run or curated set as WebDataset tar shards, the form trainers stream.

Shards are ``shard-000000.tar``, ``shard-000001.tar`` ..., ``shard_size`` samples each, in the folder's order (data
files by name, rows in file order). Each sample is ``<sample_id>.png`` (the image), ``<sample_id>.json`` (every
other column but the embedding) and, with ``embeddings``, ``<sample_id>.npy`` (the embedding, float32).
The shards are planned from the data files' footers (row counts) before any work. Each shard reads only the row
groups holding its rows and commits its tar whole (pipeline/storage.py). Nothing is decoded (the stored PNG bytes
are copied); the driver writes WRITE_THREADS shards at once, overlapping the store's latency as the footer reads
do, so memory is WRITE_THREADS shards whatever the dataset's size, and no Ray cluster is needed. Tar headers and
JSON are built in Python under one GIL: about 750 samples/s on this machine's shared cores (docs/guide.md, Export
for training); each shard is an independent ``write_shard``, the unit to spread over processes beyond that.
``_exporting.json`` claims the folder before the first shard (a rerun of the same export skips the shards already
committed), then README.md (the source's card and a `datasets` config), then ``_export.json`` last: the index of
shards and counts, the completion marker.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow.parquet as pq
import yaml

from pipeline.folders import check_apart, check_only, entries
from pipeline.rows import committed_footers
from pipeline.schema import CARD_FILE, DATA_DIR, RUN_FILE, SELECTION_FILE
from pipeline.settings import UserError
from pipeline.storage import (Location, StorageConfig, StorageError, check_reachable, check_writable, commit, delete,
                              exists, list_files, read_bytes, resolve, write_bytes)

log = logging.getLogger(__name__)
SHARD_NAME = "shard-{:06d}.tar"
SHARD_FILES = "shard-*.tar"  # the glob of every shard, for the card's data_files
CLAIM_FILE = "_exporting.json"  # written before the first shard: this folder is this export's
EXPORT_FILE = "_export.json"  # written last: the index, and the completion marker
EXPORT_CARD = "README.md"  # a tar folder holds no Parquet, so the card can be the usual README
NOT_IN_JSON = ("image", "embedding")  # their own files: <key>.png, <key>.npy
WRITE_THREADS = 4  # shards built and committed at once


@dataclass(frozen=True)
class ExportConfig:
    """Which complete dataset to export as WebDataset shards, and where."""

    input: str
    """a complete generation run (holds _run.json) or curated set (holds _selection.json)"""
    output: str
    """where the shards go (local path, file:// or s3://)"""
    shard_size: int = 1000
    """samples per tar shard"""
    embeddings: bool = False
    """also write each sample's embedding as <key>.npy (float32)"""
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self):
        if self.shard_size < 1:
            raise UserError(f"shard_size must be >= 1, got {self.shard_size}")

    @property
    def settings(self) -> dict:
        """What decides the shards' content: recorded in the claim and the index, compared on a rerun."""
        return {"input": self.input, "shard_size": self.shard_size, "embeddings": self.embeddings}


@dataclass(frozen=True)
class ExportPlan:
    """What an export would write, found by its preflight."""

    config: ExportConfig
    source: Location
    target: Location
    shards: list[list[dict]]  # each shard's pieces: {"path", "start", "stop"}, rows of one data file
    samples: int
    done: bool  # the index is there: nothing to do

    def describe(self) -> str:
        return (f"{self.samples} samples of {self.config.input} into {len(self.shards)} shards of up to "
                f"{self.config.shard_size} at {self.config.output}" + (" (already exported)" if self.done else ""))


def plan_shards(files: list[str], rows: list[int], shard_size: int) -> list[list[dict]]:
    """The files' rows, in order, cut into shards of ``shard_size``: each shard a list of pieces of one file."""
    total = sum(rows)
    shards: list[list[dict]] = [[] for _ in range(math.ceil(total / shard_size))]
    first = 0  # the global position of the file's first row
    for path, count in zip(files, rows):
        start = first
        while start < first + count:  # a piece ends at the file's end or the shard's
            stop = min(first + count, (start // shard_size + 1) * shard_size)
            shards[start // shard_size].append({"path": path, "start": start - first, "stop": stop - first})
            start = stop
        first += count
    return shards


def _recorded(target: Location, elsewhere: str, settings: dict) -> dict | None:
    """The index or claim the folder holds (None: neither), refused when made with other settings."""
    for name in (EXPORT_FILE, CLAIM_FILE):
        if exists(target.child(name)):
            recorded = json.loads(read_bytes(target.child(name)))
            differs = [key for key in settings if recorded.get(key) != settings[key]]
            if differs:
                raise StorageError(f"{target.uri} holds an export made with another "
                                   + "; ".join(f"{key} {recorded.get(key)}, here {settings[key]}" for key in differs)
                                   + f"; {elsewhere}, or rerun with the settings that made it")
            return recorded
    return None


def preflight_export(config: ExportConfig) -> ExportPlan:
    """Every check before the first shard, writing nothing: the input is a complete run or curated set whose data files
    are whole (their footers read), the output lies apart from it, is reachable, and holds nothing but this same
    export (finished, or begun: its claim and shards)."""
    elsewhere = "choose another --output"
    source, target = resolve(config.input, config.storage), resolve(config.output, config.storage)
    if not (exists(source.child(RUN_FILE)) or exists(source.child(SELECTION_FILE))):
        raise StorageError(f"{config.input} is not a complete generation run or curated set (no {RUN_FILE} or "
                           f"{SELECTION_FILE}): finish it first, then export it")
    check_apart(source, target, elsewhere)
    check_reachable(target)
    files = [file.path for file in list_files(source.child(DATA_DIR), ".parquet")]
    shards = plan_shards(files, [footer.num_rows for footer in committed_footers(source)], config.shard_size)
    recorded = _recorded(target, elsewhere, config.settings)
    if recorded is None:
        check_only(target, set(), "this export", elsewhere)
    elif not exists(target.child(EXPORT_FILE)):
        check_only(target, {CLAIM_FILE, EXPORT_CARD, *(SHARD_NAME.format(i) for i in range(len(shards)))}, "this export",
                   elsewhere)
    return ExportPlan(config, source, target, shards, sum(piece["stop"] - piece["start"] for shard in shards
                                                          for piece in shard), exists(target.child(EXPORT_FILE)))


def sample_files(row: dict, embeddings: bool) -> list[tuple[str, bytes]]:
    """A row's WebDataset files: ``<key>.png``, ``<key>.json`` (every column but image and embedding; times in ISO
    8601) and, with ``embeddings``, ``<key>.npy``."""
    key = row["sample_id"]
    fields = {name: value.isoformat() if isinstance(value, datetime) else value
              for name, value in row.items() if name not in NOT_IN_JSON}
    files = [(f"{key}.png", row["image"]["bytes"]), (f"{key}.json", json.dumps(fields, sort_keys=True).encode())]
    if embeddings:
        array = io.BytesIO()
        np.save(array, np.asarray(row["embedding"], dtype=np.float32))
        files.append((f"{key}.npy", array.getvalue()))
    return files


def _piece_rows(source: Location, piece: dict) -> list[dict]:
    """The rows [start, stop) of one data file, reading only the row groups that hold them."""
    with source.filesystem.open_input_file(piece["path"]) as stream:
        parquet = pq.ParquetFile(stream)
        sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
        begins = np.cumsum([0, *sizes[:-1]])
        groups = [i for i, begin in enumerate(begins) if begin < piece["stop"] and begin + sizes[i] > piece["start"]]
        table = parquet.read_row_groups(groups)
    return table.slice(piece["start"] - int(begins[groups[0]]), piece["stop"] - piece["start"]).to_pylist()


def write_shard(spec: dict, source: Location, target: Location, embeddings: bool) -> dict:
    """One shard's tar (``spec``: its index and pieces), built in memory and committed whole; its name and count."""
    buffer, samples = io.BytesIO(), 0
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for piece in spec["pieces"]:
            for row in _piece_rows(source, piece):
                for name, data in sample_files(row, embeddings):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
                samples += 1
    name = SHARD_NAME.format(spec["shard"])
    write_bytes(target.child(name), buffer.getvalue())
    return {"name": name, "samples": samples}


def export_card(source: Location, config: ExportConfig) -> bytes:
    """README.md of the export: a `datasets` config over the shards, and the source's card (its provenance)."""
    front = {"pretty_name": f"jepa-minority export of {config.input}",
             "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": SHARD_FILES}]}]}
    about = [line.removeprefix("# ") for line in read_bytes(source.child(CARD_FILE)).decode().splitlines()
             if line.startswith("# ")]
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {front['pretty_name']}\n\n"
            f"WebDataset shards ({SHARD_FILES}, {config.shard_size} samples each): per sample <sample_id>.png, "
            f"<sample_id>.json{', <sample_id>.npy (embedding)' if config.embeddings else ''}; the index is "
            f"{EXPORT_FILE}. The source's card ({config.input}/{CARD_FILE}):\n\n"
            + "".join(f"> {line}\n>\n" for line in about)).encode()


def run_export(plan: ExportPlan) -> dict:
    """Write the shards the preflighted ``plan`` lacks, then the card and the index last; the index."""
    config, source, target = plan.config, plan.source, plan.target
    if plan.done:
        log.info("%s is already exported: nothing to do", config.output)
        return json.loads(read_bytes(target.child(EXPORT_FILE)))
    check_writable(target)
    if not exists(target.child(CLAIM_FILE)):
        write_bytes(target.child(CLAIM_FILE), json.dumps(config.settings, indent=2).encode())
    present = set(entries(target))
    todo = [{"shard": i, "pieces": pieces} for i, pieces in enumerate(plan.shards) if SHARD_NAME.format(i) not in present]
    log.info("exporting %d of %d shards (%d samples in all)", len(todo), len(plan.shards), plan.samples)
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        written = pool.map(lambda spec: write_shard(spec, source, target, config.embeddings), todo)
        for done, shard in enumerate(written, start=1):
            log.info("%s committed (%d samples; %d of %d)", shard["name"], shard["samples"], done, len(todo))
    index = config.settings | {
        "samples": plan.samples, "files_per_sample": ["png", "json", *(["npy"] if config.embeddings else [])],
        "shards": [{"name": SHARD_NAME.format(i), "samples": sum(p["stop"] - p["start"] for p in pieces)}
                   for i, pieces in enumerate(plan.shards)],
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }
    commit(target, {EXPORT_CARD: export_card(source, config)}, (EXPORT_FILE, json.dumps(index, indent=2).encode()))
    delete(target.child(CLAIM_FILE))  # the index records the same settings
    return index
