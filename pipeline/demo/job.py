"""The demo: the main job end to end on the embedded default, and a visual report of what it did.

Generates every requested class twice at the same seeds (unguided, then JEPA-guided) on local Ray
into local Parquet, keeps the rarest guided samples per class, logs everything to the local MLflow
store, and writes ``report/index.html``: guided vs unguided contact sheets, the rarest kept, both
JEPA-SCORE distributions and, when the caller measures it, each arm's rarity in the data.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.curate.config import FilterConfig
from pipeline.curate.filter import check_groups, check_target, run_filter
from pipeline.folders import check_holds_no_run, check_only
from pipeline.demo import DEMO_CONFIG
from pipeline.generate.config import GenerateConfig, load_config
from pipeline.generate.job import GenerationSummary, run_generation
from pipeline.generate.preflight import OtherRunError, Plan, preflight_generation
from pipeline.provenance import package_versions
from pipeline.report import contact_sheet, overlaid_histograms
from pipeline.rows import read_committed
from pipeline.settings import ui_command
from pipeline.storage import StorageConfig, StorageError, commit, resolve

log = logging.getLogger(__name__)
SHEET_COLUMNS = 8
REPORT_DIR = "report"
REPORT_PAGE = "index.html"  # written last, after the pictures it shows
FOLDERS = ("unguided", "jepa", "rarest", REPORT_DIR)  # all the demo writes under its root
ARMS = ("unguided", "JEPA-guided", "rarest kept")
Evidence = Callable[[dict[str, pa.Table]], tuple[list[str], str]]  # each arm's rows (ARMS) -> (a verdict line per
# arm, with its cost, for the top of the report; an HTML section measuring their rarity)


@dataclass(frozen=True)
class DemoResult:
    report: Path  # the HTML page
    unguided: GenerationSummary
    guided: GenerationSummary
    rarest_uri: str
    rows_kept: int


@dataclass(frozen=True)
class DemoPlan:
    """What the demo would do, found by its preflight."""

    unguided: Plan
    guided: Plan
    curation: FilterConfig  # the rarest of the guided arm, the rule already checked

    def describe(self) -> str:
        return (f"unguided: {self.unguided.describe()}\nguided: {self.guided.describe()}\n"
                f"rarest: {self.curation.keep_fraction} of each class into {self.curation.output}")


def preflight_demo(config_path: str = DEMO_CONFIG, root: str = "outputs/demo", keep_fraction: float = 0.25,
                   overrides: list[str] = ()) -> DemoPlan:
    """The root (no run, nothing the demo did not write), both arms' generation checks, the curation rule, its
    folder and each class's quota of the planned samples, before either arm samples; writes nothing."""
    unguided_arm, guided_arm, rarest, _ = (f"{root}/{folder}" for folder in FOLDERS)
    guided = load_config(config_path, [*overrides, f"output.uri={guided_arm}"])
    unguided = load_config(config_path, [*overrides, f"output.uri={unguided_arm}", "sampling.method=unguided"])
    curation = FilterConfig(input=guided.output.uri, output=rarest, keep_fraction=keep_fraction,
                            per="class_label", storage=guided.storage, tracking=guided.tracking)
    start_over = f"delete {root} to start the demo over, or pass --root with a new folder"
    folder = resolve(root, guided.storage)
    check_holds_no_run(folder, start_over)
    check_only(folder, set(FOLDERS), "the demo", start_over)
    check_target(curation, start_over)
    try:
        plan = DemoPlan(preflight_generation(unguided), preflight_generation(guided), curation)
    except OtherRunError as error:  # the arms' output.uri is the demo's --root, not a key the user set
        raise StorageError(f"{error.uri} holds a demo made with another config; {start_over}") from error
    check_groups(curation, plan.guided.manifest.group_counts(curation.per), "samples planned")
    return plan


def run_demo(config_path: str = DEMO_CONFIG, root: str = "outputs/demo", keep_fraction: float = 0.25,
             overrides: list[str] = (), evidence: Evidence | None = None) -> DemoResult:
    """Unguided and guided generation, the rarest guided samples per class, and the report (with
    ``evidence``'s section on the arms' rarity)."""
    start = time.perf_counter()
    plan = preflight_demo(config_path, root, keep_fraction, overrides)
    unguided, guided, curation = plan.unguided.config, plan.guided.config, plan.curation
    log.info("demo 1/4: unguided samples -> %s", unguided.output.uri)
    unguided_summary = run_generation(plan.unguided)
    log.info("demo 2/4: JEPA-guided samples, same seeds -> %s", guided.output.uri)
    guided_summary = run_generation(plan.guided)
    rarest_uri = curation.output
    log.info("demo 3/4: the rarest %.0f%% of each class -> %s", 100 * keep_fraction, rarest_uri)
    selection = run_filter(curation)
    log.info("demo 4/4: report")
    runs = {"unguided": unguided_summary.run_id, "JEPA-guided": guided_summary.run_id,
            "rarest kept": selection["filter_run_id"]}
    report = write_report(Path(root) / REPORT_DIR, guided, unguided, rarest_uri, evidence,
                          provenance(runs, guided.tracking.tracking_uri, time.perf_counter() - start))
    return DemoResult(report, unguided_summary, guided_summary, rarest_uri, selection["rows_kept"])


