"""The filter stage: rarest rows by (score, id), per group, with broken rows counted and never kept."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from PIL import Image

from jobs import filter as filter_job
from pipeline.curate.config import FilterConfig
from pipeline.curate.filter import claim_folder, run_filter
from pipeline.curate.selection import rarest_by_group
from pipeline.schema import CURATION_FILE, DATA_FILE_PREFIX, FAILURES_DIR, OUTPUT_SCHEMA, SELECTION_FILE
from pipeline.storage import StorageConfig, StorageError, resolve


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def fake_generation(folder, scores, labels=None, prompts=None, failures=0, files=3, methods=None, topk=None,
                    images=None, embeddings=None):
    """A completed generation output in the real schema, with the given scores (and each row's method and PNG)."""
    now = datetime.now(timezone.utc)
    rows = [{
        "sample_id": f"id{i:03d}", "seed": i, "prompt": prompts[i] if prompts else None,
        "class_label": labels[i] if labels else None, "image": {"bytes": images[i] if images else png(i % 256), "path": f"id{i:03d}.png"},
        "width": 4, "height": 4, "jepa_score": score,
        "topk_score": topk[i] if topk else None, "embedding": embeddings[i] if embeddings else [0.0, 1.0],
        "method": methods[i] if methods else "jepa",
        "model": "pixel-unet", "encoder": "vit_small_patch14_reg4_dinov2", "run_id": "gen-run", "created_at": now,
    } for i, score in enumerate(scores)]
    (folder / "data").mkdir(parents=True)
    for part in range(files):
        pq.write_table(pa.Table.from_pylist(rows[part::files], schema=OUTPUT_SCHEMA),
                       folder / "data" / f"{DATA_FILE_PREFIX}{part}.parquet")
    (folder / FAILURES_DIR).mkdir()
    for i in range(failures):
        (folder / FAILURES_DIR / f"failed{i}.json").write_text(json.dumps({"sample_id": f"failed{i}", "error": "x"}))
    (folder / "_run.json").write_text(json.dumps({"status": "complete", "last_run_id": "gen-run"}))
    return rows


def kept_rows(folder) -> list[dict]:
    files = sorted(str(p) for p in (folder / "data").glob(f"{DATA_FILE_PREFIX}*.parquet"))
    return pads.dataset(files, format="parquet").to_table().to_pylist() if files else []


def test_keeps_the_rarest_fraction_with_ties_by_id_and_broken_rows_counted(ray_cluster, tmp_path, tracking):
    scores = [5.0, 1.0, 3.0, 1.0, float("nan"), None, 2.0, 9.0, 1.0, 4.0, float("-inf"), 7.0]
    rows = fake_generation(tmp_path / "gen", scores, failures=2)
    report = run_filter(FilterConfig(input=str(tmp_path / "gen"), output=str(tmp_path / "cur"), keep_fraction=0.5,
                                     tracking=tracking))
    # 9 finite scores -> keep floor(4.5) = 4: the three 1.0s (by id) and the 2.0
    want = ["id001", "id003", "id008", "id006"]
    kept = kept_rows(tmp_path / "cur")
    assert sorted(r["sample_id"] for r in kept) == sorted(want)
    by_id = {r["sample_id"]: r for r in rows}
    for row in kept:  # copied whole, images included
        assert row["image"] == by_id[row["sample_id"]]["image"] and row["jepa_score"] == by_id[row["sample_id"]]["jepa_score"]
    assert report["rows_in"] == 12 and report["invalid_scores"] == 3 and report["failed_in_input"] == 2
    assert report["rows_kept"] == 4 and report["threshold"] == 2.0
    assert report["kept_ids_digest"] == hashlib.sha256("\n".join(sorted(want)).encode()).hexdigest()
    on_disk = json.loads((tmp_path / "cur" / SELECTION_FILE).read_text())
    assert on_disk["kept_ids_digest"] == report["kept_ids_digest"]
    run = MlflowClient(tracking_uri=tracking.tracking_uri).get_run(report["filter_run_id"])
    assert run.data.tags["generation_run_id"] == "gen-run" and run.data.metrics["rows_kept"] == 4
    assert run.data.params["keep_fraction"] == "0.5"


def test_rows_of_the_unguided_fallback_are_counted_per_method(ray_cluster, tmp_path, tracking):
    """output.retry_unguided commits fallback rows under method unguided: _selection.json says how many."""
    scores = [5.0, 1.0, 3.0, float("nan"), 2.0, 9.0, 4.0, 0.5]
    methods = ["jepa", "unguided", "jepa", "unguided", "jepa", "jepa", "unguided", "jepa"]
    fake_generation(tmp_path / "gen", scores, methods=methods)
    report = run_filter(FilterConfig(input=str(tmp_path / "gen"), output=str(tmp_path / "cur"), keep=3,
                                     tracking=tracking))
    assert sorted(r["sample_id"] for r in kept_rows(tmp_path / "cur")) == ["id001", "id004", "id007"]
    assert report["methods"] == {"jepa": {"rows": 5, "considered": 5, "kept": 2},
                                 "unguided": {"rows": 3, "considered": 2, "kept": 1}}
    assert json.loads((tmp_path / "cur" / SELECTION_FILE).read_text())["methods"] == report["methods"]


def test_per_class_quota_and_a_score_cap(ray_cluster, tmp_path, tracking):
    labels = [0] * 6 + [1] * 4
    scores = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 40.0, 30.0, 20.0, 10.0]
    fake_generation(tmp_path / "gen", scores, labels=labels)
    report = run_filter(FilterConfig(input=str(tmp_path / "gen"), output=str(tmp_path / "cur"), keep=2,
                                     per="class_label", max_score=15.0, tracking=tracking))
    kept = kept_rows(tmp_path / "cur")
    assert sorted((r["class_label"], r["jepa_score"]) for r in kept) == [(0, 1.0), (0, 2.0), (1, 10.0)]
    assert report["groups"] == {"0": {"valid": 6, "kept": 2, "threshold": 2.0},
                                "1": {"valid": 4, "kept": 1, "threshold": 10.0}}


