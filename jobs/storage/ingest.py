"""Ingestion of one micro-batch: parse, append the valid events and quarantine the rest, each write guarded.

An event whose id the events table already holds (from an earlier batch, within the lookback) is
quarantined as ``duplicate_event_id:batch <n>``, ``n`` the batch that had it first: a producer's retry
or a file landed twice is learnt once. A typed landing file the reader cannot read is one quarantine
row, ``unreadable_file:<path>: <the reader's error>``, its path and size the payload.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType

from jobs.runtime.faults import crash_point
from jobs.runtime.settings import Config
from jobs.storage.landed import LandedFiles, UnreadableFile
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
    unreadable_files: int = 0  # counted in ``quarantined``, one row each


def ingest_batch(
    store: TableStore,
    config: Config,
    raw: DataFrame | LandedFiles,
    batch_id: int,
    guard: Guard | None = None,
    ingested: datetime | None = None,
) -> Ingested:
    """Append the batch's valid events and its rejected ones, at most once per ``batch_id``.

    ``raw`` is the batch's raw events, or the typed landing files holding them. ``guard`` (default:
    the nearline job's, version ``batch_id``) is recorded with both writes, the quarantine's first (the batch's
    claim on its number, if the guard is one);
    ``ingested`` (default: now) is the time event times are judged against.
    """
    guard = guard or Guard(config.nearline.app_id, batch_id)
    ingested = ingested or datetime.now(UTC)

    def classify(frame: DataFrame) -> ClassifiedEvents:
        return classify_events(frame, config.model, config.events, ingested)

    unreadable: list[UnreadableFile] = []
    if isinstance(raw, LandedFiles):
        events, unreadable = raw.parsed(classify)
    else:
        events = classify(raw)
    classified = _seen_before(store, config, events, batch_id)
    parsed = split_events(classified, config.model, batch_id)
    totals = classified.agg(
        F.count("*").alias("all"),
        F.count(F.when(F.col("reason").isNull(), 1)).alias("valid"),
        F.min(F.when(F.col("reason").isNull(), F.col("event_time"))).alias("first"),
        F.max(F.when(F.col("reason").isNull(), F.col("event_time"))).alias("last"),
    ).first()
    rejected = parsed.rejected
    if unreadable:
        rejected = rejected.unionByName(_unreadable_rows(store, unreadable, batch_id))
    store.append("quarantine", rejected, guard=guard)
    facts = {ROWS: totals.valid, FIRST_EVENT: _millis(totals.first), LAST_EVENT: _millis(totals.last)}
    store.append("events", parsed.valid, guard=replace(guard, facts={**guard.facts, **facts}, claim=False))
    crash_point("nearline:after_events_append", batch_id)
    quarantined = totals.all - totals.valid + len(unreadable)
    return Ingested(parsed.valid, totals.valid, quarantined, totals.first, totals.last, len(unreadable))


def _unreadable_rows(store: TableStore, files: list[UnreadableFile], batch_id: int) -> DataFrame:
    """One quarantine row per file: its path and size as the payload, the reader's error in the reason."""
    schema = StructType(
        [StructField("path", StringType()), StructField("bytes", LongType()), StructField("reason", StringType())]
    )
    rows = [(file.path, file.bytes, f"unreadable_file:{file.path}: {file.error}") for file in files]
    return store.spark.createDataFrame(rows, schema).select(
        F.lit(batch_id).cast("long").alias("batch_id"),
        F.to_json(F.struct("path", "bytes")).alias("payload"),
        F.col("reason"),
        F.current_timestamp().alias("quarantined_at"),
    )


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
