"""`jepa-minority export`: a complete dataset as WebDataset shards, read back with the `webdataset` package, locally
and from moto's S3 server; refusals in one line before any work; an interrupted export resumes; the provenance facts.

The input is a complete run folder in the product's layout (rows in OUTPUT_SCHEMA over two data files, its card
and _run.json), written here with the product's storage helpers: the export reads nothing else.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import webdataset as wds
from PIL import Image

from jobs import export as export_job
from pipeline.curate.export import CLAIM_FILE, EXPORT_CARD, EXPORT_FILE, plan_shards
from pipeline.layout import dataset_card
from pipeline.provenance import generation_provenance, licence, weights_digest
from pipeline.schema import CARD_FILE, DATA_DIR, OUTPUT_SCHEMA, RUN_FILE
from pipeline.storage import StorageConfig, commit, resolve, write_table

STREAM = ("import boto3, sys; endpoint, bucket, key = sys.argv[1:]; "
          "boto3.client(\"s3\", endpoint_url=endpoint).download_fileobj(bucket, key, sys.stdout.buffer)")
ROWS_PER_FILE = (4, 3)  # two data files, row groups of 2: shards of 3 cross both kinds of boundary


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A complete run: 7 rows in two files, a card with the provenance of a weights folder, and _run.json."""
    root = tmp_path_factory.mktemp("export")
    (root / "model").mkdir()
    (root / "model" / "model.safetensors").write_bytes(b"weights")
    (root / "model" / "config.json").write_text(json.dumps({"license": "mit"}))
    folder = resolve(str(root / "run"), StorageConfig())
    rows, index = [], 0
    for file, count in enumerate(ROWS_PER_FILE):
        batch = [{"sample_id": f"s{index + i:03d}", "seed": index + i, "prompt": None, "class_label": (index + i) % 3,
                  "image": {"bytes": png(index + i), "path": f"s{index + i:03d}.png"}, "width": 8, "height": 8,
                  "jepa_score": -float(index + i), "topk_score": 0.5 * (index + i),
                  "embedding": [float(index + i), 1.0], "method": "jepa", "model": "pixel-unet", "encoder": "tiny",
                  "run_id": "r1", "created_at": datetime(2026, 12, 3, tzinfo=timezone.utc)} for i in range(count)]
        write_table(folder.child(DATA_DIR, f"train-{file}.parquet"), pa.Table.from_pylist(batch, OUTPUT_SCHEMA), 2)
        rows += batch
        index += count
    config = {"model": {"preset": "pixel-unet", "source": str(root / "model")},
              "encoder": {"name": "tiny", "weights": "hub"}}
    facts = generation_provenance(config, "m1", {"run_id": "r1", "tracking_uri": "sqlite:///x.db", "experiment": "e"})
    commit(folder, {CARD_FILE: dataset_card(folder, "a run", ["7 rows"], facts)},
           (RUN_FILE, json.dumps({"config": config, "provenance": facts}).encode()))
    return root / "run"


def test_the_card_counts_models_encoders_and_methods_over_every_file(run, tmp_path):
    """Counts over every data file, in bucket folders too, each value with its rows."""
    folder = resolve(str(tmp_path / "mixed"), StorageConfig())
    rows = stored_rows(run)
    for bucket, (part, method) in enumerate(((rows[:3], "jepa"), (rows[3:], "unguided"))):
        table = pa.Table.from_pylist([row | {"method": method, "model": f"m{bucket}"} for row in part], OUTPUT_SCHEMA)
        write_table(folder.child(DATA_DIR, f"{bucket:06d}", f"train-{bucket}.parquet"), table, 2)
    card = dataset_card(folder, "a run", [], json.loads((run / RUN_FILE).read_text())["provenance"]).decode()
    assert "# 7 rows; model: m0 (3), m1 (4); encoder: tiny (7); method: jepa (3), unguided (4)\n" in card


def stored_rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(folder / DATA_DIR).to_pylist()


def check_samples(samples: list[dict], rows: list[dict], embeddings: bool) -> None:
    """Every row read back once, in order, its PNG, its columns and (with ``embeddings``) its embedding intact."""
    assert [sample["__key__"] for sample in samples] == [row["sample_id"] for row in rows]
    for sample, row in zip(samples, rows):
        assert sample["png"] == row["image"]["bytes"]
        columns = {key: value for key, value in row.items() if key not in ("image", "embedding")}
        assert json.loads(sample["json"]) == columns | {"created_at": row["created_at"].isoformat()}
        assert ("npy" in sample) == embeddings
        if embeddings:
            assert np.array_equal(np.load(io.BytesIO(sample["npy"])), np.array(row["embedding"], dtype=np.float32))


def test_the_shards_cut_the_files_rows_in_order():
    assert plan_shards(["a", "b"], [4, 3], 3) == [
        [{"path": "a", "start": 0, "stop": 3}],
        [{"path": "a", "start": 3, "stop": 4}, {"path": "b", "start": 0, "stop": 2}],
        [{"path": "b", "start": 2, "stop": 3}]]
    assert plan_shards(["a", "b"], [0, 2], 5) == [[{"path": "b", "start": 0, "stop": 2}]]


