"""What the usual readers rely on in an output folder: its dataset card, and no folder in the old layout.

The names are pipeline/schema.py's; README.md, "Read the data", shows the readers pointed at a folder.
"""

from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc
import yaml

from pipeline.provenance import provenance_lines
from pipeline.rows import Footers, committed_batches, read_footers
from pipeline.schema import DATA_FILES, OLD_LAYOUT
from pipeline.storage import Location, StorageError, exists


def check_layout(folder: Location) -> None:
    """Refuse a folder written in the layout before this one: its manifest and records would read as data."""
    old = [name for name in OLD_LAYOUT if exists(folder.child(name))]
    if old:
        raise StorageError(f"{folder.uri} was written in the old layout ({', '.join(old)}), which this version does "
                           "not resume: finish it with the version that started it, or choose a new output folder")


def check_resumable(folder: Location, footers: Footers) -> None:
    """A run folder (``check_layout`` passed) this version can add rows to: committed rows with this version's
    columns, as its data files' ``footers`` say (an older version's rows would mix two schemas in one run). Data
    files directly in ``data/``, as the layout before buckets left them, are read and resumed like any other."""
    if footers.lacking:
        raise StorageError(f"{folder.uri} holds rows written before column {', '.join(footers.lacking)} existed, "
                           "which this version does not resume: finish it with the version that started it, or "
                           "choose a new output folder")


def missing_columns(folder: Location) -> list[str]:
    """Columns of OUTPUT_SCHEMA that some committed data file of the folder lacks. Every file's footer is
    read, so a corrupt file is named here, before any job reads rows from it."""
    return list(read_footers(folder).lacking)


CARD_TALLIES = ("model", "encoder", "method")  # the columns a card counts


def tallies(folder: Location) -> tuple[int, dict[str, Counter]]:
    """(rows, each CARD_TALLIES column's values with their counts), counted file by file in columns: memory in a
    few files and the distinct values, not in the rows."""
    rows, counts = 0, {column: Counter() for column in CARD_TALLIES}
    for batch in committed_batches(folder, list(CARD_TALLIES)):
        rows += batch.num_rows
        for column in CARD_TALLIES:
            for entry in pc.value_counts(batch.column(column)).to_pylist():
                counts[column][entry["values"]] += entry["counts"]
    return rows, counts


def _tally(counts: Counter) -> str:
    return ", ".join(f"{value} ({n})" for value, n in sorted(counts.items(), key=lambda item: str(item[0])))


def dataset_card(folder: Location, title: str, lines: list[str], provenance: dict) -> bytes:
    """The dataset card (CARD_FILE): what the folder holds in a few commented lines, where it came from
    (``provenance``, pipeline/provenance.py), and its data files for `datasets`.

    Committed before the folder's completion marker (``storage.commit``). Model, encoder and method come from
    the committed rows themselves, so the card describes what is there.
    """
    rows, counts = tallies(folder)
    about = [
        title,
        f"{rows} rows; model: {_tally(counts['model'])}; encoder: {_tally(counts['encoder'])}; "
        f"method: {_tally(counts['method'])}",
        *lines,
        *provenance_lines(provenance),
        f"Rows: {DATA_FILES} (image: PNG; jepa_score: exact JEPA-SCORE; topk_score: exact top-k log-volume at the "
        "run's guidance k; lower is rarer); the _-prefixed files "
        "are bookkeeping. Read it with datasets.load_dataset(folder) or pandas.read_parquet(folder).",
    ]
    card = {"pretty_name": title,
            "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}]}
    text = "".join(f"# {line}\n" for line in about) + yaml.safe_dump(card, sort_keys=False)
    return text.encode()
