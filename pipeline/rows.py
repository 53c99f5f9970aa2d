"""A run's committed rows, read back with pyarrow alone (light: the page and the filter's driver use it)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.schema import DATA_DIR, OUTPUT_SCHEMA
from pipeline.storage import Location, clear_errors, list_files


def read_committed(output: Location, columns: list[str]) -> pa.Table:
    """These columns of every committed data file of an output; an empty table when there are none.

    ``__filename`` (pyarrow's special column) may be asked for beside the schema's own columns.
    """
    files = list_files(output.child(DATA_DIR), ".parquet")
    if not files:
        return pa.schema([OUTPUT_SCHEMA.field(c) for c in columns if c in OUTPUT_SCHEMA.names]).empty_table()
    with clear_errors("read", output.child(DATA_DIR)):
        dataset = pads.dataset([f.path for f in files], filesystem=output.filesystem, format="parquet")
        return dataset.to_table(columns=columns)


def committed_ids(output: Location) -> pa.Array:
    """Sample ids of every committed data file."""
    return read_committed(output, ["sample_id"]).column("sample_id").combine_chunks()
