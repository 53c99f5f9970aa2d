"""The one source of column names and types: the work manifest, the output rows, failure records."""

from __future__ import annotations

import json

import pyarrow as pa

# The manifest: one row per work entry (a prompt, a class label, or the unconditioned count), never one per
# sample; its samples follow in order, entry by entry (pipeline/generate/work.py).
MANIFEST_SCHEMA = pa.schema([
    pa.field("prompt", pa.string()),  # text-to-image entries
    pa.field("class_label", pa.int64()),  # class-conditional entries
    pa.field("samples", pa.int64()),  # how many samples the entry makes
])

# A sample, as the driver's index ranges expand into rows for the samplers (never stored as a table).
SAMPLE_SCHEMA = pa.schema([
    pa.field("sample_index", pa.int64()),  # the sample's place in the work: 0 .. planned - 1
    pa.field("sample_id", pa.string()),  # deterministic: config digest + sample index
    pa.field("seed", pa.int64()),  # the sample's generator seed: base seed + sample index
    pa.field("prompt", pa.string()),
    pa.field("class_label", pa.int64()),
])
SAMPLE_INDEX = "sample_index"
# Each data file's footer records the sample indices it holds, as [start, stop) ranges (JSON), under this key:
# resume and the final count read footers, never the ids.
SAMPLE_RANGES_KEY = b"jepa_minority.sample_ranges"

IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

# All fields are nullable in the Arrow sense because `datasets` only honours the feature metadata for
# nullable fields; the sampler stage writes nulls only in prompt and class_label.
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("prompt", pa.string()),
        pa.field("class_label", pa.int64()),
        pa.field("image", IMAGE_TYPE),  # PNG bytes, path "<sample_id>.png"
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("jepa_score", pa.float64()),  # exact JEPA-SCORE of the final image
        pa.field("topk_score", pa.float64()),  # exact top-k log-volume of the final image at the run's guidance k
        pa.field("embedding", pa.list_(pa.float32())),  # CLS embedding of the final image
        pa.field("method", pa.string()),
        pa.field("model", pa.string()),  # preset name
        pa.field("encoder", pa.string()),  # encoder name
        pa.field("run_id", pa.string()),  # the MLflow run that generated the row
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ],
)


_ARROW_FLOAT_NAMES = {"halffloat": "float16", "float": "float32", "double": "float64"}  # Arrow's names, datasets'


def _hf_feature(arrow_type: pa.DataType) -> dict:
    """The Hugging Face `datasets` feature of an Arrow type: the image struct as an Image, lists as List."""
    if arrow_type == IMAGE_TYPE:
        return {"_type": "Image"}
    if pa.types.is_list(arrow_type):
        return {"feature": _hf_feature(arrow_type.value_type), "_type": "List"}
    name = str(arrow_type)
    return {"dtype": _ARROW_FLOAT_NAMES.get(name, name), "_type": "Value"}


# Hugging Face `datasets` reads this schema metadata and loads `image` as an Image feature.
OUTPUT_SCHEMA = OUTPUT_SCHEMA.with_metadata({"huggingface": json.dumps(
    {"info": {"features": {field.name: _hf_feature(field.type) for field in OUTPUT_SCHEMA}}})})

# What the samplers hand the sink: the output rows and each one's sample index, which the sink records in the
# data file's footer (SAMPLE_RANGES_KEY) rather than as data.
SAMPLER_SCHEMA = OUTPUT_SCHEMA.append(pa.field(SAMPLE_INDEX, pa.int64()))

SCORE_COLUMNS = ("jepa_score", "topk_score")  # what the filter can rank by (lower is rarer)

# Layout of a run's output folder and of a curated set. The usual readers pointed at the folder itself
# read exactly the data rows (tests/test_readers.py): pyarrow and pandas skip `_` / `.` names but fail on
# any other non-Parquet file, duckdb reads every *.parquet below the folder whatever its name, polars
# needs `<folder>/**/*.parquet`, and Hugging Face datasets reads CARD_FILE or, without one, the files
# named like a split. So only data files end in .parquet, and every other name starts with `_` or `.`.
MANIFEST_FILE = "_manifest.arrow"  # the work entries (Arrow IPC, not .parquet), written before generation starts
DATA_DIR = "data"  # committed output rows
# A generation's data files lie in DATA_DIR/<bucket>/, one folder per BUCKET_SAMPLES sample indices (``bucket_of``),
# so that a progress poll lists only the buckets being written, not the run. Plain names, not Hive's key=value,
# which readers would turn into a column. A curated set has no sample index: its files lie directly in DATA_DIR,
# as every file of a run made before the buckets does; readers and ``storage.list_files`` read both.
BUCKET_SAMPLES = 100_000
DATA_FILE_PREFIX = "train-"  # train-<hash>.parquet: the name datasets' default split patterns pick
DATA_FILE_NAME = f"{DATA_FILE_PREFIX}*.parquet"  # the glob of a committed data file's name
DATA_FILES = f"{DATA_DIR}/**/{DATA_FILE_NAME}"  # the glob of every committed data file, in a bucket or not


def bucket_of(index: int) -> str:
    """The folder under DATA_DIR of the data files holding sample ``index``: its bucket's number, zero-padded."""
    return f"{index // BUCKET_SAMPLES:06d}"


FAILURES_DIR = "_failures"  # one <bucket>/<sample_id>.json per failed sample, bucketed as DATA_DIR is (``bucket_of``);
# a run made before the buckets has them directly in FAILURES_DIR, and ``storage.list_files`` reads both
# The dataset card (what the folder holds, its configs / data_files), which datasets reads at the folder root;
# a README.md there would break pyarrow's and pandas' reads of the folder.
CARD_FILE = ".huggingface.yaml"
RUN_FILE = "_run.json"  # written last: the completion marker

# Layout of a curated set: the run's DATA_DIR and CARD_FILE, then this record written last as its completion marker.
SELECTION_FILE = "_selection.json"
# Written before a curation's first data file, removed once SELECTION_FILE is there: its input and rule, so that
# an interrupted curation's files are known as its own (the only files a curation ever deletes).
CURATION_FILE = "_curation.json"

# Names of the layout before this one, whose manifest and records the readers took for data: a folder
# holding any of them is refused rather than resumed (pipeline/layout.py).
OLD_LAYOUT = ("manifest.parquet", "failures", "selection.json")

# Layout of a refresh root: VERSIONS_DIR/<V>/GENERATED_DIR and .../RAREST_DIR, and LATEST_FILE naming
# the newest complete version, replaced in one write.
VERSIONS_DIR = "versions"
GENERATED_DIR = "generated"
RAREST_DIR = "rarest"
LATEST_FILE = "LATEST.json"

# Layout of an evaluation's output folder: the table, then the result written last as its completion marker.
EVALUATION_TABLE_FILE = "evaluation.md"
EVALUATION_FILE = "evaluation.json"

# Layout of a prior check's output folder: the plot, then the result written last as its completion marker.
PRIOR_CHECK_PLOT = "prior_check.png"
PRIOR_CHECK_FILE = "prior_check.json"
