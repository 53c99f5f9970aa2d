"""Keep the rarest samples of a generated dataset: lowest score first (the exact JEPA-SCORE, or with
``by: topk_score`` the exact top-k log-volume), ties by sample_id.

With a fidelity gate (``gate_reference``, pipeline/curate/gate.py), a row is valid only when it also lies inside
at least one real sample's k-NN ball in a pixel space: the gate applies BEFORE the rarest are taken, so the quotas
are computed on the rows that passed it, and the rows it dropped are counted (in total and per group).

Two passes on Ray Data, memory bounded by blocks and the rows kept, whatever the input size:
  1. choose from the id / score / method / group columns only (without a gate images are never read to choose;
     with one, each read task also decodes its images into an ``inside`` flag and drops them): count
     the rows and the valid ones (a finite score, through the gate) per group, which sets each group's quota; then each
     read task keeps its block's rarest ``quota`` rows per group and the driver merges them as they
     stream in, never holding more than twice the rows it keeps (no shuffle: a top-k needs none). With
     ``dedup_threshold`` or ``select: diverse-rarest`` the same top-k keeps each group's rarest ``candidates`` x
     quota rows with their vectors (the stored embedding, or the image in a pixel space), and the driver narrows
     them to the quota (pipeline/curate/diversity.py): near-duplicates removed, then the rarest or a k-center cover;
  2. copy the chosen rows, images included, through the atomic sink into ``<output>/<DATA_DIR>/``.
Before the first data file, ``_curation.json`` claims the folder for this input and rule: a rerun removes only
the data files of an interrupted attempt that claimed it, and a folder holding a run, a curation of another
input or rule, or files it did not write is refused (pipeline/folders.py). The dataset card, then ``_selection.json`` last, as
the completion marker of the curated set (names in pipeline/schema.py). A group whose quota is 0 is refused
unless ``allow_empty_groups``; a set that keeps nothing is still one Parquet file with the schema and no rows.
Rows are chosen by score whatever their method; the report counts rows, considered (valid) and kept ones
per method, so rows that ``output.retry_unguided`` committed under ``unguided`` in a guided run are in plain view,
and the kept set's balance over the class or prompt (``balance``), with a warning when one group dominates it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from fnmatch import fnmatch
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cluster import WRITERS, connect_ray
from pipeline.curate.config import GROUP_COLUMNS, FilterConfig
from pipeline.curate.diversity import narrow
from pipeline.curate.gate import Gate, load_gate, mark_inside
from pipeline.folders import check_apart, check_holds_no_run, check_only, inside
from pipeline.curate.selection import VECTOR, ids_digest, rarest_by_group, rows_with_ids, tally, with_vectors
from pipeline.layout import check_layout, dataset_card, missing_columns
from pipeline.provenance import curation_provenance, mlflow_run
from pipeline.rows import read_committed
from pipeline.schema import (CARD_FILE, CURATION_FILE, DATA_DIR, DATA_FILE_NAME, FAILURES_DIR, OUTPUT_SCHEMA, RUN_FILE,
                             SELECTION_FILE)
from pipeline.settings import UserError, flatten, to_dict
from pipeline.storage import (Location, StorageError, check_reachable, check_writable, commit, delete, exists,
                              list_files, read_bytes, resolve, write_bytes)

if TYPE_CHECKING:
    from pipeline.tracking import RunTracker

log = logging.getLogger(__name__)
ROW_GROUP_SIZE = 128


@dataclass(frozen=True)
class Choice:
    """What pass 1 found: the chosen rows and the counts the report gives."""

    chosen: pa.Table  # id / score / method / group columns of the rows kept
    rows_in: int
    counts: dict  # valid rows per quota group (one group, None, without per)
    balance: dict  # valid rows per balance group (config.balance; one group, None, without it)
    methods: dict  # rows and valid rows per method
    dropped: dict  # rows the gate dropped per balance group
    removed: dict  # near-duplicates removed per quota group


def _quota(config: FilterConfig, valid: int) -> int:
    return min(valid, config.keep if config.keep is not None else math.floor(config.keep_fraction * valid))


def _needed(config: FilterConfig) -> int:
    """The fewest rows a group needs to keep one: floor(fraction x n) >= 1."""
    if config.keep is not None:
        return 1
    n = max(1, math.floor(1 / config.keep_fraction))
    return n if _quota(config, n) else n + 1


def group_counts(rows: pa.Table, per: str | None) -> dict:
    """Rows per group (key None: rows without one); one group, None, without ``per``."""
    if per is None:
        return {None: rows.num_rows}
    return {count["values"]: count["counts"] for count in rows.column(per).value_counts().to_pylist()}


def check_groups(config: FilterConfig, counts: dict, what: str) -> None:
    """Every row has its group, and (unless ``allow_empty_groups``) every group's quota keeps at least one of its
    ``what``: floor(fraction x n) is 0 below the fraction's inverse."""
    if config.per and None in counts:
        other = next(column for column in GROUP_COLUMNS if column != config.per)
        raise UserError(f"{counts[None]} of the {sum(counts.values())} {what} of {config.input} have no {config.per}: "
                         f"curate them without --per, or with --per {other}")
    empty = sorted((key for key, n in counts.items() if not _quota(config, n)), key=str)
    if not empty or config.allow_empty_groups:
        return
    named = [f"{config.per} {key!r} ({counts[key]} {what})" for key in empty[:3]] if config.per else [
        f"all {counts[None]} {what}"]
    more = f" and {len(empty) - 3} more groups" if len(empty) > 3 else ""
    rule = (f"keep_fraction {config.keep_fraction} keeps floor(fraction x n) of a group's n, so each needs "
            f"{_needed(config)}" if config.keep is None else "each needs at least one")
    raise UserError(f"{', '.join(named)}{more} of {config.input} would keep nothing ({rule}): generate more "
                     "samples, raise the keep fraction, or pass --allow-empty-groups to curate them empty")


