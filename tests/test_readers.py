"""The usual readers pointed at a run folder and at a curated set read exactly the committed rows.

One real run on the tiny models (and its curated set) per module, read by pyarrow, pandas, duckdb,
polars and Hugging Face datasets; pandas and datasets also over s3:// (s3fs) from moto's server. The
README's "Read the data" snippets run here as written, on these folders.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from jobs import filter as filter_job
from jobs import generate as generate_job
from pipeline.curate.config import FilterConfig
from pipeline.curate.filter import run_filter
from pipeline.rows import read_committed
from pipeline.schema import (CARD_FILE, DATA_DIR, DATA_FILES, FAILURES_DIR, MANIFEST_FILE, OLD_LAYOUT, RUN_FILE,
                             SELECTION_FILE, bucket_of)
from pipeline.settings import TrackingConfig
from pipeline.storage import StorageConfig, StorageError, resolve
from tests.conftest import ENCODER_NAME, TINY_SIZE, tracking_section

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("run", "curated")
BUCKET = "readers"


def committed(folder: Path) -> list[str]:
    """The ids the folder's own completion marker vouches for, read through the product's code."""
    marker = json.loads((folder / (RUN_FILE if (folder / RUN_FILE).exists() else SELECTION_FILE)).read_text())
    count = marker["counts"]["committed"] if "counts" in marker else marker["rows_kept"]
    ids = sorted(read_committed(resolve(str(folder), StorageConfig()), ["sample_id"]).column("sample_id").to_pylist())
    assert len(ids) == count > 0
    return ids


def decodes(images) -> bool:
    """Every image is a whole PNG (bytes) or already a PIL image (datasets' Image feature)."""
    for image in images:
        picture = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image["bytes"]))
        picture.load()
        if picture.size != (8, 8):
            return False
    return True


