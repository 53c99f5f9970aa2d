"""The one clock every benchmark uses: wall seconds of a call, a GPU synchronised on both ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize() -> None:
    """Wait for queued GPU work, so a timing covers it (nothing to wait for on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(``function(*args, **kwargs)``, its wall seconds)."""
    synchronize()
    start = time.perf_counter()
    result = function(*args, **kwargs)
    synchronize()
    return result, time.perf_counter() - start


def speedups(rows: list[dict], seconds_key: str, reference: str) -> list[dict]:
    """Set each row's ``speedup_vs_reference``: the ``reference`` variant's ``seconds_key`` over the row's."""
    base = next(row[seconds_key] for row in rows if row["variant"] == reference)
    for row in rows:
        row["speedup_vs_reference"] = base / row[seconds_key]
    return rows