def _read(files: list[str], source: Location, columns: list[str] | None = None):
    """One read task per file. Ray would otherwise split small reads into more blocks, and a split read
    is not fused with the map after it: every image would then pass through the object store."""
    import ray

    return ray.data.read_parquet(files, filesystem=source.filesystem, columns=columns,
                                 override_num_blocks=len(files))


def _scored(config: FilterConfig, files: list[str], source: Location, columns: list[str], gate: Gate | None,
            vectors: bool = False):
    """The rows to choose from, as the read tasks leave them: ``columns``, the gate's ``inside`` flag with a gate, and
    with ``vectors`` each row's vector in the similarity space (images are decoded in the read tasks and dropped)."""
    pixels = vectors and config.similarity_space != "embedding"
    extra = ["image"] if gate or pixels else []
    scores = _read(files, source, [*columns, *extra, *(["embedding"] if vectors and not pixels else [])])
    if vectors:
        scores = scores.map_batches(with_vectors, batch_format="pyarrow",
                                    fn_kwargs={"space": config.similarity_space, "keep_image": bool(gate)})
    if gate:
        scores = scores.map_batches(mark_inside, fn_kwargs={"gate": gate}, batch_format="pyarrow")
    return scores


def choose(config: FilterConfig, files: list[str], source: Location, gate: Gate | None) -> Choice:
    """Pass 1 on Ray Data: the tallies, then the chosen id / score / method / group rows (with dedup or
    diverse-rarest, from each group's rarest ``candidates`` x quota rows, narrowed on the driver)."""
    group = config.balance
    columns = ["sample_id", config.by, "method", *([group] if group else [])]
    scores = _scored(config, files, source, columns, gate)
    tallies = pa.concat_tables(scores.map_batches(tally, fn_kwargs={"per": group, "by": config.by},
                                                  batch_format="pyarrow").iter_batches(batch_size=None, batch_format="pyarrow"))
    by_method = tallies.group_by("method").aggregate([("valid", "sum"), ("rows", "sum")])
    methods = {method: {"rows": rows, "considered": valid} for method, rows, valid in zip(
        by_method["method"].to_pylist(), by_method["rows_sum"].to_pylist(), by_method["valid_sum"].to_pylist())}
    if len(methods) > 1:
        log.warning("%s mixes methods %s (output.retry_unguided commits fallback rows as unguided): all are "
                    "chosen by score, counted per method in %s", config.input, sorted(methods), SELECTION_FILE)
    totals = tallies.group_by("group").aggregate([("valid", "sum"), ("dropped", "sum"), ("rows", "sum")])
    rows_in = sum(totals["rows_sum"].to_pylist())
    valid = dict(zip(totals["group"].to_pylist(), totals["valid_sum"].to_pylist()))
    dropped = dict(zip(totals["group"].to_pylist(), totals["dropped_sum"].to_pylist()))
    if gate:
        log.info("the gate dropped %d rows outside every %s k-NN ball of %s", sum(dropped.values()), config.gate_space,
                 config.gate_reference)
    counts = {key: n for key, n in valid.items() if n} if config.per else {None: sum(valid.values())}
    check_groups(config, valid if config.per else counts,
                 "rows with a finite score" + (" inside the gate's reference balls" if gate else ""))
    quotas = {key: _quota(config, n) for key, n in counts.items()}
    if config.narrows:
        scores = _scored(config, files, source, columns, gate, vectors=True)
    taken = ({key: min(counts[key], config.candidates * quota) for key, quota in quotas.items()}
             if config.narrows else quotas)
    keep = {"per": config.per, "quotas": taken, "max_score": config.max_score, "by": config.by}
    schema = pa.schema([OUTPUT_SCHEMA.field(c) for c in columns] + ([pa.field(VECTOR, pa.list_(pa.float32()))]
                                                                    if config.narrows else []))
    chosen = schema.empty_table()
    for block in (scores.map_batches(rarest_by_group, fn_kwargs=keep, batch_format="pyarrow")
                  .iter_batches(batch_size=None, batch_format="pyarrow")):
        chosen = pa.concat_tables([chosen, block.cast(schema)])
        if chosen.num_rows > 2 * sum(taken.values()):
            chosen = rarest_by_group(chosen, **keep)
    chosen = rarest_by_group(chosen, **keep)
    removed = {}
    if config.narrows:
        chosen, removed = narrow(chosen, config.per, quotas, config.by, config.select, config.rule["dedup"])
        if config.dedup_threshold is not None:
            log.info("removed %d near-duplicates (cosine >= %s in %s) among %d candidates", sum(removed.values()),
                     config.dedup_threshold, config.similarity_space, sum(taken.values()))
    return Choice(chosen, rows_in, counts, valid, methods, dropped, removed)


