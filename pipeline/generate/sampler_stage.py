"""The GPU stage: a callable class that Ray Data runs on an actor pool.

Models load once in ``__init__``; ``__call__`` maps a batch of sample rows (the manifest's index ranges
expanded, pipeline/generate/work.py) to output rows, each with its sample index for the sink, with
the images already PNG-encoded, so raw arrays never travel through the object store. A sample that
fails (an exception, a non-finite image or score) is recorded under ``_failures/<bucket>/`` with its error
and left out of the output; it is retried on the next run of the same config. With
``output.retry_unguided`` a sample that fails under guidance is first sampled again without it
(same seed), and its row says method "unguided".
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import torch
from diffusers.utils import logging as diffusers_logging

from guidance import DiffusionModel, JepaEncoder, WorkItem, generate, load_encoder, load_model
from guidance.encoders import one_line
from guidance.generate import GeneratedSample
from guidance.lpips import shared_lpips
from guidance.methods import SamplingConfig, lpips_folder
from pipeline.generate.config import GenerateConfig
from pipeline.images import png_bytes
from pipeline.schema import FAILURES_DIR, SAMPLE_INDEX, SAMPLER_SCHEMA, bucket_of
from pipeline.settings import ConfigError
from pipeline.storage import resolve, write_bytes

log = logging.getLogger(__name__)


def load_models(config: GenerateConfig, device: str) -> tuple[DiffusionModel, JepaEncoder]:
    """The config's diffusion model and encoder, on ``device`` (the encoder branch in fp32), and the method's LPIPS
    when it has one (kept by ``shared_lpips`` for every batch's method)."""
    model = load_model(
        config.model.preset, config.model.source, variant=config.model.variant,
        unet_weights=config.model.unet_weights, dtype=config.model.torch_dtype(device), device=device,
        compile_network=config.model.compile, guidance_decoder=config.model.guidance_decoder,
    )
    encoder = load_encoder(config.encoder.name, config.encoder.weights, input_size=config.encoder.input_size,
                           output=config.encoder.output)
    folder = lpips_folder(config.sampling)
    if folder is not None:
        shared_lpips(folder, model.device)
    return model, encoder.to(device)


class SampleGenerator:
    """Sample rows (pyarrow, SAMPLE_SCHEMA) -> output rows (pyarrow, SAMPLER_SCHEMA)."""

    def __init__(self, config: GenerateConfig, run_id: str, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        diffusers_logging.disable_progress_bar()  # diffusers' loading bars are noise in a worker's log
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.config = config
        self.run_id = run_id
        self.failures = resolve(config.output.uri, config.storage).child(FAILURES_DIR)
        guides = config.sampling.guides
        self.unguided = replace(config.sampling, method="unguided") if config.output.retry_unguided and guides else None
        # A load error is raised by the first call, not here: Ray passes a task's exception to the driver,
        # which reports it in one line, but an actor constructor's only as traceback text.
        self.load_error: ConfigError | None = None
        try:
            self.model, self.encoder = load_models(config, device)
        except Exception as error:
            self.load_error = ConfigError(
                f"the sampler could not load its models (model.source {config.model.source}, encoder.weights "
                f"{config.encoder.weights}; truncated, corrupted or not weights-only?): "
                f"{type(error).__name__}: {one_line(error)}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.load_error is not None:
            raise self.load_error
        rows = batch.to_pylist()
        items = [WorkItem(row["seed"], row["class_label"], row["prompt"]) for row in rows]
        try:
            outcomes = list(generate(self.model, items, self.config.sampling, self.encoder))
        except Exception as error:  # one bad row must not sink its batch: retry the rows one by one
            log.warning("batch of %d failed (%s); retrying its rows one at a time", len(rows), error)
            outcomes = [self._one(item, self.config.sampling) for item in items]
        created = datetime.now(timezone.utc)
        kept = []
        for row, item, outcome in zip(rows, items, outcomes):
            method = self.config.sampling.method
            problem = outcome if isinstance(outcome, str) else _non_finite(outcome)
            if problem and self.unguided is not None:  # output.retry_unguided: the same seed without guidance
                outcome, method = self._one(item, self.unguided), "unguided"
                retry_problem = outcome if isinstance(outcome, str) else _non_finite(outcome)
                problem = retry_problem and f"{problem}; unguided retry: {retry_problem}"
            if problem:
                self._record_failure(row, problem, created)
                continue
            kept.append(self._output_row(row, outcome, created, method))
        return pa.Table.from_pylist(kept, schema=SAMPLER_SCHEMA)

    def _one(self, item: WorkItem, sampling: SamplingConfig) -> GeneratedSample | str:
        try:
            return generate(self.model, [item], sampling, self.encoder)[0]
        except Exception as error:
            return f"{type(error).__name__}: {error}"

    def _output_row(self, row: dict, sample: GeneratedSample, created: datetime, method: str) -> dict:
        height, width = sample.image.shape[:2]
        return {
            "sample_id": row["sample_id"], "seed": row["seed"], "prompt": row["prompt"],
            "class_label": row["class_label"],
            "image": {"bytes": png_bytes(sample.image), "path": f"{row['sample_id']}.png"},
            "width": width, "height": height, "jepa_score": sample.jepa_score,
            "topk_score": sample.topk_score, "embedding": sample.embedding.tolist(), "method": method,
            "model": self.config.model.preset, "encoder": self.config.encoder.name,
            "run_id": self.run_id, "created_at": created, SAMPLE_INDEX: row[SAMPLE_INDEX],
        }

    def _record_failure(self, row: dict, error: str, created: datetime) -> None:
        record = row | {"error": error[:4000], "run_id": self.run_id, "created_at": created.isoformat()}
        write_bytes(self.failures.child(bucket_of(row[SAMPLE_INDEX]), f"{row['sample_id']}.json"),
                    json.dumps(record).encode())


def _non_finite(sample: GeneratedSample) -> str | None:
    if not math.isfinite(sample.jepa_score):
        return f"non-finite JEPA-SCORE {sample.jepa_score}"
    if not np.isfinite(sample.embedding).all():
        return "non-finite embedding"
    return None
