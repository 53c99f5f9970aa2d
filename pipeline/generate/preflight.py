"""The generation job's preflight: every check that can run before a model loads, Ray starts or a sample
is drawn, in one place. Its ``Plan`` is what ``run_generation`` runs; ``--dry-run`` runs only it and writes nothing.

In order: the config's values (checked when it was built), the work against the model's config, the
prompt files (the manifest is built), the model folder, UNet file, encoder weights and SGMS's LPIPS weights (guidance's
``check_*`` beside each loader: configs and safetensors headers, never the weights), ``guidance.k`` against
the encoder's embedding size, then the output: not a file, writable, on S3 the endpoint, bucket and keys, not
in the old layout, not another config's run (named by the settings that differ), nor other files. Light to import: no
torch, diffusers, timm or Ray unless a cluster must be asked for its GPUs, so a dry run answers at once.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from dataclasses import dataclass, replace

from guidance.checks import check_rank
from guidance.encoder_specs import check_encoder_weights, encoder_dims
from guidance.lpips_weights import check_lpips_weights
from guidance.methods import lpips_folder
from guidance.presets import check_model
from pipeline.folders import check_only
from pipeline.generate.config import EncoderConfig, GenerateConfig, resolve_dtype
from pipeline.generate.work import Manifest, build_manifest, check_fits_model, identity_changes
from pipeline.layout import check_layout, check_resumable
from pipeline.rows import Committed, Footers, read_footers
from pipeline.schema import MANIFEST_FILE, RUN_FILE
from pipeline.settings import ConfigError
from pipeline.storage import Location, StorageError, check_reachable, exists, read_bytes, read_ipc_schema, resolve


@dataclass(frozen=True)
class Plan:
    """What a run of this config would do, found without sampling."""

    config: GenerateConfig  # model.dtype resolved for the samplers' device
    output: Location
    manifest: Manifest
    gpus_per_actor: float
    started: bool  # the output already holds this config's manifest
    committed: int  # samples already committed there
    done: Committed  # which, and in which files, from the footers read here (none when complete: _run.json counts them)
    complete: bool  # its _run.json is there

    @property
    def planned(self) -> int:
        return self.manifest.planned

    def describe(self) -> str:
        """One line: ``N samples planned into URI, M already committed: resumes`` (or starts, or complete)."""
        what = "already complete" if self.complete else "resumes" if self.started else "starts"
        truncated = self.manifest.truncated_prompts
        return (f"{self.planned} samples planned into {self.output.uri}, {self.committed} already committed: {what}"
                + (f" ({truncated} prompts truncated)" if truncated else ""))


def actor_gpus(config: GenerateConfig) -> float:
    """GPUs each sampler actor holds: ray.gpus_per_actor, else 1 when there is a GPU. A cluster in RAY_ADDRESS
    (or one already joined) is asked; a local one would be started on this machine, whose GPU the CUDA driver
    reports (``local_cuda``)."""
    if config.ray.gpus_per_actor is not None:
        return config.ray.gpus_per_actor
    ray = sys.modules.get("ray")
    if os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        from pipeline.cluster import connect_ray

        connect_ray()
        import ray

        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return 1.0 if local_cuda() else 0.0


def local_cuda() -> bool:
    """Whether this machine's CUDA driver sees a device (``CUDA_VISIBLE_DEVICES`` honoured): what
    ``torch.cuda.is_available()`` asks, asked of the driver library itself, without importing torch."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def for_device(config: GenerateConfig, gpus_per_actor: float) -> GenerateConfig:
    """The config with model.dtype resolved as the samplers will run it, so it enters the run's identity
    resolved and every actor of a run (and of its resumes) samples in that one dtype."""
    dtype = resolve_dtype(config.model.dtype, gpu=gpus_per_actor > 0)
    return replace(config, model=replace(config.model, dtype=dtype))