def _recorded(target: Location) -> dict | None:
    """The input and rule of the curation the folder holds: finished (its selection), or begun (its marker)."""
    for name in (SELECTION_FILE, CURATION_FILE):
        if exists(target.child(name)):
            return json.loads(read_bytes(target.child(name)))
    return None


def _own_files(target: Location) -> list[Location]:
    """The data files a claimed folder's curation wrote: the sink's names (DATA_FILE_NAME)."""
    return [file for file in list_files(target.child(DATA_DIR), ".parquet")
            if fnmatch(file.path.rpartition("/")[2], DATA_FILE_NAME)]


def check_same_curation(config: FilterConfig, source: Location, target: Location, recorded: dict,
                        elsewhere: str) -> None:
    """Refuse a folder holding a curation of another input or rule, naming what differs."""
    was, now = {"input": recorded.get("input")} | recorded.get("rule", {}), {"input": config.input} | config.rule
    differs = [key for key in config.rule if was.get(key, now[key]) != now[key]]
    former = resolve(str(was["input"]), config.storage)
    if not (inside(former, source) and inside(source, former)):
        differs.insert(0, "input")
    if differs:
        raise StorageError(f"{target.uri} holds a curation made with another {', '.join(differs)} ("
                           + "; ".join(f"{key} {was[key]}, here {now[key]}" for key in differs)
                           + f"); {elsewhere}, or rerun with the rule that made it to finish it")