def provenance(runs: dict[str, str | None], tracking_uri: str, seconds: float) -> list[str]:
    """What made the report: its MLflow runs and how to open them, the time taken, package versions, the date."""
    ids = ", ".join(f"{arm} {run}" for arm, run in runs.items() if run)
    last = next((run for run in reversed(runs.values()) if run), None)
    return [f"MLflow runs: {ids or 'none (every arm was already complete)'}",
            f"browse: {ui_command(tracking_uri, last)}",
            f"took {seconds:.0f} s; {', '.join(f'{name} {v}' for name, v in package_versions().items())}; "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"]


def guidance_settings(guidance) -> str:
    """eta, tau and k, then every setting that differs from the authors' defaults (``GuidanceConfig``)."""
    changed = [f"{field.name.replace('_', ' ')} {getattr(guidance, field.name)}" for field in fields(guidance)
               if field.name not in ("eta", "tau", "k") and getattr(guidance, field.name) != field.default]
    return ", ".join([f"eta {guidance.eta}", f"tau {guidance.tau}", f"k {guidance.k}", *changed])


def _rows(uri: str, config: GenerateConfig) -> pa.Table:
    table = read_committed(resolve(uri, config.storage), ["seed", "class_label", "image", "jepa_score"])
    return table.sort_by([("class_label", "ascending"), ("seed", "ascending")])


def _class_mean(table: pa.Table, label: int) -> str:
    scores = table.filter(pc.equal(table.column("class_label"), label)).column("jepa_score").to_numpy()
    return f"{scores.mean():.1f}" if len(scores) else "-"


def write_report(folder: Path, guided: GenerateConfig, unguided: GenerateConfig, rarest_uri: str,
                 evidence: Evidence | None = None, made: list[str] = ()) -> Path:
    """The report opens with a verdict per arm and its cost (with ``evidence``) and what made it (``made``); its
    pictures are committed first, ``index.html`` last."""
    with_guidance, without = _rows(guided.output.uri, guided), _rows(unguided.output.uri, unguided)
    rarest = _rows(rarest_uri, guided).sort_by([("class_label", "ascending"), ("jepa_score", "ascending")])
    said, measured = evidence(dict(zip(ARMS, (without, with_guidance, rarest)))) if evidence else ([], "")
    verdict = "".join(f"<li>{html.escape(line)}</li>" for line in said)
    verdict = (f"<h2>Verdict</h2><ul>{verdict}</ul>" if said else
               "<p>This model is not the demo's own: no real digits to measure rarity against "
               "(run <code>jepa-minority evaluate</code> with a reference).</p>")
    about = "".join(f"<li>{html.escape(line)}</li>" for line in made)
    labels = sorted(set(with_guidance.column("class_label").to_pylist()))

    def by_class(table: pa.Table, label: int) -> tuple[list[bytes], list[float]]:
        rows = [r for r in table.to_pylist() if r["class_label"] == label][:SHEET_COLUMNS]
        return [r["image"]["bytes"] for r in rows], [r["jepa_score"] for r in rows]

    comparison = []
    for label in labels:
        comparison.append((f"class {label}: unguided", *by_class(without, label)))
        comparison.append((f"class {label}: JEPA-guided (same seeds)", *by_class(with_guidance, label)))
    scores = {"unguided": without.column("jepa_score").to_numpy(), "JEPA-guided": with_guidance.column("jepa_score").to_numpy()}
    pictures = {
        "guided_vs_unguided.png": contact_sheet(comparison, cell=64),
        "rarest.png": contact_sheet([(f"class {label}: rarest kept", *by_class(rarest, label)) for label in labels],
                                    cell=64),
        "jepa_score_histograms.png": overlaid_histograms(scores, "demo: exact JEPA-SCORE"),
    }

    per_class = "".join(
        f"<tr><td>{label}</td>"
        + "".join(f"<td>{_class_mean(t, label)}</td>" for t in (without, with_guidance, rarest))
        + "</tr>"
        for label in labels
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>jepa-minority demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 10px;text-align:right}}</style>
</head><body>
<h1>JEPA-guided minority sampling: demo</h1>
{verdict}
<ul>{about}</ul>
<p>Class-conditional digits from the demo diffusion model, generated twice at the same seeds: unguided,
then with JEPA guidance ({html.escape(guidance_settings(guided.sampling.guidance))})
against the demo world prior ({html.escape(guided.encoder.name)}, weights {html.escape(guided.encoder.weights)}).
Lower JEPA-SCORE = rarer under the world prior.</p>
<p>Mean exact JEPA-SCORE: unguided {scores['unguided'].mean():.1f}, JEPA-guided {scores['JEPA-guided'].mean():.1f}.</p>
{measured}
<h2>Score distributions</h2><img src="jepa_score_histograms.png">
<h2>Guided vs unguided, same seeds</h2><img src="guided_vs_unguided.png">
<h2>The rarest guided samples kept per class</h2><img src="rarest.png">
<h2>Mean score per class</h2>
<table><tr><th>class</th><th>unguided</th><th>JEPA-guided</th><th>rarest kept</th></tr>{per_class}</table>
<h2>Data</h2><ul>
<li>unguided: {html.escape(unguided.output.uri)}</li><li>JEPA-guided: {html.escape(guided.output.uri)}</li>
<li>rarest: {html.escape(rarest_uri)}</li><li>MLflow: {html.escape(guided.tracking.tracking_uri)}
(experiment {html.escape(guided.tracking.experiment)})</li></ul>
</body></html>
"""
    commit(resolve(str(folder), StorageConfig()), pictures, (REPORT_PAGE, page.encode()))
    return folder / REPORT_PAGE
