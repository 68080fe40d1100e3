"""Ingestion of one micro-batch: parse, append the valid events and quarantine the rest, each write guarded."""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.runtime.faults import crash_point
from jobs.runtime.settings import Config
from jobs.storage.parsing import classify_events, split_events
from jobs.storage.store import Guard, TableStore


@dataclass(frozen=True)
class Ingested:
    """The batch's valid events (a projection of the materialised, classified batch) and their counts."""

    events: DataFrame
    valid: int
    quarantined: int


def ingest_batch(store: TableStore, config: Config, raw: DataFrame, batch_id: int) -> Ingested:
    """Append the batch's valid events and its rejected ones, at most once per ``batch_id``."""
    guard = Guard(config.nearline.app_id, batch_id)
    classified = classify_events(raw, config.model)
    parsed = split_events(classified, config.model, batch_id)
    store.append("quarantine", parsed.rejected, guard=guard)
    store.append("events", parsed.valid, guard=guard)
    crash_point("nearline:after_events_append", batch_id)
    counts = classified.agg(
        F.count("*").alias("all"), F.count(F.when(F.col("reason").isNull(), 1)).alias("valid")
    ).first()
    return Ingested(parsed.valid, counts.valid, counts.all - counts.valid)