def check_target(config: FilterConfig, elsewhere: str = "choose another --output") -> Location:
    """The curated set's folder (nothing is written here): apart from the input, reachable, not in the old layout,
    holding no run, no curation of another input or rule, and, unless finished, only what this curation wrote.
    ``elsewhere`` says how to choose another folder (a flag of the job that runs the curation)."""
    source, target = resolve(config.input, config.storage), resolve(config.output, config.storage)
    check_apart(source, target, elsewhere)
    check_reachable(target)
    check_layout(target)
    check_holds_no_run(target, elsewhere)
    recorded = _recorded(target)
    if recorded is not None:
        check_same_curation(config, source, target, recorded, elsewhere)
    if not exists(target.child(SELECTION_FILE)):
        check_only(target, {DATA_DIR, CURATION_FILE}, "this curation", elsewhere)
        own = {file.path.rpartition("/")[2] for file in _own_files(target)} if recorded is not None else set()
        check_only(target.child(DATA_DIR), own, "this curation", elsewhere)
    return target


def preflight_filter(config: FilterConfig) -> tuple[Location, Location, dict, Gate | None]:
    """The filter's checks before Ray starts (its rule was checked when the config was built): the input is a
    completed run with rows, the columns the rule reads and each group's rows (one column read with pyarrow, or
    the files' footers), whose quotas keep something (before the gate); the output can take the curated set; the
    gate's reference is read into its features and radii. Returns (input, output) locations, each group's quota
    and the gate (None without one)."""
    source = resolve(config.input, config.storage)
    if not exists(source.child(RUN_FILE)):
        raise StorageError(f"{config.input} is not a completed generation run (no {RUN_FILE}); finish it first")
    target = check_target(config)
    if not list_files(source.child(DATA_DIR), ".parquet"):
        failed = len(list_files(source.child(FAILURES_DIR), ".json"))
        raise StorageError(f"{config.input} holds no rows to curate: its generation run wrote no data files "
                           f"(failed samples recorded in {FAILURES_DIR}/: {failed}); rerun it to retry them")
    similarity = ([] if not config.narrows else ["embedding"] if config.similarity_space == "embedding" else ["image"])
    read = ["sample_id", "method", config.by, *([config.balance] if config.balance else []),
            *(["image"] if config.gate_reference else []), *similarity]
    missing = [column for column in missing_columns(source) if column in read]
    if missing:
        raise StorageError(f"{config.input} has no {', '.join(missing)} column (an older version wrote it): curate it "
                           "with that version, or generate it again with this one")
    counts = group_counts(read_committed(source, [config.per] if config.per else []), config.per)
    check_groups(config, counts, "rows")
    gate = load_gate(config.gate_reference, config.gate_space, config.gate_k, config.storage) if config.gate_reference else None
    return source, target, {key: _quota(config, n) for key, n in counts.items()}, gate


def claim_folder(config: FilterConfig, target: Location) -> None:
    """Before the first data file: the marker names this curation, or, already there (its input and rule were
    checked), the data files of its interrupted attempt are removed."""
    marker = target.child(CURATION_FILE)
    if exists(marker):
        for stale in _own_files(target):
            delete(stale)
    else:
        write_bytes(marker, json.dumps({"input": config.input, "output": config.output, "rule": config.rule},
                                       indent=2).encode())


