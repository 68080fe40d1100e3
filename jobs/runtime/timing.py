"""Seconds per step, logged and kept for the metrics row."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def timed(step: str, seconds: dict[str, float], log: logging.Logger | None = None) -> Iterator[None]:
    """Adds the step's wall time to ``seconds[step]``; logs its start and end if ``log`` is given."""
    started = time.perf_counter()
    if log is not None:
        log.info("stage %s", step)
    yield
    seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - started
    if log is not None:
        log.info("stage %s done in %.1f s", step, seconds[step])
