"""Raw events in, valid rows and rejected rows (with their reason) out: docs/events.md.

Both jobs parse through :func:`parse_events`, so what the nightly job trains on and
what the nearline job learns from are read by the same rules. Raw input is either
JSON text (a ``value`` string column: landing files read as text, Kafka values) or
typed columns (parquet files, a Delta table).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, MapType, StringType, StructField, StructType, TimestampType

from jobs.runtime.settings import EventsConfig, ModelConfig
from jobs.storage.schemas import FEATURES, bag_column, events_schema, feature_bags

CORRUPT = "_corrupt_record"
TEXT_COLUMN = "value"
# The batch's bounds on event times, as columns while its events are classified.
LATEST, EARLIEST = "_latest_event_time", "_earliest_event_time"
# Columns built once per Spark context or Connect session (see ``_cached``); gone with it.
_BUILT: weakref.WeakKeyDictionary[Any, dict[tuple, Any]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ParsedEvents:
    """``valid`` has the events-table schema; ``rejected`` the quarantine schema."""

    valid: DataFrame
    rejected: DataFrame


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ClassifiedEvents:
    """A batch's events with their ``reason`` (materialised), and the earliest event time of the valid ones (UTC)."""

    frame: DataFrame
    earliest_valid: datetime | None


def raw_schema(model: ModelConfig) -> StructType:
    """The fields of a raw event as read from JSON (loosely typed; validation comes after)."""
    fields = [
        StructField("event_id", StringType()),
        StructField("event_time", StringType()),
        StructField("label", DoubleType()),
        StructField("weight", DoubleType()),
    ]
    fields += [StructField(r.entity_column, StringType()) for r in model.random_effects]
    if model.fixed_effect.source == "score_column":
        fields.append(StructField(model.fixed_effect.score_column, DoubleType()))
    fields.append(StructField("features", MapType(StringType(), FEATURES)))
    return StructType(fields)


def typed_raw_schema(model: ModelConfig) -> StructType:
    """The raw fields as typed files (parquet) hold them: the event time is a timestamp."""
    return StructType(
        [StructField(f.name, TimestampType()) if f.name == "event_time" else f for f in raw_schema(model).fields]
    )


def parse_events(
    raw: DataFrame, model: ModelConfig, batch_id: int, rules: EventsConfig, ingested: datetime
) -> ParsedEvents:
    """Split raw events into valid rows (tagged with ``batch_id``) and rejected rows with a reason.

    ``ingested`` is when the batch was first ingested: event times are judged against it (the same
    time for a replay of the batch, so a replay judges every event the same way).
    """
    return split_events(classify_events(raw, model, rules, ingested).frame, model, batch_id)


def classify_events(raw: DataFrame, model: ModelConfig, rules: EventsConfig, ingested: datetime) -> ClassifiedEvents:
    """Every raw event with its parsed fields and ``reason`` (null when valid), materialised: parsing, done once."""
    text = raw.columns == [TEXT_COLUMN]
    candidates = _from_text(raw, model) if text else _from_columns(raw, model)
    latest = ingested + timedelta(minutes=rules.max_future_minutes)
    earliest = ingested - timedelta(days=rules.max_age_days)
    bounds = {
        LATEST: F.lit(latest),
        EARLIEST: F.lit(earliest),
        f"{LATEST}_text": F.lit(latest.isoformat()),
        f"{EARLIEST}_text": F.lit(earliest.isoformat()),
    }
    reason = _cached(raw.sparkSession, ("reason", model, rules), lambda: _reason(model, rules))
    candidates = candidates.withColumns(bounds).withColumn("reason", reason).drop(*bounds).localCheckpoint(eager=True)
    valid = candidates.where(F.col("reason").isNull())
    counts = valid.agg(
        F.count("*").alias("events"),
        F.countDistinct("event_id").alias("ids"),
        # Epoch microseconds, not a timestamp: PySpark hands timestamps over naive, in the driver's OS time zone.
        F.unix_micros(F.min("event_time")).alias("earliest"),
    ).first()
    earliest = None if counts.earliest is None else EPOCH + timedelta(microseconds=counts.earliest)
    if counts.events == counts.ids:
        return ClassifiedEvents(candidates, earliest)  # the usual batch: no repeated id, no sort needed
    # Among otherwise valid events sharing an id, the earliest is the original (ties: by a hash of the payload).
    first_occurrence = Window.partitionBy("event_id", F.col("reason").isNull()).orderBy(
        F.col("event_time").asc_nulls_last(), F.col("_order")
    )
    duplicate = F.col("reason").isNull() & (F.row_number().over(first_occurrence) > 1)
    marked = candidates.withColumn("reason", F.when(duplicate, F.lit("duplicate_event_id")).otherwise(F.col("reason")))
    # The earliest copy of an id stays valid: the earliest valid time is the same.
    return ClassifiedEvents(marked.localCheckpoint(eager=True), earliest)


