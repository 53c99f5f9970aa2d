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