def test_an_export_reads_back_with_webdataset_every_sample_once(run, tmp_path, capsys):
    out = tmp_path / "shards"
    assert export_job.main(["--input", str(run), "--output", str(out), "--shard-size", "3", "--embeddings"]) == 0
    assert "exported 7 samples into 3 shards" in capsys.readouterr().out
    shards = [str(out / f"shard-{i:06d}.tar") for i in range(3)]
    assert {path.name for path in out.iterdir()} == {EXPORT_FILE, EXPORT_CARD, *(Path(s).name for s in shards)}
    check_samples(list(wds.WebDataset(shards, shardshuffle=False)), stored_rows(run), embeddings=True)
    index = json.loads((out / EXPORT_FILE).read_text())
    assert [shard["samples"] for shard in index["shards"]] == [3, 3, 1] and index["samples"] == 7
    card = (out / EXPORT_CARD).read_text()
    assert f"> model: pixel-unet from {run.parent / 'model'}; weights {weights_digest(str(run.parent / 'model'))}" in card
    import datasets  # the card's configs: datasets reads the shards from the folder itself

    loaded = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded["__key__"] == [row["sample_id"] for row in stored_rows(run)]


def test_an_interrupted_export_resumes_and_a_finished_one_is_left_alone(run, tmp_path):
    out = tmp_path / "shards"
    args = ["--input", str(run), "--output", str(out), "--shard-size", "5"]
    assert export_job.main(args) == 0
    for name in (EXPORT_FILE, EXPORT_CARD, "shard-000001.tar"):  # as if killed after the first shard
        (out / name).unlink()
    (out / CLAIM_FILE).write_text(json.dumps({"input": str(run), "shard_size": 5, "embeddings": False}))
    first = (out / "shard-000000.tar").stat().st_mtime_ns
    assert export_job.main(args) == 0
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first and not (out / CLAIM_FILE).exists()
    check_samples(list(wds.WebDataset([str(out / "shard-000000.tar"), str(out / "shard-000001.tar")],
                                      shardshuffle=False)), stored_rows(run), embeddings=False)
    index = (out / EXPORT_FILE).read_bytes()
    assert export_job.main(args) == 0 and (out / EXPORT_FILE).read_bytes() == index  # done: nothing rewritten


def test_an_export_to_s3_reads_back_with_webdataset(s3, run):
    client = s3.client()
    client.create_bucket(Bucket="export")
    assert export_job.main(["--input", str(run), "--output", "s3://export/set", "--endpoint-url", s3.endpoint]) == 0
    listed = sorted(item["Key"] for item in client.list_objects_v2(Bucket="export")["Contents"]
                    if not item["Key"].endswith("/"))  # pyarrow's folder marker
    assert listed == ["set/README.md", "set/_export.json", "set/shard-000000.tar"]  # the default size holds all 7
    # streamed as WebDataset reads a bucket: a pipe: URL whose command writes the object to stdout
    urls = [f"pipe:{sys.executable} -c '{STREAM}' {s3.endpoint} export {key}" for key in listed if key.endswith(".tar")]
    check_samples(list(wds.WebDataset(urls, shardshuffle=False)), stored_rows(run), embeddings=False)


@pytest.mark.parametrize("case", ["incomplete input", "output holds other files", "output inside input",
                                  "another shard size", "shard size 0"])
def test_bad_input_is_refused_in_one_line_before_any_work(run, tmp_path, capsys, case):
    out = tmp_path / "shards"
    source = run
    if case == "incomplete input":
        source = tmp_path / "partial"
        (source / DATA_DIR).mkdir(parents=True)
    elif case == "output holds other files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "output inside input":
        out = run / "shards"
    elif case == "another shard size":
        out.mkdir()
        (out / CLAIM_FILE).write_text(json.dumps({"input": str(run), "shard_size": 9, "embeddings": False}))
    size = "0" if case == "shard size 0" else "3"
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert export_job.main(["--input", str(source), "--output", str(out), "--shard-size", size]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert {"incomplete input": "is not a complete generation run or curated set",
            "output holds other files": "holds files this export did not write (notes.txt)",
            "output inside input": "lies inside",
            "another shard size": "holds an export made with another shard_size 9, here 3",
            "shard size 0": "shard_size must be >= 1, got 0"}[case] in error
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before  # nothing written


def test_the_weights_digest_is_sha256sum_and_the_licence_is_the_folders(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "a.safetensors").write_bytes(b"one")
    (tmp_path / "b.bin").write_bytes(b"two")
    (tmp_path / "notes.txt").write_text("not weights")
    listing = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in (("b.bin", b"two"),
                                                                                          ("unet/a.safetensors", b"one")))
    assert weights_digest(str(tmp_path)) == f"sha256:{hashlib.sha256(listing.encode()).hexdigest()}"
    assert weights_digest(str(tmp_path / "b.bin")) == f"sha256:{hashlib.sha256(b'two').hexdigest()}"
    assert weights_digest("org/model").startswith("not hashed")
    assert licence(str(tmp_path)) == "not stated"
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert licence(str(tmp_path)).startswith("not stated (ParserError reading")  # never fails a finished run
    (tmp_path / "README.md").write_text("---\nlicense: openrail\n---\n# a model\n")
    assert licence(str(tmp_path)) == "openrail"
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_cfg": {"license": "apache-2.0"}}))
    assert licence(str(tmp_path)) == "apache-2.0"
