"""Ingestion of one micro-batch: parse, append the valid events and quarantine the rest, each write guarded."""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame

from jobs.config import Config
from jobs.events import parse_events
from jobs.faults import crash_point
from jobs.tables import Guard, TableStore


@dataclass(frozen=True)
class Ingested:
    """The batch's valid events (as appended, materialised) and how many rows went where."""

    events: DataFrame
    valid: int
    quarantined: int


def ingest_batch(store: TableStore, config: Config, raw: DataFrame, batch_id: int) -> Ingested:
    """Append the batch's valid events and its rejected ones, at most once per ``batch_id``."""
    guard = Guard(config.nearline.app_id, batch_id)
    parsed = parse_events(raw, config.model, batch_id)
    # Parsed once: the appends and the updates after them read the same rows.
    valid = parsed.valid.localCheckpoint(eager=True)
    rejected = parsed.rejected.localCheckpoint(eager=True)
    store.append("quarantine", rejected, guard=guard)
    store.append("events", valid, guard=guard)
    crash_point("nearline:after_events_append")
    return Ingested(valid, valid.count(), rejected.count())
