"""The configured work as a manifest of work entries, and its samples as a pure function of their index.

The manifest holds one row per work entry (a prompt, a class label, the unconditioned count) and how many
samples it makes, never one row per sample: sample ``i`` is the ``i``-th in entry order, and a range of
indices expands into sample rows where they are sampled (``Manifest.rows``), so a plan of 100M samples
costs the driver no more than one of 100. ``sample_id`` hashes the config digest with the sample's index:
stable across re-runs of the same config, distinct across configs. ``seed`` hashes the base seed with the
index only, so runs that differ in method share seeds sample by sample.

The digest is the run's identity: what changes the samples, and nothing else, method by method. In: the
model (preset, source, variant, UNet file, and the dtype as resolved for the device), the encoder (every
method stores its exact scores and embedding), the sampling settings the method reads (``run_identity``),
the work rows and base seed, and every local weights file by path, size and modification time
(``weights_identity``). Out: settings the method does not read, by its row of the method table
(``guidance.methods.METHODS``: the config sections it reads, whether it guides): the guidance section for
methods that do not read it but its ``k``, at which every method stores the top-k score;
``model.guidance_decoder``, read only by guiding methods; other methods' sections such as ``bns.*``), and speed-only levers whose rows are the same either way: ``model.compile``,
``sampling.guidance.micro_batch`` (rows are independent, so chunking them changes none), ``ray.*``
(batch size included: every row draws from its own seed) and the output's file sizes, so turning them
on resumes a run. Weights by path, size and mtime rather than a content hash: reading a 10 GB model
to hash it would cost more than the run's preflight should, and a safetensors header hash would miss a
retrained model of the same shapes; the price is that a copied or touched weights folder is a new run.
The manifest stores the identity beside its digest, so another run's settings can be named key by key.
The digest hashes the same JSON text as when the manifest held one row per sample (streamed, entry by entry),
so ids, seeds and digests are those of earlier versions.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, is_dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from guidance.presets import PRESETS, class_count
from pipeline.generate.config import GenerateConfig, StorageConfig, WorkConfig
from pipeline.schema import MANIFEST_SCHEMA, SAMPLE_SCHEMA
from pipeline.settings import UserError, flatten, to_dict
from pipeline.storage import read_bytes, resolve

PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
DIGEST_CHUNK = 1 << 20  # samples' JSON hashed at once: bounded memory however many samples an entry makes


class WorkError(UserError):
    """The work cannot be expanded: unreadable prompt file, bad prompt; the message names the fix."""


@dataclass(frozen=True)
class Manifest:
    work: pa.Table  # MANIFEST_SCHEMA entries, with the digest and the identity in its schema metadata
    digest: str  # identifies the config and its work
    identity: dict  # what the digest covers but the work entries (run_identity), and the sample count
    truncated_prompts: int  # prompts cut to work.max_prompt_chars

    @classmethod
    def read(cls, work: pa.Table) -> Manifest:
        """A manifest from its stored table (``_manifest.arrow``); how many prompts were truncated is not stored (0)."""
        metadata = work.schema.metadata
        return cls(work, metadata[b"config_digest"].decode(), json.loads(metadata[b"run_identity"]), 0)

    @property
    def planned(self) -> int:
        return self.identity["samples"]

    def group_counts(self, per: str | None) -> dict:
        """Samples planned per group (``per``: ``class_label`` or ``prompt``; key None: entries without one), from
        the work entries: as many dict entries as groups, never one per sample."""
        if per is None:
            return {None: self.planned}
        totals = self.work.group_by(per).aggregate([("samples", "sum")]).to_pydict()
        return dict(zip(totals[per], totals["samples_sum"]))

    @cached_property
    def _ends(self) -> np.ndarray:
        return np.cumsum(self.work.column("samples").to_numpy())

    def rows(self, start: int, stop: int) -> pa.Table:
        """Samples ``start`` .. ``stop - 1`` as SAMPLE_SCHEMA rows: each one's entry, id and seed from its index."""
        index = np.arange(start, stop, dtype=np.int64)
        entry = pa.array(np.searchsorted(self._ends, index, side="right"))
        base_seed = self.identity["base_seed"]
        ids = [_hash(f"{self.digest}:{i}").hex()[:24] for i in range(start, stop)]
        seeds = [int.from_bytes(_hash(f"seed:{base_seed}:{i}")[:8], "big") >> 1 for i in range(start, stop)]
        return pa.table([index, ids, seeds, self.work.column("prompt").take(entry),
                         self.work.column("class_label").take(entry)], schema=SAMPLE_SCHEMA)

    @property
    def table(self) -> pa.Table:
        """Every sample row, with the manifest's metadata: memory grows with the run (small runs and tests only)."""
        return self.rows(0, self.planned).replace_schema_metadata(self.work.schema.metadata)


