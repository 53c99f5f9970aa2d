"""The work plan without a per-sample loop: a manifest of work entries whose samples are a pure function of their
index, the committed samples read from the data files' footers as index ranges, and the missing ranges cut into
pieces for Ray Data (pipeline/generate/work.py, pipeline/rows.py, pipeline/generate/job.py)."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from jobs import generate as generate_job
from pipeline.generate import work
from pipeline.generate.config import load_config
from pipeline.generate.job import MAX_BLOCKS, missing_pieces
from pipeline.generate.preflight import for_device
from pipeline.generate.work import Manifest, build_manifest, work_digest
from pipeline.rows import Committed, by_bucket, committed_batches, committed_samples, sample_ranges
from pipeline.schema import (BUCKET_SAMPLES, DATA_DIR, DATA_FILE_PREFIX, MANIFEST_FILE, OUTPUT_SCHEMA, RUN_FILE,
                             SAMPLE_INDEX, SAMPLE_RANGES_KEY, SAMPLER_SCHEMA, bucket_of)
from pipeline.sink import AtomicParquetSink
from pipeline.storage import StorageConfig, StorageError, resolve
from tests.conftest import cpu_manifest

IDENTITY = {"model": {"preset": "pixel-unet"}, "encoder": {"name": "x"}, "sampling": {"steps": 2}, "base_seed": 7}


def sha(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


@pytest.mark.parametrize("entries", [
    [(None, None, 7)],
    [(None, 3, 2), (None, 1, 5), (None, 3, 1)],
    [('a "cat" \u00e9\n', None, 3), ("dog", None, 4)],
])
def test_the_digest_is_the_hash_of_every_samples_json_as_before(entries, monkeypatch):
    """The text the manifest of one row per sample hashed, streamed in chunks (3 samples here), so earlier runs'
    digests, ids and seeds are this version's."""
    monkeypatch.setattr(work, "DIGEST_CHUNK", 3)
    rows = [(prompt, label) for prompt, label, samples in entries for _ in range(samples)]
    assert work_digest(IDENTITY, entries) == sha(json.dumps(IDENTITY | {"rows": rows}, sort_keys=True)).hex()