def check_files(config: GenerateConfig) -> None:
    """The model folder, UNet file, encoder weights and the method's LPIPS weights exist and are readable."""
    try:
        check_model(config.model.preset, config.model.source, unet_weights=config.model.unet_weights)
    except (ValueError, OSError) as error:
        raise ConfigError(f"model: {error}") from error
    check_encoder_files(config.encoder)
    folder = lpips_folder(config.sampling)
    if folder is not None:
        try:
            check_lpips_weights(folder)
        except (ValueError, OSError) as error:
            raise ConfigError(f"sampling.sgms.lpips_weights: {error}") from error


def check_encoder_files(encoder: EncoderConfig) -> None:
    """The encoder's weights exist, whole and finite (read, not loaded): before any job loads the encoder."""
    try:
        check_encoder_weights(encoder.name, encoder.weights)
    except (ValueError, OSError) as error:
        raise ConfigError(f"encoder.weights: {error}") from error


def check_rank_fits(config: GenerateConfig) -> None:
    """guidance.k against the encoder's embedding size D (and its N input values), before any model loads: every
    method stores the exact top-k score at k <= min(D, N); guided methods sketch r = k + oversample <= min(D, N)
    columns (docs/method.md, 'Top-k log-volume'). D unknown without the model (timm hub names,
    open_clip towers) is checked where the encoder loads (guidance/generate.py)."""
    encoder, guidance = config.encoder, config.sampling.guidance
    embed_dim, side = encoder_dims(encoder.name, encoder.weights, encoder.input_size)
    if embed_dim is None:
        return
    oversample = guidance.oversample if config.sampling.objective is not None else 0
    try:
        check_rank(guidance.k, oversample, embed_dim, 3 * side**2 if side else embed_dim)
    except ValueError as error:
        stored = "" if oversample else f" (method {config.sampling.method} stores its top-k score at guidance.k)"
        raise ConfigError(f"guidance.k: encoder {encoder.name} ({encoder.weights}) has D = {embed_dim} embedding "
                          f"dimensions: {error}{stored}") from error


class OtherRunError(StorageError):
    """The output already holds the manifest of a run made with another config."""

    def __init__(self, uri: str, message: str):
        super().__init__(message)
        self.uri = uri


def check_output(output: Location, manifest: Manifest, footers: Footers) -> bool:
    """The output (reachable, in this layout) can hold this run and holds no other, its data files' ``footers``
    read; True when it already holds this config's manifest."""
    check_resumable(output, footers)
    target = output.child(MANIFEST_FILE)
    if not exists(target):  # the manifest is a run's first file: anything else there is another job's
        check_only(output, set(), "this run", "choose an empty or new output.uri")
        return False
    metadata = read_ipc_schema(target).metadata or {}
    digest = metadata.get(b"config_digest", b"").decode()
    if digest == manifest.digest:
        return True
    if b"run_identity" not in metadata:
        raise OtherRunError(output.uri, f"{output.uri} holds a run made by an earlier version, which stored only its "
                            f"digest ({digest[:12]}), so the settings that differ cannot be named; resume it with that "
                            "version, or choose a new output.uri")
    changes = identity_changes(json.loads(metadata[b"run_identity"]), manifest.identity)
    what = "; ".join(changes) or "the same settings over other work rows (prompts or class labels)"
    raise OtherRunError(output.uri, f"{output.uri} holds another run ({what}); choose a new output.uri, or rerun "
                                    "with the config that made it to resume")


def preflight_generation(config: GenerateConfig) -> Plan:
    """Every check a run makes before its expensive part; reads, never writes."""
    output = resolve(config.output.uri, config.storage)
    check_fits_model(config)
    gpus = actor_gpus(config)
    config = for_device(config, gpus)
    manifest = build_manifest(config)
    check_files(config)
    check_rank_fits(config)
    check_reachable(output)
    check_layout(output)
    footers = read_footers(output)  # each data file's footer read once: its columns and the samples it holds
    started = check_output(output, manifest, footers)
    complete = started and exists(output.child(RUN_FILE))
    done = footers.samples() if started and not complete else Committed.nothing()
    committed = json.loads(read_bytes(output.child(RUN_FILE)))["counts"]["committed"] if complete else done.count
    return Plan(config, output, manifest, gpus, started, committed, done, complete)
