"""The generation job's preflight: every check that can run before a model loads, Ray starts or a sample
is drawn, in one place. ``run_generation`` runs it first; ``--dry-run`` runs only it and writes nothing.

In order: the config's values (checked when it was built), the work against the model's config, the
prompt files (the manifest is built), the model folder, UNet file and encoder weights (guidance's
``check_*`` beside each loader: configs and safetensors headers, never the weights), then the output: not
a file, writable, on S3 the endpoint, bucket and keys, not in the old layout, and not another config's run.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace

import torch

from guidance.encoders import check_encoder_weights
from guidance.presets import check_model
from pipeline.generate.config import GenerateConfig, resolve_dtype
from pipeline.generate.work import Manifest, build_manifest, check_fits_model
from pipeline.layout import check_resumable
from pipeline.rows import committed_ids
from pipeline.schema import MANIFEST_FILE, RUN_FILE
from pipeline.settings import ConfigError
from pipeline.storage import Location, StorageError, check_reachable, exists, read_ipc_schema, resolve


@dataclass(frozen=True)
class Plan:
    """What a run of this config would do, found without sampling."""

    config: GenerateConfig  # model.dtype resolved for the samplers' device
    output: Location
    manifest: Manifest
    gpus_per_actor: float
    started: bool  # the output already holds this config's manifest
    committed: int  # samples already committed there
    complete: bool  # its _run.json is there

    @property
    def planned(self) -> int:
        return self.manifest.table.num_rows

    def describe(self) -> str:
        """One line: ``N samples planned into URI, M already committed: resumes`` (or starts, or complete)."""
        what = "already complete" if self.complete else "resumes" if self.started else "starts"
        truncated = self.manifest.truncated_prompts
        return (f"{self.planned} samples planned into {self.output.uri}, {self.committed} already committed: {what}"
                + (f" ({truncated} prompts truncated)" if truncated else ""))


def actor_gpus(config: GenerateConfig) -> float:
    """GPUs each sampler actor holds: ray.gpus_per_actor, else 1 when there is a GPU. A cluster in RAY_ADDRESS
    (or one already joined) is asked; a local one would be started on this machine, whose GPU torch sees."""
    if config.ray.gpus_per_actor is not None:
        return config.ray.gpus_per_actor
    ray = sys.modules.get("ray")
    if os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        from pipeline.cluster import connect_ray

        connect_ray()
        import ray

        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return 1.0 if torch.cuda.is_available() else 0.0


def for_device(config: GenerateConfig, gpus_per_actor: float) -> GenerateConfig:
    """The config with model.dtype resolved as the samplers will run it, so it enters the run's identity
    resolved and every actor of a run (and of its resumes) samples in that one dtype."""
    dtype = resolve_dtype(config.model.dtype, gpu=gpus_per_actor > 0)
    return replace(config, model=replace(config.model, dtype=dtype))


def check_files(config: GenerateConfig) -> None:
    """The model folder, UNet file and encoder weights exist and are readable."""
    try:
        check_model(config.model.preset, config.model.source, unet_weights=config.model.unet_weights)
    except (ValueError, OSError) as error:
        raise ConfigError(f"model: {error}") from error
    try:
        check_encoder_weights(config.encoder.name, config.encoder.weights)
    except (ValueError, OSError) as error:
        raise ConfigError(f"encoder.weights: {error}") from error


class OtherRunError(StorageError):
    """The output already holds the manifest of a run made with another config."""

    def __init__(self, uri: str, message: str):
        super().__init__(message)
        self.uri = uri


def check_output(output: Location, manifest: Manifest) -> bool:
    """The output can hold this run and holds no other; True when it already holds this config's manifest."""
    check_reachable(output)
    check_resumable(output)
    target = output.child(MANIFEST_FILE)
    if not exists(target):
        return False
    digest = (read_ipc_schema(target).metadata or {}).get(b"config_digest", b"").decode()
    if digest != manifest.digest:
        raise OtherRunError(output.uri,
            f"{output.uri} holds another run (manifest digest {digest[:12]}, this config {manifest.digest[:12]}); "
            "choose a new output.uri, or rerun with the config that made it to resume"
        )
    return True


def preflight_generation(config: GenerateConfig) -> Plan:
    """Every check a run makes before its expensive part; reads, never writes."""
    output = resolve(config.output.uri, config.storage)
    check_fits_model(config)
    gpus = actor_gpus(config)
    config = for_device(config, gpus)
    manifest = build_manifest(config)
    check_files(config)
    started = check_output(output, manifest)
    committed = len(committed_ids(output)) if started else 0
    return Plan(config, output, manifest, gpus, started, committed, started and exists(output.child(RUN_FILE)))
