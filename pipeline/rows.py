"""A run's committed rows, read back with pyarrow alone (light: the page and the filter's driver use it)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.schema import DATA_DIR, OUTPUT_SCHEMA
from pipeline.storage import Location, StorageError, clear_errors, list_files

FOOTER_READERS = 16  # footers read at once: one small ranged read each, so S3's latency overlaps


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


def read_footer(file: Location) -> pq.FileMetaData:
    """A Parquet file's footer (schema, row count); a file that is not whole Parquet is named, with the fix."""
    with clear_errors("read", file):
        try:
            return pq.read_metadata(file.path, filesystem=file.filesystem)
        except pa.ArrowInvalid as error:
            raise StorageError(f"{file.uri} is not a readable Parquet file ({str(error).splitlines()[0]}): remove it, "
                               "or restore it from a copy") from error


def committed_footers(output: Location) -> list[pq.FileMetaData]:
    """The footer of every committed data file, read before any job reads the rows: a corrupt file is named
    here, in one line, not deep inside a Ray worker."""
    files = list_files(output.child(DATA_DIR), ".parquet")
    with ThreadPoolExecutor(FOOTER_READERS) as pool:
        return list(pool.map(read_footer, files))
