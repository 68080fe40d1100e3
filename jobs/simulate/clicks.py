"""Impressions and clicks on two streams, with the truth behind them: what the label join reads.

The impressions are the events of the simulated stream (``jobs.simulate.population``: the same spec
and seed give the same entities, features and times as ``jobs.generate``), without label or weight.
An impression whose simulated label is 1 is clicked, once, after a delay drawn from
``ClickSpec.delay`` (log-normal around ``median_delay_minutes`` with shape ``delay_sigma``, or
exponential with that median): its tail runs past any attribution window. On top of that:

- a share ``duplicate_rate`` of the clicks is sent twice, the copy up to a minute after the original;
- ``orphan_rate`` clicks per click name an impression that does not exist (``orphan-<n>``), at times
  spread over the impressions' span;
- a share ``late_rate`` of the clicked impressions have their click (and its copy) delivered
  ``late_minutes`` after it happened, instead of at once.

A click is delivered in the clicks file of the slice its delivery time falls in; the clicks
stream runs ``trailing_slices`` slices past the last impression, and a click delivered later than
that is not written (the truth says so). Impressions are in time order in their files,
clicks in delivery order; every file appears at once (written under a dot-name, then renamed), and
the files' modification times rise with their slice (a file source takes them in that order)::

    out_dir/impressions/part-00000.json, ...  JSON lines: impression_id, impression_time, the entity ids, features
    out_dir/clicks/part-00000.json, ...       JSON lines: impression_id, click_time (and no kind: a click)
    out_dir/truth/impressions.parquet         impression_id, impression_time, slice, clicked, delay_minutes
    out_dir/truth/clicks.parquet              impression_id, click_time, delivered_time, file (null: not
                                              delivered), case (click, duplicate or orphan), late
    out_dir/truth/stream.json                 both specs and the counts
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.simulate.population import SimulatedStream, iso_times, simulate
from jobs.simulate.spec import MICROS_PER_MINUTE, StreamSpec, epoch_micros, require
from jobs.simulate.writers import in_order, write_atomically, write_text

DELAYS = ("lognormal", "exponential")
# A duplicate click comes up to this long after its original.
DUPLICATE_JITTER_MICROS = 60_000_000
CASES = ("click", "duplicate", "orphan")


@dataclass(frozen=True)
class ClickSpec:
    """How clicks follow impressions; every rate and duration is checked on construction."""

    delay: str = "lognormal"
    median_delay_minutes: float = 5.0
    delay_sigma: float = 1.0
    duplicate_rate: float = 0.0
    orphan_rate: float = 0.0
    late_rate: float = 0.0
    late_minutes: float = 120.0
    trailing_slices: int = 2

    def __post_init__(self) -> None:
        if self.delay not in DELAYS:
            raise ValueError(f"delay must be one of {', '.join(DELAYS)}; got {self.delay!r}")
        for name in ("median_delay_minutes", "delay_sigma", "late_minutes"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
        for name in ("duplicate_rate", "orphan_rate", "late_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)!r}")
        require("trailing_slices", self.trailing_slices, 0)


@dataclass(frozen=True)
class ClickTruth:
    """Where the two streams and their truth are, with their counts."""

    impressions: Path
    clicks: Path
    truth: Path
    impression_files: tuple[Path, ...]
    click_files: tuple[Path, ...]
    counts: dict[str, int]

    def summary(self) -> dict[str, Any]:
        return {
            "folders": {"impressions": str(self.impressions), "clicks": str(self.clicks), "truth": str(self.truth)},
            "impression_files": len(self.impression_files),
            "click_files": len(self.click_files),
            **self.counts,
        }


@dataclass
class Clicks:
    """Every click, delivered or not, column by column (times in microseconds since the epoch)."""

    impression: np.ndarray  # the impression's index, -1 for an orphan
    orphan_number: np.ndarray  # the orphan's number, -1 for the others
    time: np.ndarray
    delivered: np.ndarray
    case: np.ndarray  # index into CASES
    late: np.ndarray


def draw_clicks(stream: SimulatedStream, spec: ClickSpec, seed: np.random.SeedSequence) -> tuple[np.ndarray, Clicks]:
    """Each impression's click delay (microseconds, -1 if never clicked) and every click."""
    rng = np.random.default_rng(seed)
    events = stream.spec.events
    clicked = np.flatnonzero(stream.labels > 0)
    median = spec.median_delay_minutes * MICROS_PER_MINUTE
    if spec.delay == "lognormal":
        draws = median * np.exp(spec.delay_sigma * rng.standard_normal(len(clicked)))
    else:
        draws = median / math.log(2.0) * rng.standard_exponential(len(clicked))
    delay = np.full(events, -1, dtype=np.int64)
    delay[clicked] = np.floor(draws).astype(np.int64)
    late = rng.random(len(clicked)) < spec.late_rate
    click_time = stream.times[clicked] + delay[clicked]
    lateness = round(spec.late_minutes * MICROS_PER_MINUTE)

    copied = rng.random(len(clicked)) < spec.duplicate_rate
    copy_time = (
        click_time[copied] + 1 + np.floor(rng.random(int(copied.sum())) * DUPLICATE_JITTER_MICROS).astype(np.int64)
    )

    orphans = int(rng.binomial(len(clicked), spec.orphan_rate)) if len(clicked) else 0
    first, last = int(stream.times[0]), int(stream.times[-1])
    orphan_time = first + np.floor(rng.random(orphans) * (last - first + 1)).astype(np.int64)

    impression = np.concatenate([clicked, clicked[copied], np.full(orphans, -1)])
    time = np.concatenate([click_time, copy_time, orphan_time])
    is_late = np.concatenate([late, late[copied], np.zeros(orphans, dtype=bool)])
    case = np.concatenate(
        [np.zeros(len(clicked), np.int8), np.ones(int(copied.sum()), np.int8), np.full(orphans, 2, np.int8)]
    )
    orphan_number = np.concatenate([np.full(len(clicked) + int(copied.sum()), -1), np.arange(orphans)])
    delivered = time + np.where(is_late, lateness, 0)
    order = np.lexsort((case, time, delivered))
    clicks = Clicks(impression[order], orphan_number[order], time[order], delivered[order], case[order], is_late[order])
    return delay, clicks


