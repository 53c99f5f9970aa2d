"""Where the benchmarks read and write: the demo models trained here, and one JSON file per result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DIGITS_DDPM = ROOT / "models" / "digits-ddpm"  # the demo's class-conditional DDPM (jobs/train_demo_models.py)
DIGITS_ENCODER = ROOT / "models" / "digits-sigreg-vit"  # the demo world prior, a SIGReg ViT loaded at 56 px
RESULTS = ROOT / "benchmarks" / "results"


def write_json(path: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as indented JSON at ``path`` (its folder made when missing); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