def expand_ranges(ranges: pa.Table, manifest: Manifest) -> pa.Table:
    """Index ranges (``start``, ``stop`` columns) to their sample rows: the Ray Data stage before the samplers."""
    starts, stops = ranges.column("start").to_pylist(), ranges.column("stop").to_pylist()
    return pa.concat_tables([manifest.rows(start, stop) for start, stop in zip(starts, stops)])


def read_prompts(uri: str, storage: StorageConfig) -> list[str]:
    """Prompts from a .txt (one per line), .jsonl ({"prompt": ...}), .csv or .parquet ("prompt" column)."""
    suffix = next((s for s in PROMPT_SUFFIXES if uri.lower().endswith(s)), None)
    if suffix is None:
        raise WorkError(f"prompt file {uri} must end in one of {', '.join(PROMPT_SUFFIXES)}")
    data = read_bytes(resolve(uri, storage))
    if suffix == ".parquet":
        try:
            table = pq.read_table(io.BytesIO(data))
        except pa.ArrowInvalid as error:
            raise WorkError(f"prompt file {uri} is not a readable Parquet file: {error}") from error
        if "prompt" not in table.column_names:
            raise WorkError(f"prompt file {uri} has no 'prompt' column (columns: {', '.join(table.column_names)})")
        return _checked(uri, [(i + 1, p) for i, p in enumerate(table.column("prompt").to_pylist())], "row")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise WorkError(f"prompt file {uri} is not valid UTF-8 (line {line}, byte {error.start}); "
                        "re-save it as UTF-8") from error
    if suffix == ".txt":
        return _checked(uri, [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()], "line")
    if suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise WorkError(f"prompt file {uri} line {n} is not JSON: {error}") from error
            if not isinstance(record, dict) or "prompt" not in record:
                raise WorkError(f'prompt file {uri} line {n} must be an object with a "prompt" key')
            prompts.append((n, record["prompt"]))
        return _checked(uri, prompts, "line")
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
        raise WorkError(f"prompt file {uri} needs a header row with a 'prompt' column")
    return _checked(uri, [(n, row["prompt"]) for n, row in enumerate(reader, 2)], "line")


def _checked(uri: str, numbered: list[tuple[int, object]], unit: str) -> list[str]:
    prompts = []
    for number, prompt in numbered:
        if not isinstance(prompt, str) or not prompt.strip():
            raise WorkError(f"prompt file {uri} {unit} {number}: empty or non-text prompt {prompt!r}")
        prompts.append(prompt.strip())
    if not prompts:
        raise WorkError(f"prompt file {uri} holds no prompts")
    return prompts


def work_entries(work: WorkConfig, storage: StorageConfig) -> tuple[list[tuple[str | None, int | None, int]], int]:
    """(prompt, class_label, samples) per work entry in a fixed order, and how many prompts were truncated."""
    if work.prompts is not None:
        prompts = read_prompts(work.prompts, storage)
        truncated = sum(len(p) > work.max_prompt_chars for p in prompts)
        return [(p[: work.max_prompt_chars], None, work.repeats) for p in prompts], truncated
    if work.class_labels is not None:
        return [(None, label, work.samples_per_label) for label in work.class_labels], 0
    return [(None, None, work.count)], 0


def check_fits_model(config: GenerateConfig) -> None:
    """Refuse work the model cannot take (labels out of range, prompts for a class model, ...), before sampling."""
    preset, work = config.model.preset, config.work
    if config.model.source is None and PRESETS[preset].hub_id is None:
        raise WorkError(f"model.source: preset {preset!r} has no default weights; give its diffusers pipeline folder "
                        "(e.g. --set model.source=models/digits-ddpm) or start from jobs/configs/demo.yaml")
    try:
        classes = class_count(preset, config.model.source)
    except (OSError, ValueError) as error:  # a missing folder or config, or a hub id that cannot be fetched
        raise WorkError(f"model.source: cannot read the model's config: {error}") from error
    text = PRESETS[preset].family in ("sd", "sdxl")
    families = config.sampling.spec.families
    if families and PRESETS[preset].family not in families:
        raise WorkError(f"sampling.method: {config.sampling.method} runs on {' or '.join(families)} models only, and "
                        f"preset {preset!r} is a {PRESETS[preset].family} model; choose another method or preset")
    if work.class_labels is not None:
        if classes is None:
            raise WorkError(f"work.class_labels: preset {preset!r} takes {'prompts' if text else 'no conditions'}, "
                            "not class labels")
        beyond = sorted({label for label in work.class_labels if label >= classes})
        if beyond:
            raise WorkError(f"work.class_labels {beyond} out of range: this model has classes 0..{classes - 1}")
    if work.prompts is not None and not text:
        raise WorkError(f"work.prompts: preset {preset!r} is not a text-to-image model; use class_labels or count")
    if work.count is not None and (text or classes is not None):
        raise WorkError(f"work.count: preset {preset!r} needs {'prompts' if text else 'class_labels'} for every sample")


