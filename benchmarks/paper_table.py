"""One table like the paper's, from the benchmark JSON: the demo's methods and the SD family's costs.

The demo (unguided, boost-and-skip, SGMS, JEPA at the demo's default): the minority test against
unguided, precision / recall, class accuracy, mean JEPA-SCORE and seconds per sample from
demo_evidence.json; accuracy on the held-out minority slice of a classifier trained with the arm's
samples added (the largest volume) from downstream.json. The tiny and mid-size SD (DDIM, MinorityPrompt,
JEPA): seconds per sample, time ratio to DDIM and peak memory from sd_methods_cpu.json; at SD 1.5
size on one H200 (unguided, JEPA, SGMS, MinorityPrompt, every step guided): images/s, seconds per
image-step, time ratio to unguided and peak GPU memory at the largest batch from gpu_h200.json. Random
weights, so costs only. Each column names its source JSON; a number a file does not hold shows as
"—", never filled in.

Run from the repository root: ``python -m benchmarks.paper_table``; writes
benchmarks/results/paper_table.md and prints it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from benchmarks.paths import RESULTS

MISSING = "—"
SOURCES = {"E": "demo_evidence.json", "D": "downstream.json", "S": "sd_methods_cpu.json", "H": "gpu_h200.json"}
# method -> which demo_evidence / downstream arm stands for it (controls and the kept rarest are other rows)
DEMO_ARMS: dict[str, Callable[[str], bool]] = {
    "unguided": lambda name: name == "unguided",
    "BnS": lambda name: name == "boost-and-skip",
    "SGMS": lambda name: name.startswith("SGMS") and ":" not in name,
    "JEPA": lambda name: name.startswith("JEPA eta") and name.endswith("(demo default)"),
}
SD_METHODS = ("DDIM (unguided)", "MinorityPrompt", "JEPA")
# table row -> gpu_h200.json's sampling method
H200_METHODS = {"DDIM (unguided)": "unguided", "JEPA": "jepa q=2", "JEPA, warm start q=0": "jepa warm q=0",
                "SGMS": "sgms", "MinorityPrompt": "minority-prompt"}


def read(folder: Path, key: str) -> dict | None:
    """The source's JSON, or None when the file is absent; a file that is not JSON stops with one line."""
    path = folder / SOURCES[key]
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path}: not JSON ({error}); regenerate it with the command docs/results.md gives")


def figure(record: dict | None, *keys: str, fmt: str = "{:.2f}") -> str:
    """``record[keys[0]][keys[1]]...`` formatted, or "—" where any level is missing or null."""
    for key in keys:
        if not isinstance(record, dict) or record.get(key) is None:
            return MISSING
        record = record[key]
    return fmt.format(record)


def find(rows: list[dict], field: str, method: str) -> dict | None:
    """The first row whose ``field`` names ``method``'s arm, or None."""
    return next((row for row in rows if DEMO_ARMS[method](row.get(field, ""))), None)


def minority_slice(downstream: dict | None, method: str) -> str:
    """Mean accuracy on the minority slice [interval], at the arm's largest added volume."""
    rows = [row for row in (downstream or {}).get("rows", []) if DEMO_ARMS[method](row.get("arm", ""))]
    if not rows:
        return MISSING
    row = max(rows, key=lambda r: r.get("samples", 0))
    accuracy = row.get("minority", {}).get("accuracy")
    if accuracy is None:
        return MISSING
    return f"{accuracy['mean']:.3f} [{accuracy['low']:.3f}, {accuracy['high']:.3f}] (+{row['samples']})"


def demo_table(evidence: dict | None, downstream: dict | None) -> list[str]:
    head = ("method", "arm (E)", "minority test (E)", "FD to minority ↓ (E)", "precision (E)", "recall (E)",
            "class accuracy (E)", "mean JEPA-SCORE (E)", "s / sample (E)", "minority-slice accuracy ↑ (D)")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method in DEMO_ARMS:
        arm = find((evidence or {}).get("arms", []), "name", method)
        cells = (method, MISSING if arm is None else arm["name"], figure(arm, "minority", "verdict", fmt="{}"),
                 figure(arm, "minority", "fd_minority"), figure(arm, "precision"), figure(arm, "recall"),
                 figure(arm, "class_accuracy"), figure(arm, "jepa_score", fmt="{:.1f}"),
                 figure(arm, "seconds_per_sample", fmt="{:.3f}"), minority_slice(downstream, method))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def sd_table(sd: dict | None) -> list[str]:
    head = ("model", "method", "s / sample (S)", "time vs DDIM (S)", "peak RSS, MiB (S)")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for family in ("tiny sd", "mid-size sd"):
        rows = (sd or {}).get("families", {}).get(family, {}).get("rows", {})
        for method in SD_METHODS:
            row = rows.get(method)
            cells = (family, method, figure(row, "seconds_per_sample", fmt="{:.3f}"),
                     figure(row, "time_ratio", fmt="{:.2f}x"), figure(row, "peak_rss_mib", fmt="{:.0f}"))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def h200_table(gpu: dict | None) -> list[str]:
    head = ("method", "batch (H)", "images / s (H)", "s / image-step (H)", "time vs DDIM (H)", "peak GPU memory, GiB (H)")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    rows = [row for row in (gpu or {}).get("sampling", []) if isinstance(row, dict) and row.get("dtype") == "bfloat16"]
    batch = max((row["batch"] for row in rows), default=None)
    at_batch = {row["method"]: row for row in rows if row["batch"] == batch}
    unguided = at_batch.get("unguided")
    for method, name in H200_METHODS.items():
        row = at_batch.get(name)
        ratio = (MISSING if row is None or unguided is None
                 else f"{unguided['images_per_s'] / row['images_per_s']:.2f}x")
        cells = (method, MISSING if row is None else str(batch), figure(row, "images_per_s", fmt="{:.3f}"),
                 figure(row, "s_per_image_step", fmt="{:.4f}"), ratio, figure(row, "peak_memory_gib", fmt="{:.1f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def build(folder: Path) -> str:
    """The two tables in markdown, each column's source named under them."""
    data = {key: read(folder, key) for key in SOURCES}
    legend = [f"- ({key}) benchmarks/results/{name}" + ("" if data[key] is not None else ": absent, its cells show —")
              for key, name in SOURCES.items()]
    return "\n".join([
        "## The demo: minority samplers on the digits", "", *demo_table(data["E"], data["D"]), "",
        "## Stable Diffusion family on CPU: cost per sample (random weights, so times and memory only)", "",
        *sd_table(data["S"]), "",
        "## SD 1.5 size on one H200: cost per sample (bf16, CFG 7.5, every step guided; random weights, so times "
        "and memory only)", "", *h200_table(data["H"]), "", "Sources:", *legend, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of the benchmark JSON")
    parser.add_argument("--output", type=Path, default=RESULTS / "paper_table.md", help="the markdown written")
    args = parser.parse_args()
    if not args.results.is_dir():
        raise SystemExit(f"--results {args.results}: no such folder; pass the folder of the benchmark JSON")
    table = build(args.results)
    args.output.write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