def test_per_prompt_and_deterministic_reruns(ray_cluster, tmp_path, tracking):
    prompts = ["a cat", "a dog"] * 5
    scores = [float(s) for s in [3, 9, 1, 8, 2, 7, 5, 6, 4, 0]]
    fake_generation(tmp_path / "gen", scores, prompts=prompts)
    config = dict(input=str(tmp_path / "gen"), keep_fraction=0.4, per="prompt", tracking=tracking)
    first = run_filter(FilterConfig(output=str(tmp_path / "a"), **config))
    second = run_filter(FilterConfig(output=str(tmp_path / "b"), **config))
    assert first["kept_ids_digest"] == second["kept_ids_digest"]
    assert sorted(r["jepa_score"] for r in kept_rows(tmp_path / "a")) == [0.0, 1.0, 2.0, 6.0]
    assert run_filter(FilterConfig(output=str(tmp_path / "a"), **config))["filter_run_id"] == first["filter_run_id"]


def test_an_interrupted_filter_starts_over_cleanly(ray_cluster, tmp_path, tracking):
    """An attempt killed after claiming its folder left its marker and a data file: the rerun removes that file."""
    fake_generation(tmp_path / "gen", [float(i) for i in range(10)])
    config = FilterConfig(input=str(tmp_path / "gen"), output=str(tmp_path / "cur"), keep=3, tracking=tracking)
    claim_folder(config, resolve(config.output, config.storage))
    stale = tmp_path / "cur" / "data"
    stale.mkdir(parents=True)
    pq.write_table(pa.table({"sample_id": ["junk"]}), stale / f"{DATA_FILE_PREFIX}stale.parquet")
    run_filter(config)
    assert sorted(r["sample_id"] for r in kept_rows(tmp_path / "cur")) == ["id000", "id001", "id002"]
    assert not (tmp_path / "cur" / CURATION_FILE).exists()  # the selection records the same input and rule


def test_a_finished_curation_is_not_taken_for_another_rule(ray_cluster, tmp_path, tracking):
    """A rerun with the same rule finds it done; another rule is refused, naming it, and the set stays as it was."""
    fake_generation(tmp_path / "gen", [float(i) for i in range(10)])
    config = dict(input=str(tmp_path / "gen"), output=str(tmp_path / "cur"), tracking=tracking)
    first = run_filter(FilterConfig(keep=3, **config))
    before = {p: p.read_bytes() for p in (tmp_path / "cur").rglob("*") if p.is_file()}
    assert run_filter(FilterConfig(keep=3, **config))["filter_run_id"] == first["filter_run_id"]
    with pytest.raises(StorageError, match=r"holds a curation made with another keep \(keep 3, here 4\)"):
        run_filter(FilterConfig(keep=4, **config))
    assert {p: p.read_bytes() for p in (tmp_path / "cur").rglob("*") if p.is_file()} == before


