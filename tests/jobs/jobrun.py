"""Running the jobs as real processes, and comparing tables row for row."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from jobs.runtime.faults import CRASH_VARIABLE
from jobs.runtime.settings import Config, config_to_dict

ROOT = Path(__file__).resolve().parents[2]
# Wall-clock columns, timings and the stream's id (the query id in the checkpoint): they differ between any
# two runs by nature.
WALL_CLOCK = {"ingested_at", "quarantined_at", "updated_at", "recorded_at", "trained_at", "run_id"}


def write_config(folder: Path, config: Config) -> Path:
    """The settings as a YAML file a job process reads."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return path


def run_job(
    module: str,
    config_path: Path,
    *,
    crash_at: str | None = None,
    extra: Sequence[str] = (),
    environment: dict[str, str] | None = None,
    timeout: float = 600,
):
    """``python -m <module> --config <path> [extra ...]`` in a fresh process; the crash point set only if asked."""
    environment = {key: value for key, value in {**os.environ, **(environment or {})}.items() if key != CRASH_VARIABLE}
    if crash_at:
        environment[CRASH_VARIABLE] = crash_at
    return subprocess.run(
        [sys.executable, "-m", module, "--config", str(config_path), *extra],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
        cwd=ROOT,
        timeout=timeout,
    )


# How a stream beside another on the same tables is refused: a batch number the other took, or its half-written batch.
REFUSALS = ("ConcurrentWriterError", "HalfWrittenBatchError")


def run_side_by_side(module: str, configs: dict[str, Path], stagger: float = 3.0, restarts: int = 8) -> None:
    """``python -m <module>`` on each config at once (started ``stagger`` s apart), each started again as a scheduler
    would while it fails (refusals stop once the other stream ends). Each must end with exit 0, and every run
    before that must have stopped with one of the :data:`REFUSALS`."""
    runs: dict[str, list[subprocess.CompletedProcess]] = {name: [] for name in configs}

    def until_done(name: str) -> None:
        for _ in range(restarts):
            runs[name].append(run_job(module, configs[name]))
            if runs[name][-1].returncode == 0:
                return

    threads = [threading.Thread(target=until_done, args=(name,)) for name in configs]
    for index, thread in enumerate(threads):
        if index:
            time.sleep(stagger)
        thread.start()
    for thread in threads:
        thread.join()
    for name, processes in runs.items():
        assert processes[-1].returncode == 0, (name, processes[-1].stderr[-3000:])
        for failed in processes[:-1]:
            assert any(refusal in failed.stderr for refusal in REFUSALS), (name, failed.stderr[-3000:])


def rows(frame, sort_by: list[str]) -> list[dict]:
    """A table's rows without wall-clock columns, in a stable order, timing figures left out of metric maps."""
    kept = [column for column in frame.columns if column not in WALL_CLOCK]
    result = []
    for row in frame.select(*kept).orderBy(*sort_by).collect():
        record = row.asDict(recursive=True)
        if isinstance(record.get("values"), dict):
            record["values"] = {k: v for k, v in record["values"].items() if not k.startswith("seconds.")}
        result.append(record)
    return result


def same_rows(left: list[dict], right: list[dict], rel: float = 0.0) -> bool:
    """Equal row for row; floats equal to ``rel`` (0: exactly)."""
    return len(left) == len(right) and all(_same(a, b, rel) for a, b in zip(left, right, strict=True))


def _same(a, b, rel: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=rel * 1e-3)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rel) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y, rel) for x, y in zip(a, b, strict=True))
    return a == b