def split_events(candidates: DataFrame, model: ModelConfig, batch_id: int) -> ParsedEvents:
    """Classified events as events-table rows and quarantine rows."""
    now = F.current_timestamp()
    stored = {
        "batch_id": F.lit(batch_id).cast("long"),
        "ingested_at": now,
        "event_date": F.to_date("event_time"),
    }
    columns = _cached(
        candidates.sparkSession,
        ("valid", model),
        lambda: {field.name: _valid_column(field.name, model).alias(field.name) for field in events_schema(model)},
    )
    valid = candidates.where(F.col("reason").isNull()).select(
        *[stored[name].alias(name) if name in stored else column for name, column in columns.items()]
    )
    # Typed input becomes JSON text only for the rows that need it: the rejected ones.
    payload = F.col("_payload") if "_payload" in candidates.columns else F.to_json(F.col("_raw"))
    rejected = candidates.where(F.col("reason").isNotNull()).select(
        F.lit(batch_id).cast("long").alias("batch_id"),
        payload.alias("payload"),
        F.col("reason"),
        now.alias("quarantined_at"),
    )
    return ParsedEvents(valid, rejected)


def _from_text(raw: DataFrame, model: ModelConfig) -> DataFrame:
    schema = StructType([*raw_schema(model).fields, StructField(CORRUPT, StringType())])
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT}
    parsed = raw.select(F.col(TEXT_COLUMN).alias("_payload"), F.from_json(TEXT_COLUMN, schema, options).alias("e"))
    malformed = F.col(f"e.{CORRUPT}").isNotNull() | (F.trim(F.coalesce(F.col("_payload"), F.lit(""))) == "")
    return parsed.select(
        "_payload",
        F.xxhash64("_payload").alias("_order"),
        malformed.alias("malformed"),
        *[F.col(f"e.{f.name}").alias(f.name) for f in raw_schema(model).fields if f.name != "event_time"],
        F.try_to_timestamp(F.col("e.event_time")).alias("event_time"),
    )


def _from_columns(raw: DataFrame, model: ModelConfig) -> DataFrame:
    """Typed input (parquet, Delta): missing optional columns read as null."""
    present = set(raw.columns)

    def column(field: StructField) -> Column:
        if field.name not in present:
            return F.lit(None).cast(field.dataType).alias(field.name)
        return F.col(field.name).try_cast(field.dataType).alias(field.name)

    time = F.col("event_time").try_cast("timestamp") if "event_time" in present else F.lit(None).cast("timestamp")
    # Maps cannot be hashed; their entries can.
    hashable = [
        F.map_entries(field.name) if isinstance(field.dataType, MapType) else F.col(field.name) for field in raw.schema
    ]
    return raw.select(
        F.struct(*[F.col(c) for c in raw.columns]).alias("_raw"),
        F.xxhash64(*hashable).alias("_order"),
        F.lit(False).alias("malformed"),
        *[column(field) for field in raw_schema(model).fields if field.name != "event_time"],
        time.alias("event_time"),
    )


def _cached(spark: SparkSession, key: tuple, build: Callable[[], Any]) -> Any:
    """``build()``, once per Spark and key: a batch's parsing rules are a few hundred columns, each built
    through a call into the JVM (about 0.5 s a batch), and they depend on the configuration alone."""
    # Classic Spark: its context, which every session object of the JVM shares (foreachBatch wraps each batch's
    # session in a new one); Spark Connect has none.
    owner = getattr(spark, "_sc", None) or spark
    built = _BUILT.setdefault(owner, {})
    if key not in built:
        built[key] = build()
    return built[key]


