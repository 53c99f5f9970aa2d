"""A Ray Data sink that commits output rows to Parquet files atomically.

Why not ``write_parquet``: it writes straight to the final path, so a killed run can leave a
half-written file that looks like data on a local disk. Here every file is written whole to a
temporary name and renamed (local) or uploaded in one PUT / multipart completion (S3), so a file
is committed or absent. A file's name hashes the sample ids it holds: a retried write task rewrites
the same file rather than adding a duplicate. A generation's files lie in one folder per bucket of sample
indices (pipeline/schema.py, ``BUCKET_SAMPLES``), so a listing of what a run is writing touches only the
buckets it writes. A file's footer records the sample indices it holds as ranges
(pipeline/rows.py, ``sample_ranges``), the samplers' ``sample_index`` column, which is not written as data:
resume reads the footers back (see generate/job.py).

Every block is written as it arrives: the sampler makes one block per batch, so each actor's batch commits
on its own (Ray Data's default, no ``min_rows_per_write``) and an interrupted run keeps all but the batches
in flight. Files are then as small as a batch; ``max_rows_per_file`` only bounds the large ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from pipeline.rows import sample_ranges
from pipeline.schema import (BUCKET_SAMPLES, DATA_DIR, DATA_FILE_PREFIX, OUTPUT_SCHEMA, SAMPLE_INDEX, SAMPLE_RANGES_KEY,
                             SAMPLER_SCHEMA, bucket_of)
from pipeline.storage import Location, StorageConfig, resolve, write_table


def part_name(sample_ids: list[str]) -> str:
    return DATA_FILE_PREFIX + hashlib.sha256("\n".join(sorted(sample_ids)).encode()).hexdigest()[:32] + ".parquet"


class AtomicParquetSink(Datasink[list[str]]):
    """Writes a generation's SAMPLER_SCHEMA rows (as OUTPUT_SCHEMA, their sample indices in the footer) under
    ``<uri>/<DATA_DIR>/<bucket>/``, each file within one bucket (``schema.bucket_of``), or a curation's OUTPUT_SCHEMA
    rows under ``<uri>/<DATA_DIR>/``, in files of at most ``max_rows_per_file``.

    Holds plain settings only, so write workers import pyarrow and Ray, not the models.
    """

    def __init__(self, uri: str, storage: StorageConfig, max_rows_per_file: int, row_group_size: int):
        self.uri = uri
        self.storage = storage
        self.max_rows_per_file = max_rows_per_file
        self.row_group_size = row_group_size

    def write(self, blocks: Iterable[Block], ctx) -> list[str]:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table for table in tables if table.num_rows]
        if not tables:
            return []
        indexed = SAMPLE_INDEX in tables[0].column_names  # a generation's rows; a curation's have no index
        schema = SAMPLER_SCHEMA if indexed else OUTPUT_SCHEMA
        table = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables])
        data = resolve(self.uri, self.storage).child(DATA_DIR)
        if not indexed:  # a curated set: no sample index, so its files lie directly in DATA_DIR
            return self._write_files(data, table, indexed)
        buckets = table.column(SAMPLE_INDEX).to_numpy() // BUCKET_SAMPLES
        names = []
        for number in np.unique(buckets):  # a file never spans two buckets
            rows = table.filter(pa.array(buckets == number))
            folder = bucket_of(int(number) * BUCKET_SAMPLES)
            names += [f"{folder}/{name}" for name in self._write_files(data.child(folder), rows, indexed)]
        return names

    def _write_files(self, folder: Location, table: pa.Table, indexed: bool) -> list[str]:
        """The rows in files of at most ``max_rows_per_file``, each named by its ids; returns their names."""
        names = []
        for offset in range(0, table.num_rows, self.max_rows_per_file):
            chunk = table.slice(offset, self.max_rows_per_file)
            rows = chunk.select(OUTPUT_SCHEMA.names)
            if indexed:
                record = {SAMPLE_RANGES_KEY: sample_ranges(chunk.column(SAMPLE_INDEX).to_numpy())}
                rows = rows.replace_schema_metadata(OUTPUT_SCHEMA.metadata | record)
            name = part_name(rows.column("sample_id").to_pylist())
            write_table(folder.child(name), rows, self.row_group_size)
            names.append(name)
        return names
