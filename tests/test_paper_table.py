"""The paper table puts each JSON's numbers in their cells and "—" where a file holds none."""

from __future__ import annotations

import json

import pytest

from benchmarks.paper_table import build


def cells(table: str, first: str, second: str | None = None) -> dict[str, str]:
    """The row whose first cell (and second, when given) match, keyed by the header above it."""
    head = None
    for line in table.splitlines():
        if not line.startswith("| "):
            continue
        row = [cell.strip() for cell in line.strip("|").split("|")]
        if row[0] in ("method", "model"):
            head = row
        elif row[0] == first and (second is None or row[1] == second):
            return dict(zip(head, row))
    raise AssertionError(f"no row {first} {second} in\n{table}")


@pytest.fixture
def results(tmp_path):
    arm = dict(precision=0.81, recall=0.72, class_accuracy=0.93, jepa_score=-401.25, seconds_per_sample=0.125)
    evidence = {"arms": [
        {"name": "unguided", **arm, "minority": {"verdict": "baseline", "fd_minority": 3.5}},
        {"name": "JEPA eta 0.275 (demo default): reversed", **arm, "precision": 0.11},
        {"name": "JEPA eta 0.275 (demo default)", **arm, "recall": 0.44,
         "minority": {"verdict": "minority", "fd_minority": 2.25}},
        {"name": "rarest 25% of JEPA eta 0.275 (demo default)", **arm, "recall": 0.01},
        {"name": "boost-and-skip", **arm, "precision": None},
    ]}
    accuracy = {"mean": 0.9, "low": 0.85, "high": 0.95}
    downstream = {"rows": [
        {"arm": "SGMS (pixels), strength 0.4", "samples": 12, "minority": {"accuracy": accuracy}},
        {"arm": "SGMS (pixels), strength 0.4", "samples": 20,
         "minority": {"accuracy": {"mean": 0.925, "low": 0.9, "high": 0.95}}},
    ]}
    sd = {"families": {"mid-size sd": {"rows": {
        "MinorityPrompt": {"seconds_per_sample": 12.5, "time_ratio": 2.5, "peak_rss_mib": 2048.4}}}}}
    sampling = [dict(dtype="bfloat16", batch=batch, method=method, images_per_s=rate, s_per_image_step=0.5 / rate,
                     peak_memory_gib=2.0 * batch) for batch in (1, 8) for method, rate in (("unguided", 8.0 * batch),
                                                                                            ("sgms", 2.0 * batch))]
    gpu = {"sampling": sampling + [dict(sampling[-1], dtype="float32", batch=16)]}
    for name, record in (("demo_evidence", evidence), ("downstream", downstream), ("sd_methods_cpu", sd),
                         ("gpu_h200", gpu)):
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    return tmp_path


def test_numbers_land_in_their_cells(results):
    table = build(results)
    jepa = cells(table, "JEPA")
    assert jepa["arm (E)"] == "JEPA eta 0.275 (demo default)"  # not its control, not the kept rarest
    assert (jepa["minority test (E)"], jepa["FD to minority ↓ (E)"]) == ("minority", "2.25")
    assert (jepa["precision (E)"], jepa["recall (E)"], jepa["class accuracy (E)"]) == ("0.81", "0.44", "0.93")
    assert (jepa["mean JEPA-SCORE (E)"], jepa["s / sample (E)"]) == ("-401.2", "0.125")
    sgms = cells(table, "SGMS")
    assert sgms["minority-slice accuracy ↑ (D)"] == "0.925 [0.900, 0.950] (+20)"  # the largest volume
    mid = cells(table, "mid-size sd", "MinorityPrompt")
    assert (mid["s / sample (S)"], mid["time vs DDIM (S)"], mid["peak RSS, MiB (S)"]) == ("12.500", "2.50x", "2048")
    sgms = cells(table, "SGMS", "8")  # the H200 table: the largest bf16 batch, not the float32 row
    assert (sgms["images / s (H)"], sgms["s / image-step (H)"], sgms["time vs DDIM (H)"]) == ("16.000", "0.0312", "4.00x")
    assert sgms["peak GPU memory, GiB (H)"] == "16.0"


def test_missing_numbers_show_a_dash(results):
    (results / "downstream.json").unlink()
    table = build(results)
    assert cells(table, "BnS")["precision (E)"] == "—"  # null in the JSON
    assert cells(table, "BnS")["minority test (E)"] == "—"  # no minority test recorded
    assert set(cells(table, "SGMS").values()) == {"SGMS", "—"}  # no arm, no downstream file
    assert cells(table, "tiny sd", "JEPA")["s / sample (S)"] == "—"
    assert "downstream.json: absent" in table
    assert cells(table, "MinorityPrompt", "—")["images / s (H)"] == "—"  # no such row in gpu_h200.json