def test_a_run_written_before_topk_score_is_curated_by_jepa_score(ray_cluster, tmp_path, tracking):
    """Only the ranked column is needed: the copy keeps this version's columns, topk_score empty."""
    fake_generation(tmp_path / "gen", [3.0, 1.0, 2.0], files=1)
    (data,) = (tmp_path / "gen" / "data").iterdir()
    pq.write_table(pq.read_table(data).drop_columns(["topk_score"]), data)
    run_filter(FilterConfig(input=str(tmp_path / "gen"), output=str(tmp_path / "cur"), keep=2, tracking=tracking))
    kept = kept_rows(tmp_path / "cur")
    assert sorted((r["sample_id"], r["topk_score"]) for r in kept) == [("id001", None), ("id002", None)]
    assert pq.read_schema(next((tmp_path / "cur" / "data").iterdir())).names == OUTPUT_SCHEMA.names


def test_filter_on_object_storage(ray_cluster, s3, tmp_path, tracking):
    rows = fake_generation(tmp_path / "gen", [float(i) for i in range(8)], files=2)
    client = s3.client()
    client.create_bucket(Bucket="curate")
    for path in (tmp_path / "gen").rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "curate", f"gen/{path.relative_to(tmp_path / 'gen')}")
    storage = StorageConfig(endpoint_url=s3.endpoint, region="us-east-1")
    report = run_filter(FilterConfig(input="s3://curate/gen", output="s3://curate/rarest", keep=2, storage=storage,
                                     tracking=tracking))
    assert report["rows_kept"] == 2
    fs = pafs.S3FileSystem(endpoint_override=s3.endpoint.removeprefix("http://"), scheme="http",
                           access_key=s3.access_key, secret_key=s3.secret_key, region="us-east-1")
    files = [i.path for i in fs.get_file_info(pafs.FileSelector("curate/rarest/data")) if i.base_name.startswith(DATA_FILE_PREFIX)]
    kept = pads.dataset(files, filesystem=fs, format="parquet").to_table().to_pylist()
    assert sorted(r["sample_id"] for r in kept) == ["id000", "id001"]
    assert kept[0]["image"]["bytes"] == rows[int(kept[0]["sample_id"][2:])]["image"]["bytes"]


def test_cli_refuses_bad_requests(tmp_path, capsys):
    fake_generation(tmp_path / "gen", [1.0, 2.0], labels=None)
    (tmp_path / "unfinished").mkdir()
    base = ["--input", str(tmp_path / "gen"), "--output", str(tmp_path / "cur")]
    assert filter_job.main(["--input", str(tmp_path / "unfinished"), "--output", str(tmp_path / "x"), "--keep", "1"]) == 2
    assert "is not a completed generation run" in capsys.readouterr().err
    assert filter_job.main([*base, "--keep-fraction", "1.5"]) == 2
    assert "keep_fraction must be in (0, 1]" in capsys.readouterr().err
    assert filter_job.main(["--input", str(tmp_path / "gen"), "--output", str(tmp_path / "gen"), "--keep", "1"]) == 2
    assert "output must differ from input" in capsys.readouterr().err
    fake_generation(tmp_path / "all_failed", [], failures=2, files=0)
    assert filter_job.main(["--input", str(tmp_path / "all_failed"), "--output", str(tmp_path / "y"), "--keep", "1"]) == 2
    assert "holds no rows to curate" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "y" / SELECTION_FILE).exists()
    with pytest.raises(SystemExit) as stop:
        filter_job.main([*base, "--keep", "1", "--keep-fraction", "0.5"])
    assert stop.value.code == 2


