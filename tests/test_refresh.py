"""Scheduled refresh: versions generated and curated, LATEST.json published only when complete,
reruns doing no work, old versions pruned but never the published one."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from jobs import refresh as refresh_job
from pipeline.generate import preflight
from pipeline.curate.config import RefreshConfig
from pipeline.curate.refresh import run_refresh
from pipeline.generate.work import Manifest
from pipeline.schema import MANIFEST_FILE, SELECTION_FILE
from pipeline.storage import StorageError
from tests.test_generation import read_rows


def count_preflights(monkeypatch) -> list[str]:
    """The output URI of every generation preflight from now on (each builds its manifest once)."""
    outputs, build = [], preflight.build_manifest

    def counted(config):
        outputs.append(config.output.uri)
        return build(config)

    monkeypatch.setattr(preflight, "build_manifest", counted)
    return outputs


def version_run(root, version: str) -> tuple[list[dict], dict[str, int]]:
    """A version's manifest rows, and the seed of each committed row by sample_id."""
    generated = root / "versions" / version / "generated"
    manifest = Manifest.read(feather.read_table(generated / MANIFEST_FILE)).table.to_pylist()
    rows = read_rows(pafs.LocalFileSystem(), str(generated / "data"))
    return manifest, {row["sample_id"]: row["seed"] for row in rows}


def test_versions_publish_resume_and_prune(ray_cluster, write_config, tmp_path, monkeypatch):
    config = write_config(work={"class_labels": [1, 2], "samples_per_label": 2})
    root = tmp_path / "dataset"
    preflights = count_preflights(monkeypatch)
    first = run_refresh(RefreshConfig(config=config, root=str(root), version="2026-11-01", keep_versions=1,
                                      keep_fraction=0.5))
    assert first.published and first.generated == 4
    assert preflights == [f"{root}/versions/2026-11-01/generated"]  # once: run_generation runs the refresh's plan
    latest = json.loads((root / "LATEST.json").read_text())
    assert latest["version"] == "2026-11-01" and latest["rows_kept"] == 2
    assert (root / "versions" / "2026-11-01" / "rarest" / SELECTION_FILE).exists()
    first_manifest, first_rows = version_run(root, "2026-11-01")

    again = run_refresh(RefreshConfig(config=config, root=str(root), version="2026-11-01", keep_versions=1,
                                      keep_fraction=0.5))
    assert again.published and again.generated == 0 and again.deleted_versions == ()
    assert version_run(root, "2026-11-01") == (first_manifest, first_rows)  # a rerun resumes the same draws
    with pytest.raises(StorageError, match=r"rarest holds a curation made with another keep_fraction "
                                           r"\(keep_fraction 0.5, here 0.25\); choose another --version or --root"):
        run_refresh(RefreshConfig(config=config, root=str(root), version="2026-11-01", keep_fraction=0.25))
    (root / "versions" / "0000-notes").mkdir()  # sorts oldest, but no refresh wrote it: never pruned
    (root / "versions" / "0000-notes" / "mine.txt").write_text("mine")

    second = run_refresh(RefreshConfig(config=config, root=str(root), version="2026-11-02", keep_versions=1,
                                       keep_fraction=0.5))
    assert second.deleted_versions == ("2026-11-01",)
    assert json.loads((root / "LATEST.json").read_text())["version"] == "2026-11-02"
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["0000-notes", "2026-11-02"]
    second_manifest, second_rows = version_run(root, "2026-11-02")

    # Each version draws its own seeds for the same work: the rows line up label by label, while no
    # seed or id is shared, and every committed row carries its own version's manifest seed.
    for manifest, rows in ((first_manifest, first_rows), (second_manifest, second_rows)):
        assert [m["class_label"] for m in manifest] == [1, 1, 2, 2] and {m["prompt"] for m in manifest} == {None}
        assert len({m["seed"] for m in manifest}) == 4
        assert rows == {m["sample_id"]: m["seed"] for m in manifest}
    assert not {m["seed"] for m in first_manifest} & {m["seed"] for m in second_manifest}
    assert not {m["sample_id"] for m in first_manifest} & {m["sample_id"] for m in second_manifest}


def test_rerunning_an_older_version_keeps_latest_on_the_newest(ray_cluster, write_config, tmp_path):
    config = write_config(work={"class_labels": [1], "samples_per_label": 2})
    root = tmp_path / "dataset"
    for version in ("2026-11-01", "2026-11-02"):
        assert run_refresh(RefreshConfig(config=config, root=str(root), version=version, keep_versions=2,
                                         keep_fraction=0.5)).published
    older = run_refresh(RefreshConfig(config=config, root=str(root), version="2026-11-01", keep_versions=2,
                                      keep_fraction=0.5))
    assert json.loads((root / "LATEST.json").read_text())["version"] == "2026-11-02"
    assert older.complete and not older.published and older.generated == 0 and older.deleted_versions == ()


def test_an_incomplete_version_is_not_published_and_latest_survives_pruning(ray_cluster, write_config,
                                                                           nan_class_unet, tmp_path):
    good = write_config(work={"class_labels": [1], "samples_per_label": 2})
    root = tmp_path / "dataset"
    half = ["--keep-versions", "1", "--keep-fraction", "0.5"]
    assert refresh_job.main([good, "--root", str(root), "--version", "v1", *half]) == 0
    bad = write_config(model={"source": str(nan_class_unet)},  # class 9 samples fail
                       work={"class_labels": [1, 9], "samples_per_label": 1})
    assert refresh_job.main([bad, "--root", str(root), "--version", "v2", *half]) == 1
    assert json.loads((root / "LATEST.json").read_text())["version"] == "v1"
    assert (root / "versions" / "v1" / "generated" / "_run.json").exists()
    assert not (root / "versions" / "v2" / "rarest").exists()


def test_an_empty_version_never_replaces_a_latest_that_kept_rows(ray_cluster, write_config, tmp_path, capsys):
    """Allowed to keep nothing (2 samples at 0.1), v2 completes, readable and empty; LATEST stays on v1."""
    config = write_config(work={"class_labels": [1], "samples_per_label": 2})
    root = tmp_path / "dataset"
    assert refresh_job.main([config, "--root", str(root), "--version", "v1", "--keep-fraction", "0.5"]) == 0
    assert refresh_job.main([config, "--root", str(root), "--version", "v2", "--allow-empty-groups",
                             "--keep-versions", "1"]) == 0
    assert "version v2: complete but kept no rows; LATEST stays as it was" in capsys.readouterr().out
    latest = json.loads((root / "LATEST.json").read_text())
    assert latest["version"] == "v1" and latest["rows_kept"] == 1
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v1", "v2"]  # LATEST's version is kept
    assert json.loads((root / "versions" / "v2" / "rarest" / SELECTION_FILE).read_text())["rows_kept"] == 0
    assert pq.read_table(root / "versions" / "v2" / "rarest").num_rows == 0


@pytest.mark.parametrize("version", ["", "../x", "a/b"])
def test_bad_version_names_are_refused(version):
    with pytest.raises(ValueError, match="must be a plain folder name"):
        RefreshConfig(config="c.yaml", root="/tmp/r", version=version)