def run_filter(config: FilterConfig) -> dict:
    """Curate ``config.input`` into ``config.output``; returns the selection report (_selection.json)."""
    import ray

    from pipeline.tracking import RunTracker, folder_name, run_name, source_name

    source, target, _, gate = preflight_filter(config)
    check_writable(target)
    if exists(target.child(SELECTION_FILE)):
        log.info("%s is already curated by this rule: nothing to do", config.output)
        return json.loads(read_bytes(target.child(SELECTION_FILE)))
    files = [f.path for f in list_files(source.child(DATA_DIR), ".parquet")]
    generation = json.loads(read_bytes(source.child(RUN_FILE)))
    connect_ray(dashboard=False, verbose=config.verbose)

    made = generation.get("config", {})
    model = made.get("model", {})
    name = run_name("filter", made.get("sampling", {}).get("method"),
                    source_name(model.get("source") or model.get("preset") or ""), folder_name(config.output))
    context = ray.data.DataContext.get_current()
    # Ray 2.60's V2 Parquet reader lists files through a pool of up to 32 footer-reader actors
    # (~130 MiB each); the V1 reader reads the same columns and keeps the filter within its memory
    # budget (benchmarks/bench_filter_scale.py). Restored afterwards: other readers are untouched.
    reader_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        with RunTracker(config.tracking, run_name=name,
                        tags={"input_uri": config.input, "output_uri": config.output,
                              "generation_run_id": generation.get("last_run_id", "")}) as tracker:
            return _curate(config, source, target, gate, files, generation, tracker)
    finally:
        context.use_datasource_v2 = reader_v2


def _curate(config: FilterConfig, source: Location, target: Location, gate: Gate | None, files: list[str],
            generation: dict, tracker: RunTracker) -> dict:
    """Choose the rows, copy them into the claimed folder, then the card and ``_selection.json`` last."""
    from pipeline.sink import AtomicParquetSink, part_name

    choice = choose(config, files, source, gate)
    chosen, rows_in = choice.chosen, choice.rows_in
    claim_folder(config, target)
    ids = chosen.column("sample_id")
    copy = _read(files, source).map_batches(rows_with_ids, fn_kwargs={"ids": ids.combine_chunks()},
                                            batch_format="pyarrow")
    sink = AtomicParquetSink(config.output, config.storage, config.max_rows_per_file, ROW_GROUP_SIZE)
    # no more writers than input files: Ray Data warns when the concurrency exceeds its input blocks
    copy.write_datasink(sink, ray_remote_args={"num_cpus": 0.1}, concurrency=min(WRITERS, len(files)))
    if not chosen.num_rows:
        _write_empty(target.child(DATA_DIR, part_name([])))
    report = _report(config, choice, len(list_files(source.child(FAILURES_DIR), ".json")),
                     generation.get("last_run_id"), tracker.run_id)
    data = json.dumps(report, indent=2).encode()
    card = dataset_card(target, "jepa-minority curated set: the rarest samples of a generation run",
                        [f"{report['rows_kept']} of {rows_in} rows of {config.input} kept, lowest {config.by} first "
                         f"(threshold {report['threshold']}); record in {SELECTION_FILE}."],
                        curation_provenance(generation, config.rule, mlflow_run(tracker)))
    tracker.log_params(flatten(to_dict(config)))
    tracker.log_metrics({"rows_in": rows_in, "rows_kept": report["rows_kept"],
                         "invalid_scores": report["invalid_scores"], "failed_in_input": report["failed_in_input"]}
                        | ({"threshold": report["threshold"]} if report["threshold"] is not None else {})
                        | ({"gate_dropped": report["gate"]["dropped"]} if report["gate"] else {})
                        | ({"dedup_removed": report["dedup"]["removed"]} if report["dedup"] else {}))
    tracker.log_artifact_bytes(SELECTION_FILE, data)
    commit(target, {CARD_FILE: card}, (SELECTION_FILE, data))
    delete(target.child(CURATION_FILE))  # the selection records the same input and rule
    return report