def test_nothing_finite_keeps_nothing_only_when_allowed_and_reads_as_an_empty_dataset(ray_cluster, tmp_path, tracking):
    import datasets
    import pandas as pd

    fake_generation(tmp_path / "gen", [math.nan, None, math.inf])
    config = dict(input=str(tmp_path / "gen"), output=str(tmp_path / "cur"), keep_fraction=1.0, tracking=tracking)
    with pytest.raises(ValueError, match="all 0 rows with a finite score of .* would keep nothing"):
        run_filter(FilterConfig(**config))
    assert not list((tmp_path / "cur").iterdir())  # refused before its marker: nothing written
    report = run_filter(FilterConfig(allow_empty_groups=True, **config))
    assert report["rows_kept"] == 0 and report["invalid_scores"] == 3 and report["threshold"] is None
    (empty,) = (tmp_path / "cur" / "data").iterdir()  # one file, the schema and no rows
    assert pq.read_schema(empty).names == OUTPUT_SCHEMA.names
    assert pq.read_table(tmp_path / "cur").num_rows == 0 and len(pd.read_parquet(tmp_path / "cur")) == 0
    streamed = datasets.load_dataset(str(tmp_path / "cur"), split="train", streaming=True)
    assert list(streamed) == [] and isinstance(streamed.features["image"], datasets.Image)


def test_the_filter_driver_never_imports_the_models():
    """The filter's memory budget (benchmarks/bench_filter_scale.py) has no room for torch in its driver."""
    probe = "import sys, jobs.filter, pipeline.curate.filter, pipeline.tracking, pipeline.sink; " \
            "print(sorted(m for m in ('torch', 'diffusers', 'timm', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_merging_the_blocks_rarest_rows_is_choosing_from_all_rows():
    """The driver merges each block's rarest rows per group: the same rows as choosing from everything."""
    rng = np.random.default_rng(0)
    n = 3000
    scores = rng.integers(0, 50, n).astype(float)  # many ties, broken by id
    scores[rng.random(n) < 0.05] = np.nan
    rows = pa.table({"sample_id": [f"id{i:05d}" for i in rng.permutation(n)],
                     "jepa_score": pa.array(scores, mask=rng.random(n) < 0.05), "class_label": rng.integers(0, 4, n)})
    quotas, cap = {0: 1, 1: 40, 2: 400, 3: 2000}, 45.0
    merged = pa.concat_tables([rarest_by_group(rows.slice(start, 250), "class_label", quotas, cap)
                               for start in range(0, n, 250)])
    chosen = rarest_by_group(merged, "class_label", quotas, cap)
    assert chosen.to_pylist() == rarest_by_group(rows, "class_label", quotas, cap).to_pylist()
    want = []
    for label, quota in quotas.items():
        mine = [r for r in rows.to_pylist() if r["class_label"] == label and r["jepa_score"] is not None
                and math.isfinite(r["jepa_score"])]
        mine = sorted(mine, key=lambda r: (r["jepa_score"], r["sample_id"]))[:quota]
        want += [r for r in mine if r["jepa_score"] <= cap]
    assert chosen.to_pylist() == want