@pytest.fixture(scope="module")
def folders(ray_cluster, tmp_path_factory, class_unet, tiny_vit_folder) -> dict[str, Path]:
    """A generated run, with a failure record planted beside its data, and its curated set (2 per label)."""
    root = tmp_path_factory.mktemp("readers")
    tracking = tracking_section(root)
    config = {
        "model": {"preset": "pixel-unet", "source": str(class_unet)},
        "encoder": {"name": ENCODER_NAME, "weights": str(tiny_vit_folder), "input_size": TINY_SIZE},
        "sampling": {"method": "jepa", "steps": 2, "guidance": {"tau": 1.0, "k": 4}},
        "work": {"class_labels": [0, 3, 7], "samples_per_label": 4},
        "output": {"uri": str(root / "run"), "max_rows_per_file": 4, "row_group_size": 2},
        "ray": {"actors": 2, "cpus_per_actor": 0.5, "batch_size": 2},
        "tracking": tracking,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    assert generate_job.main([str(root / "config.yaml")]) == 0
    (root / "run" / FAILURES_DIR).mkdir()  # as a failed sample's record would lie; readers must skip it
    (root / "run" / FAILURES_DIR / "planted.json").write_text(json.dumps({"sample_id": "planted", "error": "x"}))
    run_filter(FilterConfig(input=str(root / "run"), output=str(root / "curated"), keep=2, per="class_label",
                            tracking=TrackingConfig(**tracking)))
    return {"run": root / "run", "curated": root / "curated"}


@pytest.fixture(scope="module")
def on_s3(folders, s3) -> dict[str, str]:
    """The same two folders uploaded to moto's S3 server, file for file."""
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    for kind, folder in folders.items():
        for path in folder.rglob("*"):
            if path.is_file():
                client.upload_file(str(path), BUCKET, f"{kind}/{path.relative_to(folder)}")
    return {kind: f"s3://{BUCKET}/{kind}" for kind in folders}


@pytest.mark.parametrize("kind", KINDS)
def test_the_folder_holds_bookkeeping_beside_the_data(folders, kind):
    """The folders hold more than data (else the reader tests below would prove nothing)."""
    names = {path.name for path in folders[kind].iterdir()}
    bookkeeping = {MANIFEST_FILE, FAILURES_DIR, RUN_FILE} if kind == "run" else {SELECTION_FILE}
    assert names == {CARD_FILE, DATA_DIR} | bookkeeping


@pytest.mark.parametrize("kind", KINDS)
def test_pyarrow(folders, kind):
    import pyarrow.parquet as pq

    table = pq.read_table(folders[kind])
    assert sorted(table.column("sample_id").to_pylist()) == committed(folders[kind])
    assert decodes(table.column("image").to_pylist())


@pytest.mark.parametrize("kind", KINDS)
def test_pandas(folders, kind):
    import pandas as pd

    frame = pd.read_parquet(folders[kind])
    assert sorted(frame["sample_id"]) == committed(folders[kind]) and decodes(frame["image"])


@pytest.mark.parametrize("kind", KINDS)
def test_duckdb(folders, kind):
    import duckdb

    rows = duckdb.sql(f"SELECT sample_id, image FROM read_parquet('{folders[kind]}')").fetchall()
    assert sorted(r[0] for r in rows) == committed(folders[kind]) and decodes(r[1] for r in rows)


@pytest.mark.parametrize("kind", KINDS)
def test_polars(folders, kind):
    import polars as pl

    frame = pl.scan_parquet(f"{folders[kind]}/**/*.parquet").collect()
    assert sorted(frame["sample_id"]) == committed(folders[kind]) and decodes(frame["image"].to_list())


@pytest.mark.parametrize("kind", KINDS)
def test_datasets(folders, kind, tmp_path):
    import datasets

    loaded = datasets.load_dataset(str(folders[kind]), split="train", cache_dir=str(tmp_path))
    assert isinstance(loaded.features["image"], datasets.Image)
    assert sorted(loaded["sample_id"]) == committed(folders[kind]) and decodes(loaded["image"])
    by_dir = datasets.load_dataset("parquet", data_dir=str(folders[kind]), split="train", cache_dir=str(tmp_path))
    assert sorted(by_dir["sample_id"]) == committed(folders[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_pandas_over_s3(folders, on_s3, s3, kind):
    import pandas as pd

    frame = pd.read_parquet(on_s3[kind], storage_options={"endpoint_url": s3.endpoint})
    assert sorted(frame["sample_id"]) == committed(folders[kind]) and decodes(frame["image"])


@pytest.mark.parametrize("kind", KINDS)
def test_datasets_over_s3(folders, on_s3, s3, kind, tmp_path):
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=f"{on_s3[kind]}/{DATA_FILES}", split="train",
                                   storage_options={"endpoint_url": s3.endpoint}, cache_dir=str(tmp_path))
    assert isinstance(loaded.features["image"], datasets.Image)
    assert sorted(loaded["sample_id"]) == committed(folders[kind]) and decodes(loaded["image"])


@pytest.mark.parametrize("kind", KINDS)
def test_the_card_says_what_the_folder_holds(folders, kind):
    text = (folders[kind] / CARD_FILE).read_text()
    card = yaml.safe_load(text)
    assert card["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}]
    rows = len(committed(folders[kind]))
    assert f"# {rows} rows; model: pixel-unet ({rows}); encoder: {ENCODER_NAME} ({rows}); method: jepa ({rows})" in text
    assert ("12 of 12 planned samples committed, 0 failed" if kind == "run" else "6 of 12 rows") in text


def readme_snippets() -> list[str]:
    """The fenced python blocks of the README's "Read the data" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Read the data\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def substituted(code: str, placeholder: str, value: str) -> str:
    """The snippet with its one placeholder string replaced (it must be there exactly once)."""
    assert code.count(f'"{placeholder}"') == 1, f"the README snippet no longer says {placeholder!r}"
    return code.replace(f'"{placeholder}"', repr(value))


@pytest.mark.parametrize("kind", KINDS)
def test_the_readme_snippets_run_as_written(folders, on_s3, s3, kind):
    local, remote = readme_snippets()
    ids = committed(folders[kind])
    names: dict = {}
    exec(substituted(local, "outputs/digits", str(folders[kind])), names)
    assert sorted(names["table"].column("sample_id").to_pylist()) == ids
    assert sorted(names["frame"]["sample_id"]) == ids and names["counted"] == len(ids)
    assert sorted(names["lazy"].collect()["sample_id"]) == ids and sorted(names["dataset"]["sample_id"]) == ids
    assert names["image"].size == (8, 8)
    names = {}
    code = substituted(remote, "s3://jepa-minority-data/rare-digits/versions/2026-11-28/rarest", on_s3[kind])
    exec(substituted(code, "http://127.0.0.1:9000", s3.endpoint), names)
    assert sorted(names["frame"]["sample_id"]) == ids and sorted(names["dataset"]["sample_id"]) == ids


def test_a_run_lays_its_files_in_buckets_and_a_curated_set_directly_in_data(folders):
    run, curated = folders["run"] / DATA_DIR, folders["curated"] / DATA_DIR
    assert [p.name for p in run.iterdir()] == [bucket_of(0)]  # 12 samples: the first bucket's
    assert all(p.parent == run / bucket_of(0) for p in run.rglob("*.parquet"))
    assert all(p.is_file() for p in curated.iterdir())  # no sample index, no bucket


def test_a_run_in_the_flat_layout_before_buckets_is_read_and_resumed(folders, tmp_path, capsys):
    """The reader-compatibility note (RELIABILITY.md): a run whose data files lie directly in data/, as the
    layout before buckets wrote them, is read by the readers and its card, and resumed from its footers."""
    import datasets
    import pyarrow.parquet as pq

    flat = tmp_path / "flat"
    shutil.copytree(folders["run"], flat)
    files = [file.rename(flat / DATA_DIR / file.name) for file in sorted((flat / DATA_DIR).rglob("*.parquet"))]
    (flat / DATA_DIR / bucket_of(0)).rmdir()
    ids = committed(folders["run"])
    assert sorted(pq.read_table(flat).column("sample_id").to_pylist()) == ids
    assert sorted(datasets.load_dataset(str(flat), split="train", cache_dir=str(tmp_path))["sample_id"]) == ids
    lost = pq.read_metadata(files[0]).num_rows
    files[0].unlink()
    (flat / RUN_FILE).unlink()
    config = yaml.safe_load((folders["run"].parent / "config.yaml").read_text())
    config["output"]["uri"] = str(flat)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert generate_job.main([str(tmp_path / "config.yaml"), "--dry-run"]) == 0
    assert capsys.readouterr().out == f"dry run: 12 samples planned into {flat}, {12 - lost} already committed: resumes\n"


@pytest.mark.parametrize("old", OLD_LAYOUT)
def test_a_run_in_the_old_layout_is_refused_in_one_line(folders, tmp_path, capsys, old):
    config = yaml.safe_load((folders["run"].parent / "config.yaml").read_text())
    config["output"]["uri"] = str(tmp_path / "old")
    (tmp_path / "old").mkdir()
    if "." in old:
        (tmp_path / "old" / old).write_bytes(b"")
    else:
        (tmp_path / "old" / old).mkdir()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert generate_job.main([str(tmp_path / "config.yaml")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"{tmp_path / 'old'} was written in the old layout ({old})" in error
    assert "choose a new output folder" in error
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [old]  # nothing written beside it


def test_a_curated_set_in_the_old_layout_is_refused_in_one_line(folders, tmp_path, capsys):
    (tmp_path / "cur" / "data").mkdir(parents=True)
    (tmp_path / "cur" / "selection.json").write_text("{}")
    args = ["--input", str(folders["run"]), "--output", str(tmp_path / "cur"), "--keep", "1",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    assert filter_job.main(args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "was written in the old layout (selection.json)" in error
    with pytest.raises(StorageError, match="old layout"):
        run_filter(FilterConfig(input=str(folders["run"]), output=str(tmp_path / "cur"), keep=1))
    assert not (tmp_path / "cur" / SELECTION_FILE).exists() and not (tmp_path / "cur" / CARD_FILE).exists()


def test_the_datasets_features_are_the_arrow_schema_with_images():
    """The features `datasets` reads from the schema's metadata describe exactly the Arrow columns, image as Image."""
    import datasets

    from pipeline.schema import OUTPUT_SCHEMA

    features = datasets.Features.from_dict(json.loads(OUTPUT_SCHEMA.metadata[b"huggingface"])["info"]["features"])
    assert features.arrow_schema.remove_metadata().equals(OUTPUT_SCHEMA.remove_metadata())
    assert isinstance(features["image"], datasets.Image)
    assert features["jepa_score"] == datasets.Value("float64")
    assert features["embedding"].feature == datasets.Value("float32")