def _write_empty(location: Location) -> None:
    """A data file with the schema and no row group: still a dataset to the readers. (An empty row group would
    not be: `datasets` reads a file in batches of its first row group's size, and refuses a size of 0.)"""
    buffer = pa.BufferOutputStream()
    pq.ParquetWriter(buffer, OUTPUT_SCHEMA).close()
    write_bytes(location, buffer.getvalue().to_pybytes())


def balance(config: FilterConfig, chosen: pa.Table, candidates: dict) -> dict | None:
    """The kept set's balance over ``config.balance``: each group's candidates (valid rows), kept rows and share of
    the kept rows, logged a line, with one warning when a group's share passes ``dominant_share``."""
    if config.balance is None:
        return None
    kept = group_counts(chosen.select([config.balance]), config.balance)
    total = chosen.num_rows
    groups = {str(key): {"candidates": n, "kept": kept.get(key, 0), "share": kept.get(key, 0) / total if total else 0.0}
              for key, n in sorted(candidates.items(), key=lambda item: str(item[0]))}
    log.info("balance over %s: %s", config.balance, "; ".join(
        f"{key} kept {g['kept']} of {g['candidates']} ({g['share']:.0%})" for key, g in groups.items()))
    dominant = [key for key, g in groups.items() if g["share"] > config.dominant_share]
    if len(groups) > 1 and dominant:
        top = max(dominant, key=lambda key: groups[key]["share"])
        log.warning("%s %s holds %.0f%% of the kept rows (%d of %d), more than --dominant-share %s: curate --per %s "
                    "to give each its quota", config.balance, top, 100 * groups[top]["share"], groups[top]["kept"],
                    total, config.dominant_share, config.balance)
    return {"by": config.balance, "dominant_share": config.dominant_share, "groups": groups,
            "dominant": dominant if len(groups) > 1 else []}


def _report(config: FilterConfig, choice: Choice, failed: int, generation_run: str | None, filter_run: str) -> dict:
    chosen, rows_in, counts, dropped, methods = choice.chosen, choice.rows_in, choice.counts, choice.dropped, choice.methods
    ids = chosen.column("sample_id").to_pylist()
    scores = chosen.column(config.by).to_pylist()
    kept = chosen.column("method").to_pylist()
    methods = {method: tally | {"kept": kept.count(method)} for method, tally in sorted(methods.items())}
    groups = {}
    if config.per:
        kept_by_group: dict = {}  # one pass over the kept rows: linear in rows and groups
        for key, score in zip(chosen.column(config.per).to_pylist(), scores):
            kept_by_group.setdefault(key, []).append(score)
        for key, valid in sorted(counts.items(), key=lambda item: str(item[0])):
            mine = kept_by_group.get(key, [])
            groups[str(key)] = {"valid": valid, "kept": len(mine), "threshold": max(mine) if mine else None}
    gate = config.rule["gate"] and config.rule["gate"] | {
        "dropped": sum(dropped.values()),
        "groups": {str(key): n for key, n in sorted(dropped.items(), key=lambda item: str(item[0]))} if config.per else {}}
    dedup = config.rule["dedup"] and config.rule["dedup"] | {
        "space": config.similarity_space, "removed": sum(choice.removed.values()),
        "groups": {str(key): n for key, n in sorted(choice.removed.items(), key=lambda item: str(item[0]))}
        if config.per else {}}
    return {
        "input": config.input, "output": config.output,
        "rule": config.rule,
        "rows_in": rows_in, "failed_in_input": failed,
        "invalid_scores": rows_in - sum(counts.values()) - sum(dropped.values()), "gate": gate,
        "dedup": dedup, "rows_kept": len(ids), "threshold": max(scores) if scores else None, "groups": groups,
        "methods": methods, "balance": balance(config, chosen, choice.balance),
        "kept_ids_digest": ids_digest(ids), "generation_run_id": generation_run, "filter_run_id": filter_run,
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }
