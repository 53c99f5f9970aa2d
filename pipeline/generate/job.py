"""The main job: manifest first, then Ray Data sampling into atomically committed Parquet, tracked in MLflow.

Exactly once, resumable, by our own commit rather than Ray Data's row-id checkpointing. Ray 2.60's
``CheckpointConfig`` was considered again and is ruled out by what it does:
- its two-phase commit (a ``.pending`` checkpoint before the data file, renamed after it) covers only
  ``_FileDatasink`` subclasses such as ``write_parquet``, and those open the data file at its final
  path: until the next run's cleanup deletes it, a killed write leaves a partial or uncommitted file in
  ``data/`` that pyarrow, pandas and ``datasets`` read as data (RELIABILITY.md: partial output is never
  visible). Any other sink, ours included, gets post-write checkpointing: at-least-once, by its own warning;
- the commit point is a rename of the checkpoint file, which on S3 is a copy then a delete, not atomic;
- the committed set then lives in two places (the checkpoint folder and the data files), written apart;
- it filters only read -> map -> write plans from a file source, and deletes its checkpoint on success,
  so "which ids are done" could not be read back from a finished run.
Here the data files alone are the record:
  0. every check that can run before sampling runs first, once (pipeline/generate/preflight.py): its plan
     is what ``run_generation`` runs;
  1. the manifest (the work entries; samples are a pure function of their index, deterministic ids) is
     written before any sampling;
  2. data files are committed atomically (pipeline/sink.py), each holding whole rows and, in its footer,
     the sample indices it holds;
  3. a run reads the committed indices back from the footers (pipeline/rows.py) and hands Ray Data only
     the missing index ranges, which expand into sample rows on the workers; a crash loses only
     uncommitted work, and no id can be committed twice because the next run skips every committed index;
  4. the dataset card, then ``_run.json`` last, only when every sample is committed or recorded as failed.
The folder's names are pipeline/schema.py's.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cluster import WRITERS, connect_ray, leave_ray, logs_folder
from pipeline.generate.config import GenerateConfig
from pipeline.generate.preflight import Plan
from pipeline.generate.scores import ScoreSummary
from pipeline.generate.work import Manifest, expand_ranges
from pipeline.layout import dataset_card
from pipeline.progress import show_progress
from pipeline.provenance import generation_provenance, mlflow_run
from pipeline.rows import Committed, by_bucket, committed_batches, committed_samples
from pipeline.schema import CARD_FILE, DATA_DIR, FAILURES_DIR, MANIFEST_FILE, RUN_FILE, SAMPLE_INDEX
from pipeline.settings import ConfigError, flatten, to_dict
from pipeline.storage import Location, StorageError, check_writable, commit, delete, list_files, read_bytes, write_ipc

if TYPE_CHECKING:
    from pipeline.tracking import RunTracker

log = logging.getLogger(__name__)
SHEET_SIZE = 8  # samples per contact-sheet row
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
RAY_RETRY_NOTE = re.compile(r"\nFailed to .+ after \d+/\d+ attempts")  # how Ray Data's note begins
MAX_BLOCKS = 10_000  # index ranges handed to Ray Data (one more per gap): small blocks keep every actor busy


@dataclass(frozen=True)
class GenerationSummary:
    """What a run did and where everything is."""

    output_uri: str
    planned: int  # samples in the manifest
    generated: int  # committed by this run
    committed: int  # committed in total
    failed: int  # recorded under _failures/ and not committed
    truncated_prompts: int
    complete: bool  # _run.json written
    ok: bool  # complete, or failures within output.max_failure_fraction
    run_id: str | None = None
    tracking_uri: str | None = None
    common_error: str | None = None  # the error most failed samples share, when one does
    common_error_count: int = 0  # the failed samples that share it


class Interrupted(KeyboardInterrupt):
    """The run was stopped (Ctrl-C): its committed files stay, and the same command resumes from them."""

    def __init__(self, committed: int, planned: int):
        super().__init__(f"interrupted: {committed} of {planned} committed; rerun the same command to resume")


def failed_ids(output: Location, committed: Committed) -> dict[str, str]:
    """The first error line of each sample recorded as failed and still not committed, by id; records of
    since-committed samples (by their sample index) are removed."""
    failed = {}
    for record in list_files(output.child(FAILURES_DIR), ".json"):
        fields = json.loads(read_bytes(record))
        if committed.holds(fields[SAMPLE_INDEX]):
            delete(record)
        else:
            failed[record.path.rsplit("/", 1)[1].removesuffix(".json")] = fields["error"].partition("\n")[0]
    return failed


def common_error(failed: dict[str, str]) -> tuple[str | None, int]:
    """The error (first line) that more than half of the ``failed`` samples share, and how many share it;
    (None, 0) when no one error does."""
    error, count = Counter(failed.values()).most_common(1)[0] if failed else (None, 0)
    return (error, count) if 2 * count > len(failed) else (None, 0)


def missing_pieces(missing: np.ndarray, batch_size: int) -> pa.Table:
    """The missing [start, stop) index ranges cut into pieces (``start``, ``stop`` columns) of at most
    ``batch_size`` samples, or larger so that there are about MAX_BLOCKS of them."""
    lengths = missing[:, 1] - missing[:, 0]
    size = max(batch_size, math.ceil(int(lengths.sum()) / MAX_BLOCKS))
    counts = -(-lengths // size)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    starts = np.repeat(missing[:, 0], counts) + size * within
    return pa.table({"start": starts, "stop": np.minimum(starts + size, np.repeat(missing[:, 1], counts))})


def run_generation(plan: Plan) -> GenerationSummary:
    """Generate every manifest sample of a preflighted ``plan`` (``preflight_generation(config)``, every check before
    a model loads or Ray starts) not yet committed; finish with _run.json when all are accounted for."""
    config, output, manifest, planned = plan.config, plan.output, plan.manifest, plan.planned
    check_writable(output)
    if not plan.started:
        write_ipc(output.child(MANIFEST_FILE), manifest.work)
    if plan.complete:
        counts = json.loads(read_bytes(output.child(RUN_FILE)))["counts"]
        log.info("%s is already complete: nothing to do", config.output.uri)
        return GenerationSummary(config.output.uri, planned, 0, counts["committed"], counts["failed"],
                                 manifest.truncated_prompts, True, True)
    from pipeline.tracking import RunTracker, folder_name, run_name, source_name  # MLflow: only for work to do

    start = time.perf_counter()
    before = plan.done.count
    missing = plan.done.missing(planned)
    todo_count = int((missing[:, 1] - missing[:, 0]).sum())
    with RunTracker(config.tracking, run_name=run_name("generate", config.sampling.method,
                                                       source_name(config.model.source or config.model.preset),
                                                       folder_name(config.output.uri)),
                    tags={"output_uri": config.output.uri, "manifest_digest": manifest.digest,
                          "resumed": str(before > 0).lower()}) as tracker:
        tracker.log_params(flatten(to_dict(config)))
        tracker.log_lineage(output.child(MANIFEST_FILE).uri, manifest.digest,
                            {"samples": planned, "work_entries": manifest.work.num_rows}, output.child(DATA_DIR).uri)
        if todo_count:
            log.info("generating %d of %d samples (%d already committed)", todo_count, planned, before)
            try:
                _sample_on_ray(config, manifest, missing_pieces(missing, config.ray.batch_size), tracker.run_id,
                               plan.gpus_per_actor, output, before)
            except KeyboardInterrupt:
                raise Interrupted(committed_samples(output, plan.done).count, planned) from None
        committed = committed_samples(output, plan.done)  # only the footers of the files this run committed
        failed = failed_ids(output, committed)
        summary = _finish(config, output, manifest, tracker, committed, failed, before, start,
                          plan.gpus_per_actor if todo_count else 0.0)
        tracker.succeeded = summary.ok
        return summary


def _sample_on_ray(config: GenerateConfig, manifest: Manifest, todo: pa.Table, run_id: str, gpus: float,
                   output: Location, already: int) -> None:
    """Sample the ``todo`` index ranges on the actor pool, ``gpus`` GPUs each, into committed files, showing
    progress: each range expands into its sample rows in a light task first (``expand_ranges``)."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.generate.sampler_stage import SampleGenerator
    from pipeline.sink import AtomicParquetSink

    connect_ray(dashboard=config.ray.dashboard, verbose=config.console.verbose)
    if not config.console.verbose and logs_folder():
        log.info("Ray's own output (workers, ray-data.log; --verbose shows it here): %s", logs_folder())
    # A sampler's own error (ConfigError, StorageError) reaches the driver as itself, not as a UserCodeException.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    resources = ray.cluster_resources()
    smallest, largest = config.ray.pool
    reserved = largest * config.ray.cpus_per_actor
    if reserved >= resources.get("CPU", 0):
        log.warning("ray.actors (at most) x ray.cpus_per_actor = %.1f CPUs takes all %.1f CPUs of the cluster: reading and "
                    "writing need some too, so unless the cluster scales up this run will stall; lower "
                    "ray.cpus_per_actor (fractions are fine)", reserved, resources.get("CPU", 0))
    dataset = ray.data.from_arrow(todo).repartition(todo.num_rows)
    dataset = dataset.map_batches(expand_ranges, fn_kwargs={"manifest": manifest}, batch_size=None,
                                  batch_format="pyarrow", num_cpus=0.1)
    dataset = dataset.map_batches(
        SampleGenerator,
        fn_constructor_kwargs={"config": config, "run_id": run_id, "threads": max(1, int(config.ray.cpus_per_actor))},
        batch_size=config.ray.batch_size,
        batch_format="pyarrow",
        # A range autoscales: Ray Data adds actors up to the max while work is queued (a KubeRay GPU group
        # scales up from zero to host them) and releases idle ones down to the min.
        compute=ActorPoolStrategy(min_size=smallest, max_size=largest),
        num_cpus=config.ray.cpus_per_actor,
        num_gpus=gpus,
    )
    sink = AtomicParquetSink(config.output.uri, config.storage, config.output.max_rows_per_file,
                             config.output.row_group_size)
    try:
        waiting = by_bucket(np.column_stack([todo.column("start").to_numpy(), todo.column("stop").to_numpy()]))
        with show_progress(output, waiting, manifest.planned, already, config.console.status_every):
            dataset.write_datasink(sink, ray_remote_args={"num_cpus": 0.1}, concurrency=WRITERS)
    except KeyboardInterrupt:
        leave_ray()  # before the job says it stopped: no process of a cluster it started outlives it
        raise
    except Exception as error:
        cause = _task_cause(error)
        if isinstance(cause, StorageError):
            raise StorageError(f"{_own_message(cause)} (committed files are whole: rerun the same command to "
                               "resume)") from error
        if isinstance(cause, ConfigError):
            raise ConfigError(_own_message(cause)) from error
        raise


def _own_message(error: BaseException) -> str:
    """A task's error as it raised it, without the retry note Ray Data appends on lines of its own."""
    return RAY_RETRY_NOTE.split(str(error), maxsplit=1)[0].rstrip()


def _task_cause(error: BaseException) -> StorageError | ConfigError | None:
    """The StorageError or ConfigError a Ray task or actor raised, unwrapped from Ray's wrapping exceptions."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if type(current) in (StorageError, ConfigError):
            return current
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None


def _finish(config: GenerateConfig, output: Location, manifest: Manifest, tracker: RunTracker,
            committed: Committed, failed: dict[str, str], before: int, start: float,
            gpus_per_actor: float) -> GenerationSummary:
    from pipeline.report import score_histogram

    planned = manifest.planned
    if committed.duplicates:
        raise RuntimeError(f"{output.child(DATA_DIR).uri} holds {committed.duplicates} duplicate samples: report this bug")
    seconds = time.perf_counter() - start
    generated = committed.count - before
    accounted = committed.count + len(failed) == planned
    ok = accounted and len(failed) <= config.output.max_failure_fraction * planned
    scores = ScoreSummary(SHEET_SIZE)
    for batch in committed_batches(output, ["sample_id", "jepa_score", "__filename"]):
        scores.add(batch)
    metrics = {
        "planned": planned, "generated": generated, "committed": committed.count, "failed": len(failed),
        "wall_seconds": seconds, "samples_per_second": generated / seconds if seconds else 0.0,
        "accelerator_seconds": seconds * config.ray.pool[1] * gpus_per_actor,  # GPU-seconds held (at most, for a range)
        "truncated_prompts": manifest.truncated_prompts,
    }
    if scores.moments.count:
        sample = scores.reservoir.sample()  # every score up to scores.SAMPLE_SIZE: exact quantiles
        metrics |= {"jepa_score_mean": scores.moments.mean, "jepa_score_std": scores.moments.std}
        metrics |= {f"jepa_score_p{int(q * 100):02d}": float(np.quantile(sample, q)) for q in QUANTILES}
        tracker.log_artifact_bytes("jepa_score_histogram.png", score_histogram(sample, config.output.uri))
        tracker.log_artifact_bytes("rarest_and_typical.png", _sheet(output, *scores.extremes.ends()))
    tracker.log_metrics(metrics)
    if ok:
        facts = generation_provenance(to_dict(config), manifest.digest, mlflow_run(tracker))
        run = {
            "status": "complete", "finished_at": datetime.now(timezone.utc).isoformat(),
            "config": to_dict(config), "manifest_digest": manifest.digest, "last_run_id": tracker.run_id,
            "tracking": to_dict(tracker.tracking),  # absolute paths: jobs run by hand on this output log beside it
            "counts": {"planned": planned, "committed": committed.count, "failed": len(failed),
                       "truncated_prompts": manifest.truncated_prompts},
            "provenance": facts,  # also the card's: models' weights digests and licences, versions, MLflow run
        }
        data = json.dumps(run, indent=2).encode()
        card = dataset_card(output, "jepa-minority generation run",
                            [f"{committed.count} of {planned} planned samples committed, {len(failed)} failed "
                             f"({FAILURES_DIR}/); made by jepa-minority generate, config in {RUN_FILE}."], facts)
        tracker.log_artifact_bytes(RUN_FILE, data)
        commit(output, {CARD_FILE: card}, (RUN_FILE, data))
    return GenerationSummary(config.output.uri, planned, generated, committed.count, len(failed),
                             manifest.truncated_prompts, ok, ok, tracker.run_id, tracker.tracking_uri,
                             *common_error(failed))


def _sheet(output: Location, rarest: pa.Table, typical: pa.Table) -> bytes:
    """The rarest and the most typical samples, reading images only from the files that hold them."""
    from pipeline.report import contact_sheet

    picks = {"rarest": rarest, "most typical": typical}
    wanted = pa.concat_tables(picks.values())
    images = {}
    for path in set(wanted.column("__filename").to_pylist()):
        table = pq.read_table(path, filesystem=output.filesystem, columns=["sample_id", "image"],
                              filters=pc.field("sample_id").isin(wanted.column("sample_id")))
        images |= {row["sample_id"]: row["image"]["bytes"] for row in table.to_pylist()}
    rows = []
    for label, table in picks.items():
        ids, values = table.column("sample_id").to_pylist(), table.column("jepa_score").to_pylist()
        rows.append((label, [images[i] for i in ids], values))
    return contact_sheet(rows)
