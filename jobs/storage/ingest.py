"""Ingestion of one micro-batch: parse, append the valid events and quarantine the rest, each write guarded.

An event whose id the events table already holds (from an earlier batch, within the lookback) is
quarantined as ``duplicate_event_id:batch <n>``, ``n`` the batch that had it first: a producer's retry
or a file landed twice is learnt once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.runtime.faults import crash_point
from jobs.runtime.settings import Config
from jobs.storage.parsing import ClassifiedEvents, classify_events, split_events
from jobs.storage.store import Guard, TableStore

# What a guarded events append records about its batch (the nightly job reads it back from the history).
FIRST_EVENT, LAST_EVENT, ROWS = "first_event", "last_event", "rows"


@dataclass(frozen=True)
class Ingested:
    """The batch's valid events (a projection of the materialised, classified batch) and their counts."""

    events: DataFrame
    valid: int
    quarantined: int
    first_event: datetime | None
    last_event: datetime | None


def ingest_batch(
    store: TableStore,
    config: Config,
    raw: DataFrame,
    batch_id: int,
    guard: Guard | None = None,
    ingested: datetime | None = None,
) -> Ingested:
    """Append the batch's valid events and its rejected ones, at most once per ``batch_id``.

    ``guard`` (default: the nearline job's, version ``batch_id``) is recorded with both writes,
    the quarantine's first; ``ingested`` (default: now) is the time event times are judged against.
    """
    guard = guard or Guard(config.nearline.app_id, batch_id)
    ingested = ingested or datetime.now(UTC)
    classified = _seen_before(store, config, classify_events(raw, config.model, config.events, ingested), batch_id)
    parsed = split_events(classified, config.model, batch_id)
    totals = classified.agg(
        F.count("*").alias("all"),
        F.count(F.when(F.col("reason").isNull(), 1)).alias("valid"),
        F.min(F.when(F.col("reason").isNull(), F.col("event_time"))).alias("first"),
        F.max(F.when(F.col("reason").isNull(), F.col("event_time"))).alias("last"),
    ).first()
    store.append("quarantine", parsed.rejected, guard=guard)
    facts = {ROWS: totals.valid, FIRST_EVENT: _millis(totals.first), LAST_EVENT: _millis(totals.last)}
    store.append("events", parsed.valid, guard=Guard(guard.app_id, guard.version, {**guard.facts, **facts}))
    crash_point("nearline:after_events_append", batch_id)
    return Ingested(parsed.valid, totals.valid, totals.all - totals.valid, totals.first, totals.last)


def _seen_before(store: TableStore, config: Config, classified: ClassifiedEvents, batch_id: int) -> DataFrame:
    """Valid events whose id an earlier batch ingested within the lookback, marked as duplicates of that batch."""
    if classified.earliest_valid is None:
        return classified.frame
    lookback = config.events.duplicate_lookback_days
    days = config.nightly.window_days if lookback is None else lookback
    since = (classified.earliest_valid - timedelta(days=days)).date().isoformat()
    # This batch's own rows (written before a crash, if any) are not earlier ones.
    earlier = store.read("events", where=f"event_date >= '{since}' AND batch_id <> {int(batch_id)}")
    # Only this batch's ids are looked up: the lookback's events are scanned, not aggregated.
    ids = classified.frame.where(F.col("reason").isNull()).select("event_id")
    earlier = earlier.select("event_id", "batch_id").join(F.broadcast(ids), "event_id", "left_semi")
    first = earlier.groupBy("event_id").agg(F.min("batch_id").alias("_first_batch"))
    repeated = F.col("reason").isNull() & F.col("_first_batch").isNotNull()
    reason = F.when(repeated, F.concat(F.lit("duplicate_event_id:batch "), F.col("_first_batch").cast("string")))
    # Broadcast: a batch's repeated ids are few.
    marked = classified.frame.join(F.broadcast(first), "event_id", "left")
    return (
        marked.withColumn("reason", reason.otherwise(F.col("reason"))).drop("_first_batch").localCheckpoint(eager=True)
    )


def _millis(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)
