"""The label join's records: impressions and clicks as they arrive, its state, and the labelled events it writes."""

from __future__ import annotations

from pyspark.sql.types import (
    BooleanType,
    DoubleType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from jobs.runtime.settings import ModelConfig
from jobs.storage.parsing import typed_raw_schema
from jobs.storage.schemas import METRICS, QUARANTINE

IMPRESSION = "impression"
CLICK = "click"
WATERMARKS = "watermarks"
# A click without a kind is a click.
DEFAULT_KIND = "click"

# Why an impression or a click was not joined: the quarantine table's reasons (docs/label_join.md).
MALFORMED_IMPRESSION = "malformed_impression"
DUPLICATE_IMPRESSION = "duplicate_impression"
LATE_IMPRESSION = "late_impression"
MALFORMED_CLICK = "malformed_click"
UNKNOWN_FEEDBACK = "unknown_feedback"
CLICK_BEFORE_IMPRESSION = "click_before_impression"
CLICK_AFTER_WINDOW = "click_after_window"
DUPLICATE_CLICK = "duplicate_click"
ALREADY_LABELLED = "already_labelled"
LATE_CLICK = "late_click"
ORPHAN_CLICK = "orphan_click"
# Times beyond the ingestion clock's bounds (events.max_future_minutes, events.max_age_days); the bound follows.
BAD_IMPRESSION_TIME = "bad_impression_time"
BAD_CLICK_TIME = "bad_click_time"
REASONS = (
    MALFORMED_IMPRESSION,
    BAD_IMPRESSION_TIME,
    BAD_CLICK_TIME,
    DUPLICATE_IMPRESSION,
    LATE_IMPRESSION,
    MALFORMED_CLICK,
    UNKNOWN_FEEDBACK,
    CLICK_BEFORE_IMPRESSION,
    CLICK_AFTER_WINDOW,
    DUPLICATE_CLICK,
    ALREADY_LABELLED,
    LATE_CLICK,
    ORPHAN_CLICK,
)


def payload_fields(model: ModelConfig) -> list[StructField]:
    """What an impression carries into its labelled event: the entity ids, the outside score, the feature bags."""
    skipped = {"event_id", "event_time", "label", "weight"}
    return [field for field in typed_raw_schema(model).fields if field.name not in skipped]


def impression_json_schema(model: ModelConfig) -> StructType:
    """An impression as JSON holds it (the time as text; parsed after)."""
    head = [StructField("impression_id", StringType()), StructField("impression_time", StringType())]
    return StructType([*head, *payload_fields(model)])


def impression_typed_schema(model: ModelConfig) -> StructType:
    """An impression as typed files (parquet) hold it."""
    head = [StructField("impression_id", StringType()), StructField("impression_time", TimestampType())]
    return StructType([*head, *payload_fields(model)])


CLICK_JSON = StructType(
    [
        StructField("impression_id", StringType()),
        StructField("click_time", StringType()),
        StructField("kind", StringType()),
    ]
)
CLICK_TYPED = StructType(
    [
        StructField("impression_id", StringType()),
        StructField("click_time", TimestampType()),
        StructField("kind", StringType()),
    ]
)


def arrivals_schema(model: ModelConfig) -> StructType:
    """Both streams in one frame, as ``foreachBatch`` sees them: one row per impression or click.

    ``time`` is the impression's or the click's time (null if missing or not a time), ``kind`` the
    click's kind (null for an impression), ``payload`` the record as received (JSON text), and
    ``malformed`` whether it could not be read at all.
    """
    return StructType(
        [
            StructField("stream", StringType(), False),
            StructField("impression_id", StringType()),
            StructField("time", TimestampType()),
            StructField("kind", StringType()),
            *payload_fields(model),
            StructField("payload", StringType()),
            StructField("malformed", BooleanType(), False),
        ]
    )


def pending_schema(model: ModelConfig) -> StructType:
    """The join's state, one table (so that a micro-batch moves it in one commit).

    ``record`` is ``impression`` (pending while ``label`` is null, else remembered with its label and
    what gave it: ``kind`` null for a window that closed), ``click`` (waiting for its impression:
    ``time``, ``kind``, ``payload``), or the single ``watermarks`` row.
    """
    return StructType(
        [
            StructField("record", StringType(), False),
            StructField("impression_id", StringType()),
            StructField("time", TimestampType()),
            StructField("kind", StringType()),
            StructField("label", DoubleType()),
            StructField("arrived_batch_id", LongType()),
            StructField("labelled_batch_id", LongType()),
            StructField("payload", StringType()),
            *payload_fields(model),
            StructField("impressions_watermark", TimestampType()),
            StructField("clicks_watermark", TimestampType()),
        ]
    )


LINEAGE = [
    StructField("feedback", StringType()),
    StructField("feedback_time", TimestampType()),
    StructField("label_batch_id", LongType(), False),
    StructField("labelled_at", TimestampType()),
]


def labelled_schema(model: ModelConfig) -> StructType:
    """Labelled events: the typed event columns the nearline job parses (``typed_raw_schema``), then lineage.

    ``feedback`` is the kind of feedback that labelled the impression (null: its window closed
    without any), ``feedback_time`` its time, ``label_batch_id`` the join's micro-batch.
    """
    return StructType([*typed_raw_schema(model).fields, *LINEAGE])


def label_join_tables(model: ModelConfig, output: str, pending: str, quarantine: str, metrics: str) -> dict:
    """The label join's tables by name: its output, its state, its quarantine and its metrics."""
    return {
        output: labelled_schema(model),
        pending: pending_schema(model),
        quarantine: QUARANTINE,
        metrics: METRICS,
    }