def _reason(model: ModelConfig, bounds: EventsConfig) -> Column:
    """The first rule of docs/events.md the event breaks, or null.

    The batch's time bounds are the columns ``LATEST`` and ``EARLIEST`` (and their ISO texts, ``_text``).
    """
    time = F.col("event_time")
    rules: list[tuple[Column, str | Column]] = [
        (F.col("malformed"), "malformed_payload"),
        (_blank(F.col("event_id")), "missing_event_id"),
        (time.isNull(), "bad_event_time"),
        (time > F.col(LATEST), F.concat(F.lit("bad_event_time:after "), F.col(f"{LATEST}_text"))),
        (time < F.col(EARLIEST), F.concat(F.lit("bad_event_time:before "), F.col(f"{EARLIEST}_text"))),
        (F.col("label").isNull(), "missing_label"),
        (~_label_in_domain(model), "label_out_of_domain"),
        (F.col("weight").isNotNull() & (~_finite(F.col("weight")) | (F.col("weight") < 0)), "bad_weight"),
        (F.coalesce(F.col("weight") > bounds.max_weight, F.lit(False)), f"bad_weight:above {bounds.max_weight:g}"),
    ]
    if model.task == "linear":
        rules.append(
            (F.abs(F.col("label")) > bounds.max_abs_label, f"label_out_of_domain:beyond {bounds.max_abs_label:g}")
        )
    rules += [(_blank(F.col(r.entity_column)), f"missing_entity_id:{r.entity_column}") for r in model.random_effects]
    if model.fixed_effect.source == "score_column":
        score = F.col(model.fixed_effect.score_column)
        rules.append((~_finite(score), "missing_score"))
        rules.append((F.abs(score) > bounds.max_abs_feature_value, "bad_score"))
    bad_feature, too_many = F.lit(False), []
    for bag in feature_bags(model):
        features = F.coalesce(F.col("features")[bag], F.array().cast(FEATURES))
        # Array functions on the fields, not a lambda per feature: this runs on every event.
        names, values = features.getField("name"), features.getField("value")
        bad_feature = (
            bad_feature
            | (F.size(F.array_compact(names)) < F.size(names))
            | F.array_contains(names, "")
            | (F.size(F.array_compact(values)) < F.size(values))
            | F.array_contains(values, float("nan"))
            | F.array_contains(values, float("inf"))
            | F.array_contains(values, float("-inf"))
            # Finite but huge values overflow the scores downstream.
            | (F.coalesce(F.array_max(values), F.lit(0.0)) > bounds.max_abs_feature_value)
            | (F.coalesce(F.array_min(values), F.lit(0.0)) < -bounds.max_abs_feature_value)
        )
        too_many.append((F.size(features) > bounds.max_features_per_bag, f"too_many_features:{bag}"))
    rules.append((bad_feature, "bad_feature"))
    rules += too_many
    reason = F.lit(None).cast("string")
    for broken, name in reversed(rules):
        text = F.lit(name) if isinstance(name, str) else name
        reason = F.when(F.coalesce(broken, F.lit(True)), text).otherwise(reason)
    return reason


def _label_in_domain(model: ModelConfig) -> Column:
    label = F.col("label")
    if model.task == "logistic":
        return label.isin(0.0, 1.0, -1.0)
    return _finite(label)


def _valid_column(name: str, model: ModelConfig) -> Column:
    """A column of the events table from a validated candidate."""
    if name == "label" and model.task == "logistic":
        return F.when(F.col("label") > 0, 1.0).otherwise(0.0).alias("label")
    if name == "weight":
        return F.coalesce(F.col("weight"), F.lit(1.0)).alias("weight")
    for bag in feature_bags(model):
        if name == bag_column(bag):
            features = F.coalesce(F.col("features")[bag], F.array().cast(FEATURES))
            terms = features.getField("term")
            # A missing term is the empty term; the lambda runs only on the (rare) bags that have one.
            normalised = F.transform(
                features,
                lambda f: F.struct(
                    f["name"].alias("name"), F.coalesce(f["term"], F.lit("")).alias("term"), f["value"].alias("value")
                ),
            )
            has_missing_term = F.size(F.array_compact(terms)) < F.size(terms)
            return F.when(has_missing_term, normalised.cast(FEATURES)).otherwise(features).alias(name)
    return F.col(name)


def _blank(column: Column) -> Column:
    return column.isNull() | (F.trim(column) == "")


def _finite(column: Column) -> Column:
    return column.isNotNull() & ~F.isnan(column) & (F.abs(column) != float("inf"))