def in_a_fresh_process(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new Python that starts its own local Ray (no RAY_ADDRESS), as a user's job does."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


DASHBOARD = """
import json, psutil
def dashboard():
    lines = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
    return {"head": [line for line in lines if "dashboard/dashboard.py" in line],
            "modules": [line for line in lines if line.startswith("ray-dashboard-")]}
"""


def test_a_local_filter_runs_light_a_shuffle_free_plan_without_the_dashboard(tmp_path, tracking):
    """What keeps the filter at 1M rows under 2 GiB of summed RSS (benchmarks/bench_filter_scale.py):
    its local Ray has no dashboard (about ten processes), choosing needs no shuffle, and each file is
    read and filtered by id in one task, so images never pass through the object store."""
    fake_generation(tmp_path / "gen", [float(i) for i in range(12)], labels=[i % 2 for i in range(12)])
    config = (f"FilterConfig(input={str(tmp_path / 'gen')!r}, output={str(tmp_path / 'cur')!r}, keep=2, "
              f"per='class_label', tracking=TrackingConfig({tracking.tracking_uri!r}, {tracking.artifact_location!r}), "
              "verbose=True)")  # Ray Data prints its plans only when asked
    filtered = in_a_fresh_process(DASHBOARD + "from pipeline.curate.config import FilterConfig\nfrom pipeline.curate.filter import run_filter\n"
                                  "from pipeline.settings import TrackingConfig\n"
                                  f"report = run_filter({config})\n"
                                  "print(json.dumps(dashboard() | {'kept': report['rows_kept']}))")
    seen = json.loads(filtered.stdout.strip().splitlines()[-1])
    assert seen["kept"] == 4
    assert seen["head"] and all("--disable-frontend" in line for line in seen["head"]) and seen["modules"] == []
    plans = re.findall(r"Execution plan of Dataset \S+: (.+)", filtered.stderr)
    assert plans == [f"InputDataBuffer[Input] -> TaskPoolMapOperator[ReadParquet->MapBatches({step})]"
                     for step in ("tally", "rarest_by_group")] + [
        "InputDataBuffer[Input] -> TaskPoolMapOperator[ReadParquet->MapBatches(rows_with_ids)] "
        "-> TaskPoolMapOperator[Write]"]
    other = json.loads(in_a_fresh_process(DASHBOARD + "from pipeline.cluster import connect_ray\nconnect_ray()\n"
                                          "print(json.dumps(dashboard()))").stdout.strip().splitlines()[-1])
    assert other["head"] and not any("--disable-frontend" in line for line in other["head"])  # other jobs keep it


def noise_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def grey_folder(folder, values) -> None:
    """Real images: uniform greys (8 x 8), so a generated grey of the same value lies at distance 0."""
    folder.mkdir()
    for value in values:
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(folder / f"grey{value:03d}.png")


def gated_generation(folder) -> None:
    """8 greys on the reference (scores 5..12, classes 0 and 1 alternating) and 5 noise images far from it with the
    lowest scores (one of them without a finite score): 3 in class 0, 2 in class 1."""
    scores = [float(s) for s in range(5, 13)] + [0.0, 1.0, 2.0, 3.0, float("nan")]
    labels = [0, 1] * 4 + [0, 0, 0, 1, 1]
    images = [png(10 + i) for i in range(8)] + [noise_png(i) for i in range(5)]
    fake_generation(folder, scores, labels=labels, images=images)


def test_the_gate_keeps_none_of_the_far_rows_and_counts_them_per_group(ray_cluster, tmp_path, tracking, capsys):
    """Without the gate the noise (the lowest scores) is kept; with it none is, and the quotas count only the rows
    that passed: floor(0.5 x 4) = 2 per class instead of floor(0.5 x 7) = 3 and floor(0.5 x 5) = 2."""
    gated_generation(tmp_path / "gen")
    grey_folder(tmp_path / "real", range(0, 41))
    rule = dict(input=str(tmp_path / "gen"), keep_fraction=0.5, per="class_label", tracking=tracking)
    plain = run_filter(FilterConfig(output=str(tmp_path / "plain"), **rule))
    assert sorted(r["sample_id"] for r in kept_rows(tmp_path / "plain")) == ["id001", "id008", "id009", "id010", "id011"]
    assert plain["gate"] is None and plain["rule"]["gate"] is None
    args = ["--input", str(tmp_path / "gen"), "--output", str(tmp_path / "gated"), "--keep-fraction", "0.5",
            "--per", "class_label", "--gate-reference", str(tmp_path / "real"), "--gate-k", "5",
            "--tracking-uri", tracking.tracking_uri, "--experiment", tracking.experiment]
    assert filter_job.main(args) == 0
    assert sorted(r["sample_id"] for r in kept_rows(tmp_path / "gated")) == ["id000", "id001", "id002", "id003"]
    report = json.loads((tmp_path / "gated" / SELECTION_FILE).read_text())
    assert report["gate"] == {"reference": str(tmp_path / "real"), "space": "pixels-16-grey", "k": 5, "dropped": 4,
                              "groups": {"0": 3, "1": 1}}
    assert report["invalid_scores"] == 1 and report["rows_kept"] == 4
    assert report["groups"] == {"0": {"valid": 4, "kept": 2, "threshold": 7.0}, "1": {"valid": 4, "kept": 2, "threshold": 8.0}}
    assert "gate:      dropped 4 rows outside every 5-NN ball" in capsys.readouterr().out
    run = MlflowClient(tracking_uri=tracking.tracking_uri).get_run(report["filter_run_id"])
    assert run.data.metrics["gate_dropped"] == 4 and run.data.params["gate_space"] == "pixels-16-grey"


def test_the_gate_reads_a_generated_run_as_its_reference(ray_cluster, tmp_path, tracking):
    """A generated-schema run as the reference (its data/*.parquet images); the balls shrink with k: at k 1 the
    greys 0, 2, 4, ... have radius 2 and the odd greys between them pass, the even ones too (distance 0)."""
    gated_generation(tmp_path / "gen")
    fake_generation(tmp_path / "real", [0.0] * 21, images=[png(2 * i) for i in range(21)])
    report = run_filter(FilterConfig(input=str(tmp_path / "gen"), output=str(tmp_path / "cur"), keep=3,
                                     gate_reference=str(tmp_path / "real"), gate_k=1, tracking=tracking))
    assert sorted(r["sample_id"] for r in kept_rows(tmp_path / "cur")) == ["id000", "id001", "id002"]
    assert report["gate"]["dropped"] == 4 and report["gate"]["groups"] == {}


def test_a_bad_gate_reference_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    """Missing, empty, unreadable, too small for k, or measured in a space the gate lacks: one line, exit 2,
    nothing written, Ray never reached."""
    import pipeline.curate.filter as filter_module

    monkeypatch.setattr(filter_module, "connect_ray", lambda **_: pytest.fail("Ray started"))
    gated_generation(tmp_path / "gen")
    (tmp_path / "empty").mkdir()
    grey_folder(tmp_path / "broken", range(10))
    (tmp_path / "broken" / "grey999.png").write_bytes(b"not a png")
    grey_folder(tmp_path / "few", range(5))
    grey_folder(tmp_path / "real", range(10))
    cases = {
        tmp_path / "missing": ("--gate-reference", str(tmp_path / "missing")),
        tmp_path / "empty": ("--gate-reference", str(tmp_path / "empty")),
        tmp_path / "broken": ("--gate-reference", str(tmp_path / "broken")),
        tmp_path / "few": ("--gate-reference", str(tmp_path / "few")),
        "space": ("--gate-reference", str(tmp_path / "real"), "--gate-space", "inception"),
    }
    lines = []
    for extra in cases.values():
        for dry in ([], ["--dry-run"]):
            args = ["--input", str(tmp_path / "gen"), "--output", str(tmp_path / "cur"), "--keep", "2", *extra, *dry,
                    "--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db"]
            assert filter_job.main(args) == 2
            (line,) = capsys.readouterr().err.strip().splitlines()
            lines.append(line)
    assert lines[0] == f"jepa-minority filter: gate reference {tmp_path / 'missing'} not found: give a folder of real images or a generated run"
    assert f"gate reference {tmp_path / 'empty'} holds no Parquet files and no" in lines[2]
    assert f"gate reference image {tmp_path / 'broken' / 'grey999.png'} cannot be decoded" in lines[4]
    assert f"gate reference {tmp_path / 'few'} holds 5 images: k-NN balls with --gate-k 5 need more than 5" in lines[6]
    assert "the gate measures in pixel spaces only, got 'inception'" in lines[8]
    assert lines[0::2] == lines[1::2]  # the dry run refuses the same
    assert not (tmp_path / "cur").exists() and not (tmp_path / "mlruns").exists()


def colour_png(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), rgb, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class Warnings(logging.Handler):
    """The warning lines of one logger (pytest's own capture handler is silenced with Ray Data's console)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_near_duplicates_go_the_rarest_of_each_stays_and_the_balance_is_reported(ray_cluster, tmp_path, tracking,
                                                                                     capsys):
    """Embeddings (in score order): id000-id002 near-copies, id004-id005 too, the rest apart. Plain top-4 keeps
    id000-id003, all class 0, and warns; with --dedup-threshold 0.99 the copies go and class 0 holds half."""
    direction = [0, 0, 0, 1, 2, 2, 3, 4, 5, 6, 7, 8]
    embeddings = [(np.eye(16)[d] + 1e-3 * np.eye(16)[15] * i).tolist() for i, d in enumerate(direction)]
    labels = [0, 0, 0, 0, 1, 1, 2, 0, 1, 2, 1, 2]
    fake_generation(tmp_path / "gen", [float(i) for i in range(12)], labels=labels, embeddings=embeddings)
    base = ["--input", str(tmp_path / "gen"), "--keep", "4", "--balance-by", "class_label",
            "--tracking-uri", tracking.tracking_uri, "--experiment", tracking.experiment]
    plain, dedup, logger = Warnings(), Warnings(), logging.getLogger("pipeline.curate.filter")
    for handler, output, flags in ((plain, "plain", []), (dedup, "dedup", ["--dedup-threshold", "0.99"])):
        logger.addHandler(handler)
        try:
            assert filter_job.main([*base, "--output", str(tmp_path / output), *flags]) == 0
        finally:
            logger.removeHandler(handler)
    assert sorted(r["sample_id"] for r in kept_rows(tmp_path / "plain")) == ["id000", "id001", "id002", "id003"]
    assert plain.lines == ["class_label 0 holds 100% of the kept rows (4 of 4), more than --dominant-share 0.5: curate "
                           "--per class_label to give each its quota"]
    assert sorted(r["sample_id"] for r in kept_rows(tmp_path / "dedup")) == ["id000", "id003", "id004", "id006"]
    assert dedup.lines == []
    report = json.loads((tmp_path / "dedup" / SELECTION_FILE).read_text())
    assert report["dedup"] == {"threshold": 0.99, "search": "approximate", "space": "embedding", "removed": 3,
                               "groups": {}}
    assert report["rule"]["candidates"] == {"multiple": 4, "space": "embedding"}
    assert report["rule"]["select"] == "rarest"
    assert report["balance"] == {"by": "class_label", "dominant_share": 0.5, "dominant": [], "groups": {
        "0": {"candidates": 5, "kept": 2, "share": 0.5}, "1": {"candidates": 4, "kept": 1, "share": 0.25},
        "2": {"candidates": 3, "kept": 1, "share": 0.25}}}
    assert "dedup:     removed 3 near-duplicates (cosine >= 0.99 in embedding" in capsys.readouterr().out
    assert MlflowClient(tracking_uri=tracking.tracking_uri).get_run(report["filter_run_id"]).data.metrics[
        "dedup_removed"] == 3


def test_diverse_rarest_covers_each_class_in_a_pixel_space(ray_cluster, tmp_path, tracking):
    """Per class, in score order: class 0 red, red, red, blue; class 1 green, green, yellow, green. The rarest two
    are one colour; k-center in pixels-2 takes the rarest and then the colour farthest from it."""
    colours = [(200, 0, 0), (0, 200, 0), (201, 0, 0), (0, 201, 0), (202, 0, 0), (200, 200, 0), (0, 0, 200), (0, 202, 0)]
    fake_generation(tmp_path / "gen", [float(i) for i in range(8)], labels=[0, 1] * 4,
                    images=[colour_png(c) for c in colours])
    report = run_filter(FilterConfig(input=str(tmp_path / "gen"), output=str(tmp_path / "cur"), keep=2,
                                     per="class_label", select="diverse-rarest", candidates=3,
                                     similarity_space="pixels-2", tracking=tracking))
    assert sorted(r["sample_id"] for r in kept_rows(tmp_path / "cur")) == ["id000", "id001", "id005", "id006"]
    assert report["rule"]["candidates"] == {"multiple": 3, "space": "pixels-2"} and report["dedup"] is None
    assert report["groups"] == {"0": {"valid": 4, "kept": 2, "threshold": 6.0},
                                "1": {"valid": 4, "kept": 2, "threshold": 5.0}}
    assert report["balance"]["groups"]["0"] == {"candidates": 4, "kept": 2, "share": 0.5}


def test_bad_dedup_and_selection_flags_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    import pipeline.curate.filter as filter_module

    monkeypatch.setattr(filter_module, "connect_ray", lambda **_: pytest.fail("Ray started"))
    fake_generation(tmp_path / "gen", [1.0, 2.0])
    base = ["--input", str(tmp_path / "gen"), "--output", str(tmp_path / "cur"), "--keep", "1"]
    cases = {("--dedup-threshold", "1.5"): "dedup_threshold is a cosine similarity in (0, 1] (e.g. 0.95), got 1.5",
             ("--candidates", "0"): "candidates must be >= 1 (a multiple of each group's quota), got 0",
             ("--similarity-space", "clip"): "similarity_space must be embedding or a pixel space",
             ("--dominant-share", "0"): "dominant_share must be in (0, 1], got 0.0"}
    for flags, message in cases.items():
        assert filter_job.main([*base, *flags]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert message in line
    assert not (tmp_path / "cur").exists()