def generate_clicks(spec: StreamSpec, clicks: ClickSpec, out_dir: Path) -> ClickTruth:
    """Write the impressions of ``spec`` and their clicks under ``out_dir``, with the truth."""
    if spec.bad_event_rate > 0 or spec.format != "json" or spec.task != "logistic":
        raise ValueError("impressions and clicks are generated for a logistic JSON stream without bad events")
    out_dir = Path(out_dir)
    folders = {name: out_dir / name for name in ("impressions", "clicks", "truth")}
    for folder in folders.values():
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} is not empty; generate into a fresh folder")
        folder.mkdir(parents=True, exist_ok=True)
    # The same seeds as jobs.generate for the stream itself (spawned children depend on their index only).
    seeds = np.random.SeedSequence(spec.seed).spawn(5 + len(spec.random_effects))
    stream = simulate(spec, seeds[1:-1])
    delay, drawn = draw_clicks(stream, clicks, seeds[-1])

    slice_micros = round(spec.slice_minutes * MICROS_PER_MINUTE)
    start = epoch_micros(spec.start)
    click_slices = spec.slices + clicks.trailing_slices
    click_file = (drawn.delivered - start) // slice_micros
    delivered = click_file < click_slices
    impression_ids = np.array(stream.event_ids(0, spec.events), dtype=object)
    width = max(6, len(str(len(drawn.time))))
    click_ids = np.where(
        drawn.impression >= 0,
        impression_ids[np.maximum(drawn.impression, 0)],
        np.array([f"orphan-{n:0{width}d}" for n in drawn.orphan_number], dtype=object),
    )

    truth = folders["truth"]
    slice_of = np.searchsorted(stream.bounds, np.arange(spec.events), side="right") - 1
    impressions_table = pa.table(
        {
            "impression_id": pa.array(impression_ids.tolist(), pa.string()),
            "impression_time": pa.array(stream.times, pa.timestamp("us", tz="UTC")),
            "slice": pa.array(slice_of, pa.int32()),
            "clicked": pa.array(stream.labels > 0),
            "delay_minutes": pa.array(np.where(delay >= 0, delay / MICROS_PER_MINUTE, np.nan), from_pandas=True),
        }
    )
    clicks_table = pa.table(
        {
            "impression_id": pa.array(click_ids.tolist(), pa.string()),
            "click_time": pa.array(drawn.time, pa.timestamp("us", tz="UTC")),
            "delivered_time": pa.array(drawn.delivered, pa.timestamp("us", tz="UTC")),
            "file": pa.array(click_file.astype(np.int32), mask=~delivered),
            "case": pa.array([CASES[c] for c in drawn.case], pa.string()),
            "late": pa.array(drawn.late),
        }
    )
    write_atomically(truth / "impressions.parquet", lambda temporary: pq.write_table(impressions_table, temporary))
    write_atomically(truth / "clicks.parquet", lambda temporary: pq.write_table(clicks_table, temporary))
    counts = {
        "impressions": spec.events,
        "clicked_impressions": int((stream.labels > 0).sum()),
        "clicks": len(drawn.time),
        "clicks_delivered": int(delivered.sum()),
        "duplicate_clicks": int((drawn.case == 1).sum()),
        "orphan_clicks": int((drawn.case == 2).sum()),
        "late_clicks": int(drawn.late.sum()),
    }
    summary = {"stream": asdict(spec), "clicks": asdict(clicks), "counts": counts}
    write_text(truth / "stream.json", json.dumps(summary, indent=2) + "\n")

    impression_files = [folders["impressions"] / f"part-{index:05d}.json" for index in range(spec.slices)]
    template = _impression_template(spec)
    for index, path in enumerate(impression_files):
        write_text(path, _impression_lines(stream, template, stream.bounds[index], stream.bounds[index + 1]))
    click_files = [folders["clicks"] / f"part-{index:05d}.json" for index in range(click_slices)]
    times = iso_times(drawn.time)
    cuts = np.searchsorted(click_file, np.arange(click_slices + 1))
    for index, path in enumerate(click_files):
        lines = [
            f'{{"impression_id": "{click_ids[row]}", "click_time": "{times[row]}"}}\n'
            for row in range(cuts[index], cuts[index + 1])
        ]
        write_text(path, "".join(lines))
    in_order(impression_files)
    in_order(click_files)
    return ClickTruth(
        folders["impressions"], folders["clicks"], truth, tuple(impression_files), tuple(click_files), counts
    )


def _impression_template(spec: StreamSpec) -> str:
    """A %-format of one impression's line, as json.dumps writes its object."""
    fields = ['"impression_id": "%s"', '"impression_time": "%s"']
    fields += [f'"{random_effect.entity_column}": "%s"' for random_effect in spec.random_effects]
    bags = [
        f'"{bag}": [' + ", ".join(f'{{"name": "{bag[0]}", "term": "{j}", "value": %r}}' for j in range(width)) + "]"
        for bag, width in spec.bags.items()
    ]
    return "{" + ", ".join(fields) + ', "features": {' + ", ".join(bags) + "}}"


def _impression_lines(stream: SimulatedStream, template: str, start: int, stop: int) -> str:
    spec = stream.spec
    columns = [stream.event_ids(start, stop), iso_times(stream.times[start:stop])]
    columns += [stream.entity_ids(t, start, stop).to_pylist() for t in range(len(spec.random_effects))]
    values = np.hstack([stream.features[bag][start:stop] for bag in spec.bags]).tolist()
    return "".join(
        template % (*head, *row) + "\n" for head, row in zip(zip(*columns, strict=True), values, strict=True)
    )
