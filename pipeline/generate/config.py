"""The generation job's config: typed dataclasses from YAML and ``--set a.b=value`` overrides, checked by
``pipeline.configs.parse``.

Everything is validated before any model is loaded: unknown keys, wrong types and out-of-range
values are errors that name the key. Light to import (no torch, diffusers, timm or Ray): dtypes stay names
here and become torch dtypes where the models load. Credentials have no field here: they come only from the
standard AWS environment / profile chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from guidance.encoder_specs import check_encoder, family_of
from guidance.methods import SamplingConfig
from guidance.presets import PRESETS
from pipeline.configs import parse
from pipeline.settings import ConfigError, TrackingConfig
from pipeline.storage import StorageConfig

DTYPES = ("float32", "bfloat16", "float16")  # model.dtype, besides "auto": torch's names


def resolve_dtype(name: str, gpu: bool) -> str:
    """model.dtype as the samplers run it: auto = float32 on CPU, bfloat16 on GPU."""
    if name == "auto":
        return "bfloat16" if gpu else "float32"
    return name


@dataclass(frozen=True)
class ModelConfig:
    """Which diffusion model, and where its weights are."""

    preset: str = "pixel-unet"
    """a model preset: pixel-unet, dit, sd, sdxl-base ... (the table: guidance/presets.py)"""
    source: str | None = None
    """a local diffusers pipeline folder or a hub id (default: the preset's)"""
    variant: str | None = None
    """diffusers weight variant, e.g. fp16"""
    unet_weights: str | None = None
    """a separate UNet weights file (SDXL-Lightning)"""
    dtype: str = "auto"
    """denoiser / VAE dtype: auto = float32 on CPU, bfloat16 on GPU"""
    compile: bool = False
    """torch.compile the denoising network: pays on long unguided runs (docs/results.md, Performance)"""
    guidance_decoder: str | None = None
    """an AutoencoderTiny (TAESD) folder or hub id: decodes inside guidance only"""

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; valid presets: {', '.join(PRESETS)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be one of auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"model.compile must be true or false, got {self.compile!r}")

    def torch_dtype(self, device: str):
        """The denoiser / VAE torch dtype on ``device``: auto is float32 on CPU, bfloat16 on GPU (the encoder stays fp32)."""
        import torch  # where the models load

        return getattr(torch, resolve_dtype(self.dtype, gpu=device == "cuda"))


@dataclass(frozen=True)
class EncoderConfig:
    """The world prior: an image encoder and its weights."""

    name: str = "vit_small_patch14_reg4_dinov2"
    """a DINOv2 name from guidance.ENCODERS, timm:<ViT architecture> or open_clip:<architecture or config .json>"""
    weights: str = "hub"
    """a .safetensors / .pth file (open_clip: its checkpoint), a timm folder, "hub[:TAG]" (timm only), or "random" (explicit)"""
    input_size: int | None = None
    """images are resized to this before the encoder; unset: 224 for DINOv2, else the pretrained config's"""
    output: str = "cls"
    """the embedding: "cls" (CLS token after the final norm) or "pool" (mean of the patch tokens)"""

    def __post_init__(self):
        try:
            family, _ = family_of(self.name)
        except ValueError as error:
            raise ConfigError(f"encoder.name: {error}") from error
        if family.patch and self.input_size is not None and (self.input_size < family.patch or self.input_size % family.patch):
            raise ConfigError(f"encoder.input_size must be a positive multiple of {family.patch}, got {self.input_size}")
        try:
            check_encoder(self.name, self.weights, self.output, self.input_size)
        except (ValueError, OSError) as error:
            raise ConfigError(f"encoder: {error}") from error


@dataclass(frozen=True)
class WorkConfig:
    """What to generate: prompts from a file, or class labels x samples per label, or a count."""

    prompts: str | None = None
    """a .txt / .jsonl / .csv / .parquet file of prompts (local, file:// or s3://)"""
    repeats: int = 1
    """samples per prompt"""
    class_labels: list[int] | None = None
    """class-conditional models: the labels to sample"""
    samples_per_label: int = 1
    """samples per class label"""
    count: int | None = None
    """unconditional models: how many samples"""
    base_seed: int = 0
    """every row's seed derives from this and the row's place in the work"""
    max_prompt_chars: int = 1000
    """longer prompts are truncated (and the truncation is reported)"""

    def __post_init__(self):
        given = [name for name in ("prompts", "class_labels", "count") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"work: set exactly one of prompts, class_labels or count (got {', '.join(given) or 'none'})"
            )
        for name in ("repeats", "samples_per_label", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"work.{name} must be >= 1, got {getattr(self, name)}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"work.count must be >= 1, got {self.count}")
        if self.class_labels is not None:
            if not self.class_labels:
                raise ConfigError("work.class_labels is empty: list at least one label")
            if any(label < 0 for label in self.class_labels):
                raise ConfigError(f"work.class_labels must be >= 0, got {self.class_labels}")


@dataclass(frozen=True)
class RayConfig:
    """Ray resources for the sampler actors."""

    actors: int | list[int] = 1
    """sampler actors (each loads the models once): a size, or [min, max] to scale with the work"""
    gpus_per_actor: float | None = None
    """None: 1 when the cluster has GPUs, else 0"""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor (fractions keep small machines from stalling)"""
    batch_size: int = 4
    """samples per actor call"""
    dashboard: bool = False
    """start Ray's dashboard with a local cluster (a given cluster keeps its own)"""

    def __post_init__(self):
        if not isinstance(self.actors, int) and len(self.actors) != 2 or not 1 <= self.pool[0] <= self.pool[1]:
            raise ConfigError(f"ray.actors must be a pool size >= 1 or a range [min, max] with 1 <= min <= max, "
                              f"got {self.actors}")
        if self.batch_size < 1:
            raise ConfigError(f"ray.batch_size must be >= 1, got {self.batch_size}")
        if self.cpus_per_actor < 0 or (self.gpus_per_actor is not None and self.gpus_per_actor < 0):
            raise ConfigError("ray.cpus_per_actor and ray.gpus_per_actor must be >= 0")


    @property
    def pool(self) -> tuple[int, int]:
        """The actor pool's (min, max) size; equal for a fixed pool."""
        return (self.actors, self.actors) if isinstance(self.actors, int) else (self.actors[0], self.actors[-1])


@dataclass(frozen=True)
class ConsoleConfig:
    """What the job shows while it runs."""

    status_every: float = 30.0
    """seconds between status lines when the console is not a terminal (a terminal gets a bar)"""
    verbose: bool = False
    """Ray's own output too: Ray Data's operator progress and the workers' logs"""

    def __post_init__(self):
        if not self.status_every > 0:
            raise ConfigError(f"console.status_every must be > 0 seconds, got {self.status_every}")


@dataclass(frozen=True)
class OutputConfig:
    """Where the rows go and how they are laid out."""

    uri: str = "outputs/run"
    """a local path, file:// or s3://bucket/prefix"""
    max_rows_per_file: int = 1024
    """bounds each Parquet file"""
    row_group_size: int = 128
    """rows per Parquet row group"""
    max_failure_fraction: float = 0.0
    """more failed samples than this makes the job exit non-zero"""
    retry_unguided: bool = False
    """a sample that fails under guidance is sampled again unguided (same seed)"""

    def __post_init__(self):
        if self.max_rows_per_file < 1 or self.row_group_size < 1:
            raise ConfigError("output.max_rows_per_file and output.row_group_size must be >= 1")
        if not 0 <= self.max_failure_fraction <= 1:
            raise ConfigError(f"output.max_failure_fraction must be in [0, 1], got {self.max_failure_fraction}")


@dataclass(frozen=True)
class GenerateConfig:
    """The whole generation job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    work: WorkConfig = field(default_factory=lambda: WorkConfig(count=8))
    output: OutputConfig = field(default_factory=OutputConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> GenerateConfig:
    """Read a YAML config (or start from the defaults), apply ``a.b=value`` overrides, validate."""
    data = {} if path is None else read_config_file(path)
    for override in overrides:
        _apply_override(data, override)
    return parse(GenerateConfig, data)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's sections as YAML mappings, or a ConfigError in one line naming the file and the fix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start}): give a YAML file") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(error)}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error in one line: its problem and where (its own text spans lines and quotes the file)."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem and mark:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


def _apply_override(data: dict[str, Any], override: str) -> None:
    """``a.b=value`` into the nested mapping ``data``, the value read as YAML (``parse`` then checks it)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. sampling.steps=20), got {override!r}")
    parts = key.strip().split(".")
    target = data
    for part in parts[:-1]:
        node = target.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        target = node
    target[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
