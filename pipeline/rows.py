"""A run's committed rows, read back with pyarrow alone (light: the page and the filter's driver use it).

Which samples a run has committed is read from the data files' footers, never from their rows: each file
records the sample indices it holds as [start, stop) ranges (``sample_ranges``), so resume and the final
count cost one small ranged read per file and memory in the number of ranges, not of samples.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import BUCKET_SAMPLES, DATA_DIR, OUTPUT_SCHEMA, SAMPLE_RANGES_KEY, bucket_of
from pipeline.storage import Location, StorageError, clear_errors, list_files

T = TypeVar("T")
READ_AHEAD = 16  # files read at once (a footer, or a file's few columns), so S3's latency overlaps
FILENAME = "__filename"  # the file's path as a column, as pyarrow's datasets name it


def read_committed(output: Location, columns: list[str]) -> pa.Table:
    """These columns of every committed data file of an output; an empty table when there are none.

    ``__filename`` (pyarrow's special column) may be asked for beside the schema's own columns.
    """
    dataset = _dataset(output)
    if dataset is None:
        return pa.schema([OUTPUT_SCHEMA.field(c) for c in columns if c in OUTPUT_SCHEMA.names]).empty_table()
    with clear_errors("read", output.child(DATA_DIR)):
        return dataset.to_table(columns=columns)


def committed_batches(output: Location, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """These columns of every committed data file, file by file (READ_AHEAD files at most read ahead): memory in
    a few files, not in the run; ``__filename`` (FILENAME) may be asked for, as in ``read_committed``.

    Each file is opened and closed on its own: a pyarrow dataset over every file keeps per-file state as it
    scans (peak RSS 154 MiB at 1M rows, 234 MiB at 8M here; file by file, 92 and 97 MiB)."""
    stored = [column for column in columns if column != FILENAME]

    def read(file: Location) -> pa.Table:
        with clear_errors("read", file), pq.ParquetFile(file.path, filesystem=file.filesystem) as parquet:
            table = parquet.read(columns=stored)
        if FILENAME in columns:
            table = table.append_column(FILENAME, pa.array([file.path] * table.num_rows, pa.string()))
        return table.select(columns)

    for table in _read_ahead(read, list_files(output.child(DATA_DIR), ".parquet")):
        yield from table.to_batches()


def _dataset(output: Location):
    """A pyarrow dataset of the output's committed data files (in their buckets or not); None when there are none."""
    files = list_files(output.child(DATA_DIR), ".parquet")
    if not files:
        return None
    import pyarrow.dataset as pads  # here, not above: it imports pandas, seconds a dry run need not wait

    with clear_errors("read", output.child(DATA_DIR)):
        return pads.dataset([f.path for f in files], filesystem=output.filesystem, format="parquet")


def sample_ranges(indices: np.ndarray) -> bytes:
    """A data file's record of the sample indices it holds: [start, stop) ranges of consecutive indices, JSON."""
    ordered = np.sort(np.asarray(indices, dtype=np.int64))
    breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
    starts, stops = ordered[np.r_[0, breaks]], ordered[np.r_[breaks - 1, len(ordered) - 1]] + 1
    return json.dumps(np.stack([starts, stops], axis=1).tolist()).encode()


@dataclass(frozen=True)
class Committed:
    """The sample indices a run's data files hold, as [start, stop) ranges, one or more per file."""

    ranges: np.ndarray  # int64 [K, 2], sorted by start; ranges of different files may overlap only by a bug
    files: frozenset[str] = frozenset()  # the data files (paths) whose footers recorded them

    @classmethod
    def nothing(cls) -> Committed:
        return cls(np.empty((0, 2), dtype=np.int64))

    @property
    def count(self) -> int:
        """Samples committed, a duplicate counted each time it was committed."""
        return int((self.ranges[:, 1] - self.ranges[:, 0]).sum())

    @cached_property
    def union(self) -> np.ndarray:
        """The union of the ranges, as sorted disjoint [start, stop) ranges."""
        if not len(self.ranges):
            return self.ranges
        starts, stops = self.ranges[:, 0], np.maximum.accumulate(self.ranges[:, 1])
        first = np.r_[True, starts[1:] > stops[:-1]]  # a range that begins past every earlier one's end
        last = np.r_[first[1:], True]
        return np.stack([starts[first], stops[last]], axis=1)

    @property
    def duplicates(self) -> int:
        """Samples committed more than once (each extra time counted)."""
        union = self.union
        return self.count - int((union[:, 1] - union[:, 0]).sum())

    def missing(self, planned: int) -> np.ndarray:
        """The [start, stop) ranges of 0 .. planned - 1 not committed."""
        union = self.union
        starts, stops = np.r_[0, union[:, 1]], np.r_[union[:, 0], planned]
        keep = stops > starts
        return np.stack([starts[keep], stops[keep]], axis=1)

    def holds(self, index: int) -> bool:
        union = self.union
        at = np.searchsorted(union[:, 0], index, side="right") - 1
        return bool(at >= 0 and index < union[at, 1])


@dataclass(frozen=True)
class Footers:
    """What the committed data files' footers say, each footer read once (``read_footers``)."""

    committed: Committed  # the sample ranges of the files that record them, and every file read
    lacking: tuple[str, ...]  # OUTPUT_SCHEMA columns some file lacks (rows of an earlier version)
    unrecorded: tuple[str, ...]  # files without the sample-range record (an earlier version's), by URI

    def samples(self) -> Committed:
        """The committed samples; a file without the record (written by an earlier version) is refused in one line."""
        if self.unrecorded:
            raise StorageError(f"{self.unrecorded[0]} was committed by an earlier version, which did not record its "
                               "samples' indices: finish this run with that version, or choose a new output.uri")
        return self.committed


def read_footers(output: Location, known: Committed | None = None) -> Footers:
    """The footers of the output's committed data files, in their buckets or not, but those in ``known.files``
    (read before: a committed file never changes), whose ranges are kept."""
    known = known or Committed.nothing()
    files = [file for file in list_files(output.child(DATA_DIR), ".parquet") if file.path not in known.files]
    ranges, lacking, unrecorded = [known.ranges], set(), []
    for file, footer in zip(files, _read_ahead(read_footer, files)):
        lacking |= set(OUTPUT_SCHEMA.names) - set(footer.schema.to_arrow_schema().names)
        record = (footer.metadata or {}).get(SAMPLE_RANGES_KEY)
        if record is None:
            unrecorded.append(file.uri)
        else:
            ranges.append(np.array(json.loads(record), dtype=np.int64).reshape(-1, 2))
    table = np.concatenate(ranges)
    committed = Committed(table[np.argsort(table[:, 0], kind="stable")], known.files | {f.path for f in files})
    return Footers(committed, tuple(name for name in OUTPUT_SCHEMA.names if name in lacking), tuple(unrecorded))


def committed_samples(output: Location, known: Committed | None = None) -> Committed:
    """The sample indices every committed data file records in its footer, reading only the footers not in
    ``known``; a file without the record (written by an earlier version) is refused in one line."""
    return read_footers(output, known).samples()


def by_bucket(ranges: np.ndarray) -> dict[str, int]:
    """How many samples of these [start, stop) ranges each bucket folder holds (``schema.bucket_of``)."""
    counts: Counter[str] = Counter()
    for start, stop in ranges.tolist():
        for first in range(start - start % BUCKET_SAMPLES, stop, BUCKET_SAMPLES):
            counts[bucket_of(first)] += min(stop, first + BUCKET_SAMPLES) - max(start, first)
    return dict(counts)


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
    return list(_read_ahead(read_footer, list_files(output.child(DATA_DIR), ".parquet")))


def _read_ahead(read: Callable[[Location], T], files: list[Location]) -> Iterator[T]:
    """``read`` of each file, in order, at most READ_AHEAD files ahead of the caller: S3's latency overlaps, and
    memory holds a few results, not the run's."""
    with ThreadPoolExecutor(READ_AHEAD) as pool:
        pending: deque[Future[T]] = deque()
        for file in files:
            pending.append(pool.submit(read, file))
            if len(pending) > READ_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
