"""Where a dataset came from, in one place: the model and encoder (names, sha256 digests of their weights files,
the licence their folders state), the config digest, the filter rule, the date, the package versions and the
MLflow run. Generation builds these facts once per run into ``_run.json``; a curation (filter, refresh, the demo's
rarest) takes its run's and adds its own; every dataset card renders them (``provenance_lines``).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import yaml

from pipeline.schema import RUN_FILE

PACKAGES = ("jepa-minority", "torch", "diffusers", "timm", "ray", "pyarrow", "mlflow")  # the versions a dataset names
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")  # the files whose bytes are the weights
LICENCE_FILES = ("model_index.json", "config.json")  # JSON configs whose "license" (top level or pretrained_cfg) counts
CHUNK = 1 << 22  # bytes hashed per read
NOT_STATED = "not stated"


def package_versions() -> dict[str, str]:
    """The installed version of each of PACKAGES."""
    return {name: version(name) for name in PACKAGES}


def now() -> str:
    """The date and time facts are stamped with: ISO 8601, UTC."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def config_digest(config: dict) -> str:
    """sha256 of the resolved config as canonical JSON (sorted keys): equal digests, equal configs."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while block := stream.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(source: str | None) -> str:
    """sha256 of a local weights file (as ``sha256sum`` prints it), or of a folder's weights files: of their
    ``sha256sum`` listing (digest, two spaces, path below the folder; one line each, sorted by path). A hub id (or
    none given: the preset's) says it is not hashed."""
    path = Path(source).expanduser() if source else None
    if path is None or not path.exists():
        return f"not hashed ({source or 'the preset'} is not a local file or folder)"
    if path.is_file():
        return f"sha256:{_sha256(path)}"
    files = sorted(file for file in path.rglob("*") if file.is_file() and file.suffix in WEIGHTS_SUFFIXES)
    listing = "".join(f"{_sha256(file)}  {file.relative_to(path)}\n" for file in files)
    return f"sha256:{hashlib.sha256(listing.encode()).hexdigest()}" if files else "no weights files"


def licence(source: str | None) -> str:
    """The licence a model folder states: ``license`` in its model_index.json / config.json (top level or timm's
    ``pretrained_cfg``), else in its README.md front matter; NOT_STATED otherwise, or when none of them parses
    (the card never fails a finished run)."""
    folder = Path(source).expanduser() if source else None
    if folder is None or not folder.is_dir():
        return NOT_STATED
    try:
        for name in LICENCE_FILES:
            if (folder / name).is_file():
                config = json.loads((folder / name).read_text())
                stated = config.get("license") or config.get("pretrained_cfg", {}).get("license")
                if stated:
                    return str(stated)
        readme = folder / "README.md"
        if readme.is_file() and readme.read_text().startswith("---\n"):
            front = yaml.safe_load(readme.read_text().split("---\n", 2)[1]) or {}
            if front.get("license"):
                return str(front["license"])
    except (OSError, ValueError, yaml.YAMLError) as error:
        return f"{NOT_STATED} ({type(error).__name__} reading {folder})"
    return NOT_STATED


def mlflow_run(tracker) -> dict:
    """Where a job's MLflow run is (a ``pipeline.tracking.RunTracker``): run id, store and experiment."""
    return {"run_id": tracker.run_id, "tracking_uri": tracker.tracking.tracking_uri,
            "experiment": tracker.tracking.experiment}


def generation_provenance(config: dict, manifest_digest: str, mlflow: dict) -> dict:
    """A generation run's facts from its resolved ``config`` (plain data): model and encoder with their weights'
    digests and licences (the weights are read once, here), config and manifest digests, versions, date and
    its MLflow run (``mlflow_run``)."""
    model, encoder = config["model"], config["encoder"]
    source = model.get("source")
    unet = {"unet_weights": weights_digest(model["unet_weights"])} if model.get("unet_weights") else {}
    return {
        "model": {"name": model["preset"], "source": source or "the preset's hub id",
                  "weights": weights_digest(source), **unet, "licence": licence(source)},
        "encoder": {"name": encoder["name"], "source": encoder["weights"], "weights": weights_digest(encoder["weights"]),
                    "licence": licence(encoder["weights"])},
        "config_digest": config_digest(config), "manifest_digest": manifest_digest,
        "date": now(), "versions": package_versions(), "mlflow": mlflow,
    }


def curation_provenance(generation: dict, rule: dict, mlflow: dict) -> dict:
    """A curated set's facts: its generation run's (``generation``, that run's ``_run.json``: model, encoder,
    digests; a run written before these records has none, and says so), the rule, and this curation's date,
    versions and MLflow run (its generation's run kept beside it)."""
    made = generation.get("provenance") or {"mlflow": {"run_id": generation.get("last_run_id")}}
    return made | {"rule": rule, "date": now(), "versions": package_versions(),
                   "mlflow": mlflow | {"generation_run_id": made["mlflow"].get("run_id")}}


def provenance_lines(facts: dict) -> list[str]:
    """The facts as the card's lines, one subject each."""
    model, encoder, mlflow = facts.get("model"), facts.get("encoder"), facts["mlflow"]
    lines = [
        f"model: {model['name']} from {model['source']}; weights {model['weights']}"
        + (f"; UNet weights {model['unet_weights']}" if "unet_weights" in model else "") + f"; licence: {model['licence']}",
        f"encoder: {encoder['name']} from {encoder['source']}; weights {encoder['weights']}; "
        f"licence: {encoder['licence']}",
        f"config digest: sha256:{facts['config_digest']}; manifest digest: {facts['manifest_digest']}",
    ] if model else [f"model, encoder and config: not recorded (the generation run's {RUN_FILE} predates these records)"]
    if "rule" in facts:
        lines.append(f"filter rule: {json.dumps(facts['rule'], sort_keys=True)}")
    run = f"MLflow run {mlflow.get('run_id')} in experiment {mlflow.get('experiment')!r} of {mlflow.get('tracking_uri')}"
    lines += [run + (f" (generation run {mlflow['generation_run_id']})" if mlflow.get("generation_run_id") else ""),
              f"made {facts['date']} with " + ", ".join(f"{name} {v}" for name, v in facts["versions"].items())]
    return lines
