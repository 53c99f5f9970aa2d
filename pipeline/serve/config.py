"""The serve job's typed configs: the service and its request limits, apart from Ray Serve and torch so that
the help and the config checks load neither."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.settings import UserError


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may ask for."""

    max_body_bytes: int = 8 * 1024 * 1024
    """an upload or a JSON body"""
    max_pixels: int = 4096 * 4096
    """decoded size of an uploaded image (decompression bombs are refused)"""
    max_n: int = 8
    """images per generate request"""
    max_steps: int = 100
    """sampling steps per generate request"""
    max_prompt_chars: int = 1000

    def __post_init__(self):
        for name in ("max_body_bytes", "max_pixels", "max_n", "max_steps", "max_prompt_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"limits.{name} must be an integer >= 1, got {value!r}")



@dataclass(frozen=True)
class ServeConfig:
    """The service: which generation config it serves, what it browses, where it listens, its bounds."""

    config: str
    """a generation config (YAML): model, encoder, default sampling settings, storage"""
    overrides: tuple[str, ...] = ()
    """--set overrides of that config"""
    dataset: str | None = None
    """a refresh root or a finished output folder shown on GET /"""
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float | None = None
    """None: 1 when the cluster has GPUs, else 0"""
    max_batch_size: int = 8
    """score requests per batch"""
    generate_batch_samples: int = 8
    """samples per generate batch (the requests' n summed); at least limits.max_n"""
    batch_wait_s: float = 0.02
    """how long a batch waits to fill"""
    limits: ServeLimits = field(default_factory=ServeLimits)

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise UserError(f"port must be in 1..65535, got {self.port}")
        if self.replicas < 1 or self.max_batch_size < 1:
            raise UserError("replicas and max_batch_size must be >= 1")
        if self.cpus_per_replica < 0 or self.batch_wait_s < 0:
            raise UserError("cpus_per_replica and batch_wait_s must be >= 0")
        if self.generate_batch_samples < self.limits.max_n:
            raise UserError(f"generate_batch_samples ({self.generate_batch_samples}) must be >= max_n "
                             f"({self.limits.max_n}): a request of max_n samples must fit one generate batch")