def _hash(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def weights_identity(source: str | None) -> list | None:
    """A local weights file or folder as [relative path, size, mtime_ns] per file (hidden names skipped);
    None for what is not a local path (a hub id, "hub", "random"): its name in the config is its identity."""
    if source is None:
        return None
    path = Path(source).expanduser()
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file()
                                                 and not any(p.startswith(".") for p in f.relative_to(path).parts))
    return [[f.relative_to(path).as_posix() if f != path else f.name, f.stat().st_size, f.stat().st_mtime_ns]
            for f in files]


def run_identity(config: GenerateConfig) -> dict:
    """What the digest covers but the rows (module docstring): model.dtype must already be resolved for the device."""
    if config.model.dtype == "auto":
        raise ValueError("model.dtype 'auto' must be resolved for the device before the run's identity is taken "
                         "(pipeline/generate/preflight.py: for_device)")
    spec = config.sampling.spec  # the method's row: the sections that change its samples
    sampling = {key: value for key, value in to_dict(config.sampling).items()
                if not is_dataclass(getattr(config.sampling, key))}
    sampling |= {name: to_dict(getattr(config.sampling, name)) for name in spec.sections if name != "guidance"}
    guidance = to_dict(config.sampling.guidance)
    del guidance["micro_batch"]
    # every method stores the top-k score at k
    sampling["guidance"] = guidance if "guidance" in spec.sections else {"k": guidance["k"]}
    model = {key: value for key, value in to_dict(config.model).items() if key not in ("compile", "guidance_decoder")}
    model |= {"weights": weights_identity(config.model.source), "unet_weights": weights_identity(config.model.unet_weights)}
    if spec.guides:
        model |= {"guidance_decoder": config.model.guidance_decoder,
                  "guidance_decoder_weights": weights_identity(config.model.guidance_decoder)}
    return {
        "model": model,
        "encoder": to_dict(config.encoder) | {"files": weights_identity(config.encoder.weights)},
        "sampling": sampling, "base_seed": config.work.base_seed,
    }


def build_manifest(config: GenerateConfig) -> Manifest:
    """The work's entries, digest and identity; ``config.model.dtype`` resolved for the device (for_device)."""
    entries, truncated = work_entries(config.work, config.storage)
    identity = run_identity(config)
    digest = work_digest(identity, entries)
    stored = identity | {"samples": sum(samples for _, _, samples in entries)}
    prompts, labels, samples = zip(*entries)
    table = pa.table(
        {"prompt": list(prompts), "class_label": list(labels), "samples": list(samples)},
        schema=MANIFEST_SCHEMA.with_metadata({"config_digest": digest, "run_identity": json.dumps(stored, sort_keys=True)}),
    )
    return Manifest(table, digest, stored, truncated)


def work_digest(identity: dict, entries: list[tuple[str | None, int | None, int]]) -> str:
    """sha256 of ``json.dumps(identity | {"rows": [[prompt, class_label] per sample]}, sort_keys=True)``, the
    text streamed entry by entry (a sample's JSON repeated), never held whole."""
    marker = "\ue000rows"  # stands in for the rows' text, found again by its JSON
    head, tail = json.dumps(identity | {"rows": marker}, sort_keys=True).split(json.dumps(marker))
    digest = hashlib.sha256(head.encode() + b"[")
    separator = b""
    for prompt, label, samples in entries:
        if not samples:
            continue
        item = json.dumps([prompt, label]).encode()
        digest.update(separator + item)
        separator, rest = b", ", samples - 1
        block = (b", " + item) * min(DIGEST_CHUNK, rest)  # the same bytes for every whole chunk: built once
        for _ in range(rest // DIGEST_CHUNK):
            digest.update(block)
        digest.update(block[: (rest % DIGEST_CHUNK) * (len(item) + 2)])
    digest.update(b"]" + tail.encode())
    return digest.hexdigest()


def identity_changes(before: dict, after: dict) -> list[str]:
    """What differs between two stored identities, one ``key old -> new`` each (weights: the files that changed).
    Keys one method reads and the other does not follow from ``sampling.method``, named itself; none differ when
    only the rows' contents do (the prompts or labels, not their count)."""
    old, new = flatten(before), flatten(after)
    changes = []
    for key in sorted(old.keys() & new.keys()):
        was, now = old[key], new[key]
        if was == now:
            continue
        if key.endswith(("weights", "files")) and (isinstance(was, list) or isinstance(now, list)):
            files = sorted({entry[0] for entry in set(map(tuple, was or [])) ^ set(map(tuple, now or []))})
            changes.append(f"{key}: {', '.join(files)} changed (path, size or modification time)")
        else:
            changes.append(f"{key} {json.dumps(was)} -> {json.dumps(now)}")
    return changes