def test_samples_are_a_pure_function_of_their_index(write_config, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na cow\n")
    manifest = cpu_manifest(load_config(write_config(work={"prompts": str(prompts), "class_labels": None,
                                                           "repeats": 3})))
    every = manifest.table
    assert manifest.work.num_rows == 3 and manifest.planned == every.num_rows == 9
    assert every.column("prompt").to_pylist() == ["a cat"] * 3 + ["a dog"] * 3 + ["a cow"] * 3
    assert every.column("sample_id").to_pylist() == [sha(f"{manifest.digest}:{i}").hex()[:24] for i in range(9)]
    base = load_config(write_config()).work.base_seed
    assert every.column("seed").to_pylist() == [int.from_bytes(sha(f"seed:{base}:{i}")[:8], "big") >> 1
                                                for i in range(9)]
    assert manifest.rows(4, 7).equals(every.slice(4, 3).replace_schema_metadata(None))  # any range, alone
    stored = Manifest.read(manifest.work)  # as a resume reads _manifest.arrow back
    assert (stored.digest, stored.planned) == (manifest.digest, 9) and stored.rows(0, 9).equals(manifest.rows(0, 9))


def test_a_plan_of_ten_million_samples_holds_one_row_and_bounded_memory(write_config):
    """The driver's plan does not grow with the run: one row per work entry, memory flat (the old manifest of
    one row per sample took gigabytes here)."""
    config = for_device(load_config(write_config(work={"class_labels": [0, 3], "samples_per_label": 5_000_000})), 0.0)
    tracemalloc.start()
    manifest = build_manifest(config)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert manifest.planned == 10_000_000 and manifest.work.num_rows == 2
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"
    last = manifest.rows(9_999_998, 10_000_000)
    assert last.column("class_label").to_pylist() == [3, 3]
    assert last.column("sample_id").to_pylist()[1] == sha(f"{manifest.digest}:9999999").hex()[:24]
    assert manifest.group_counts("class_label") == {0: 5_000_000, 3: 5_000_000}  # refresh's and demo's quota check
    assert manifest.group_counts(None) == {None: 10_000_000}


def test_samples_planned_per_group_sum_the_work_entries_of_each(write_config, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na cat\n")
    manifest = cpu_manifest(load_config(write_config(work={"prompts": str(prompts), "class_labels": None, "repeats": 2})))
    assert manifest.group_counts("prompt") == {"a cat": 4, "a dog": 2}
    labels = cpu_manifest(load_config(write_config(work={"class_labels": [1, 4, 1], "samples_per_label": 3})))
    assert labels.group_counts("class_label") == {1: 6, 4: 3}


def test_committed_ranges_give_count_duplicates_missing_and_membership():
    committed = Committed(np.array([[0, 4], [2, 5], [5, 6], [9, 12]]))  # [2, 4) committed twice
    assert committed.count == 11 and committed.duplicates == 2
    assert committed.union.tolist() == [[0, 6], [9, 12]]
    assert committed.missing(15).tolist() == [[6, 9], [12, 15]]
    assert [committed.holds(i) for i in (0, 5, 6, 8, 9, 11, 12)] == [True, True, False, False, True, True, False]
    assert Committed.nothing().missing(3).tolist() == [[0, 3]] and Committed.nothing().count == 0
    assert json.loads(sample_ranges(np.array([7, 3, 4, 5, 9, 10]))) == [[3, 6], [7, 8], [9, 11]]


@pytest.mark.parametrize("planned,batch_size", [(40, 3), (100_000_000, 16)])
def test_missing_ranges_become_pieces_that_cover_each_sample_once(planned, batch_size):
    committed = Committed(np.array([[2, 5], [planned // 2, planned // 2 + 7]]))
    missing = committed.missing(planned)
    pieces = missing_pieces(missing, batch_size)
    starts, stops = pieces.column("start").to_numpy(), pieces.column("stop").to_numpy()
    assert (stops > starts).all() and (stops[:-1] <= starts[1:]).all()  # disjoint, in order
    assert int((stops - starts).sum()) == planned - committed.count
    assert pieces.num_rows <= MAX_BLOCKS + len(missing)
    if planned < MAX_BLOCKS * batch_size:
        assert (stops - starts).max() <= batch_size  # small runs: one batch per piece, every actor busy
    covered = np.zeros(planned, dtype=bool) if planned <= 1000 else None
    if covered is not None:
        for start, stop in zip(starts, stops):
            covered[start:stop] = True
        assert covered.tolist() == [not committed.holds(i) for i in range(planned)]


def test_committed_samples_read_the_footers_and_refuse_a_file_without_its_record(tmp_path):
    data = tmp_path / "out" / DATA_DIR
    (data / bucket_of(0)).mkdir(parents=True)
    rows = pa.Table.from_pylist([{"sample_id": "a"}, {"sample_id": "b"}], schema=OUTPUT_SCHEMA)
    for name, indices in ((f"{DATA_FILE_PREFIX}1", [4, 6]), (f"{bucket_of(0)}/{DATA_FILE_PREFIX}2", [0, 1])):
        record = {SAMPLE_RANGES_KEY: sample_ranges(np.array(indices))}  # flat (the layout before buckets), in a bucket
        pq.write_table(rows.replace_schema_metadata(OUTPUT_SCHEMA.metadata | record), data / f"{name}.parquet")
    output = resolve(str(tmp_path / "out"), StorageConfig())
    assert committed_samples(output).ranges.tolist() == [[0, 2], [4, 5], [6, 7]]
    pq.write_table(rows, data / f"{DATA_FILE_PREFIX}3.parquet")  # as an earlier version wrote it
    with pytest.raises(StorageError, match="did not record its samples' indices") as error:
        committed_samples(output)
    assert "\n" not in str(error.value) and f"{DATA_FILE_PREFIX}3.parquet" in str(error.value)


def test_a_footer_already_read_is_not_read_again(tmp_path):
    """Preflight reads each footer once and the run's last count only those of the files it committed: a file
    known to the plan is never opened again (here it is made unreadable, and the count still holds it)."""
    output = resolve(str(tmp_path / "out"), StorageConfig())
    sink = AtomicParquetSink(str(tmp_path / "out"), StorageConfig(), max_rows_per_file=8, row_group_size=8)
    sink.write([sampler_rows([0, 1, 2])], None)
    known = committed_samples(output)
    (old,) = known.files
    sink.write([sampler_rows([3, 4])], None)
    Path(old).write_bytes(b"not parquet")
    both = committed_samples(output, known)
    assert both.union.tolist() == [[0, 5]] and both.count == 5 and len(both.files) == 2
    with pytest.raises(StorageError, match="is not a readable Parquet file"):
        committed_samples(output)  # unknown, it is read, and named


def sampler_rows(indices: list[int]) -> pa.Table:
    """Rows as the samplers hand them to the sink: the output columns (ids only) and each one's sample index."""
    return pa.Table.from_pylist([{"sample_id": f"s{i}", SAMPLE_INDEX: i} for i in indices], schema=SAMPLER_SCHEMA)


def test_the_sink_writes_each_file_within_one_bucket(tmp_path):
    """A batch that straddles a bucket's edge becomes one file per bucket, each in its folder; a curation's rows
    (no index) lie directly in data/."""
    edge = BUCKET_SAMPLES
    sink = AtomicParquetSink(str(tmp_path / "run"), StorageConfig(), max_rows_per_file=2, row_group_size=2)
    names = sink.write([sampler_rows([edge - 2, edge + 1, edge - 1, edge, edge + 2])], None)
    assert sorted(name.split("/")[0] for name in names) == [bucket_of(0)] + [bucket_of(edge)] * 2 == ["000000", "000001", "000001"]
    for name in names:
        footer = pq.read_metadata(tmp_path / "run" / DATA_DIR / name)
        held = np.concatenate([np.arange(a, b) for a, b in json.loads(footer.metadata[SAMPLE_RANGES_KEY])])
        assert {bucket_of(int(i)) for i in held} == {name.split("/")[0]}
    read = pq.read_table(tmp_path / "run")  # a reader of the folder: every row, no bucket column
    assert sorted(read.column("sample_id").to_pylist()) == sorted(f"s{i}" for i in range(edge - 2, edge + 3))
    assert read.column_names == OUTPUT_SCHEMA.names
    curated = AtomicParquetSink(str(tmp_path / "cur"), StorageConfig(), max_rows_per_file=8, row_group_size=8)
    (name,) = curated.write([sampler_rows([edge - 1, edge]).drop_columns([SAMPLE_INDEX])], None)
    assert (tmp_path / "cur" / DATA_DIR / name).is_file() and "/" not in name


def test_committed_rows_stream_file_by_file_with_their_file(tmp_path):
    output = resolve(str(tmp_path / "out"), StorageConfig())
    sink = AtomicParquetSink(str(tmp_path / "out"), StorageConfig(), max_rows_per_file=2, row_group_size=1)
    names = sink.write([sampler_rows([0, 1, 2, BUCKET_SAMPLES])], None)
    rows = pa.Table.from_batches(list(committed_batches(output, ["sample_id", "__filename"]))).to_pylist()
    where = {f"s{i}": name for name, ids in zip(names, ([0, 1], [2], [BUCKET_SAMPLES])) for i in ids}
    assert sorted(rows, key=lambda row: row["sample_id"]) == sorted(
        ({"sample_id": i, "__filename": str(tmp_path / "out" / DATA_DIR / name)} for i, name in where.items()),
        key=lambda row: row["sample_id"])


def test_samples_are_counted_in_their_buckets():
    b = BUCKET_SAMPLES
    assert by_bucket(np.array([[3, 5], [b - 1, 2 * b + 7], [5 * b, 5 * b + 1]])) == {
        bucket_of(0): 3, bucket_of(b): b, bucket_of(2 * b): 7, bucket_of(5 * b): 1}
    assert by_bucket(np.empty((0, 2), dtype=np.int64)) == {}


def test_a_run_an_earlier_version_left_is_refused_in_one_line_and_one_it_finished_stays_complete(
        write_config, tmp_path, capsys):
    """The reader-compatibility note: the same digest and ids, but data files without the footer record."""
    path, out = write_config(), tmp_path / "out"
    earlier = cpu_manifest(load_config(path)).table.drop_columns(["sample_index"])  # one row per sample, as it stored
    (out / DATA_DIR).mkdir(parents=True)
    feather.write_feather(earlier, out / MANIFEST_FILE)
    rows = pa.Table.from_pylist(earlier.select(["sample_id"]).to_pylist(), schema=OUTPUT_SCHEMA)
    pq.write_table(rows, out / DATA_DIR / f"{DATA_FILE_PREFIX}0.parquet")
    assert generate_job.main([path, "--dry-run"]) == 2
    assert "did not record its samples' indices: finish this run with that version" in capsys.readouterr().err
    (out / RUN_FILE).write_text(json.dumps({"counts": {"planned": 12, "committed": 12, "failed": 0}}))
    assert generate_job.main([path, "--dry-run"]) == 0
    assert capsys.readouterr().out == f"dry run: 12 samples planned into {out}, 12 already committed: already complete\n"
