"""The nightly job's training data: which ingested batches it trains on, and the hold-out it validates on.

Everything is decided from what each micro-batch recorded when its events were appended (its number,
its row count, its first and last event time: the guarded commits' facts), not by scanning the events:

- the *anchor* is the newest event time ingested (an event cannot push it: the nearline job
  quarantines times more than ``events.max_future_minutes`` after their ingestion);
- the window is the ``nightly.window_days`` before the anchor;
- the training batches are the longest prefix of ingested batches whose events all precede the
  hold-out (the last ``nightly.holdout_hours`` before the anchor); every later batch is the hold-out.
  The generation's cutoff is the last training batch: the nearline job replays every batch after it,
  hold-out included, so each ingested event is in the live model exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.runtime.settings import Config
from jobs.storage.ingest import FIRST_EVENT, LAST_EVENT, ROWS
from jobs.storage.store import TableStore


@dataclass(frozen=True)
class IngestedBatch:
    """What one micro-batch appended to the events table."""

    batch_id: int
    rows: int
    first_event: datetime | None
    last_event: datetime | None


@dataclass(frozen=True)
class TrainingData:
    """The window's training rows (materialised) and hold-out rows, both keyed by ``row_key``."""

    cutoff_batch_id: int
    anchor: datetime
    training: DataFrame
    holdout: DataFrame


def ingested_batches(store: TableStore, app_id: str) -> list[IngestedBatch]:
    """Every batch the events table recorded as ingested by ``app_id``, oldest first."""
    batches = {}
    for commit in store.guarded_commits("events", app_id):
        facts = commit.guard.facts
        batches.setdefault(
            commit.guard.version,
            IngestedBatch(
                commit.guard.version,
                int(facts.get(ROWS, 0)),
                _moment(facts.get(FIRST_EVENT)),
                _moment(facts.get(LAST_EVENT)),
            ),
        )
    return [batches[number] for number in sorted(batches)]


def training_cutoff(batches: list[IngestedBatch], config: Config) -> tuple[int | None, datetime | None]:
    """The last training batch (None if even the first is in the hold-out) and the anchor (None with no events)."""
    times = [batch.last_event for batch in batches if batch.last_event is not None]
    if not times:
        return None, None
    anchor = max(times)
    if config.nightly.holdout_hours == 0:
        return batches[-1].batch_id, anchor
    holdout_start = anchor - timedelta(hours=config.nightly.holdout_hours)
    cutoff = None
    for batch in batches:
        if batch.last_event is not None and batch.last_event > holdout_start:
            break
        cutoff = batch.batch_id
    return cutoff, anchor


def training_data(
    store: TableStore, batches: list[IngestedBatch], cutoff: int, anchor: datetime, config: Config
) -> TrainingData:
    """The window's rows up to ``cutoff`` (training) and after it (hold-out), read by event-date partition."""
    start = anchor - timedelta(days=config.nightly.window_days)
    last = batches[-1].batch_id
    events = store.read("events", where=f"event_date >= '{start.date().isoformat()}' AND batch_id <= {last}")
    keyed = events.where(F.col("event_time") > F.lit(start)).withColumn("row_key", F.xxhash64("event_id", "batch_id"))
    training = keyed.where(F.col("batch_id") <= cutoff).persist()
    return TrainingData(cutoff, anchor, training, keyed.where(F.col("batch_id") > cutoff))


def _moment(millis: int | None) -> datetime | None:
    return None if millis is None else datetime.fromtimestamp(millis / 1000, tz=UTC)
