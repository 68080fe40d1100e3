"""Raw events in, valid rows and rejected rows (with their reason) out: docs/events.md.

Both jobs parse through :func:`parse_events`, so what the nightly job trains on and
what the nearline job learns from are read by the same rules. Raw input is either
JSON text (a ``value`` string column: landing files read as text, Kafka values) or
typed columns (parquet files, a Delta table).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, MapType, StringType, StructField, StructType

from jobs.config import ModelConfig
from jobs.schemas import FEATURES, bag_column, events_schema, feature_bags

CORRUPT = "_corrupt_record"
TEXT_COLUMN = "value"


@dataclass(frozen=True)
class ParsedEvents:
    """``valid`` has the events-table schema; ``rejected`` the quarantine schema."""

    valid: DataFrame
    rejected: DataFrame


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


def parse_events(raw: DataFrame, model: ModelConfig, batch_id: int) -> ParsedEvents:
    """Split raw events into valid rows (tagged with ``batch_id``) and rejected rows with a reason."""
    candidates = _from_text(raw, model) if raw.columns == [TEXT_COLUMN] else _from_columns(raw, model)
    candidates = candidates.withColumn("reason", _reason(model))
    # Among otherwise valid events sharing an id, the earliest (then the smallest payload) is the original.
    first_occurrence = Window.partitionBy("event_id", F.col("reason").isNull()).orderBy(
        F.col("event_time").asc_nulls_last(), F.col("payload")
    )
    duplicate = F.col("reason").isNull() & (F.row_number().over(first_occurrence) > 1)
    candidates = candidates.withColumn(
        "reason", F.when(duplicate, F.lit("duplicate_event_id")).otherwise(F.col("reason"))
    )
    now = F.current_timestamp()
    valid = candidates.where(F.col("reason").isNull()).select(
        *[_valid_column(field.name, model) for field in events_schema(model).fields[:-2]],
        F.lit(batch_id).cast("long").alias("batch_id"),
        now.alias("ingested_at"),
    )
    rejected = candidates.where(F.col("reason").isNotNull()).select(
        F.lit(batch_id).cast("long").alias("batch_id"),
        F.col("payload"),
        F.col("reason"),
        now.alias("quarantined_at"),
    )
    return ParsedEvents(valid, rejected)


def _from_text(raw: DataFrame, model: ModelConfig) -> DataFrame:
    schema = StructType([*raw_schema(model).fields, StructField(CORRUPT, StringType())])
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT}
    parsed = raw.select(F.col(TEXT_COLUMN).alias("payload"), F.from_json(TEXT_COLUMN, schema, options).alias("e"))
    malformed = F.col(f"e.{CORRUPT}").isNotNull() | (F.trim(F.coalesce(F.col("payload"), F.lit(""))) == "")
    return parsed.select(
        "payload",
        malformed.alias("malformed"),
        *[
            F.col(f"e.{field.name}").alias(field.name)
            for field in raw_schema(model).fields
            if field.name != "event_time"
        ],
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
    return raw.select(
        F.to_json(F.struct(*[F.col(c) for c in raw.columns])).alias("payload"),
        F.lit(False).alias("malformed"),
        *[column(field) for field in raw_schema(model).fields if field.name != "event_time"],
        time.alias("event_time"),
    )


def _reason(model: ModelConfig) -> Column:
    """The first rule of docs/events.md the event breaks, or null."""
    rules: list[tuple[Column, str]] = [
        (F.col("malformed"), "malformed_payload"),
        (_blank(F.col("event_id")), "missing_event_id"),
        (F.col("event_time").isNull(), "bad_event_time"),
        (F.col("label").isNull(), "missing_label"),
        (~_label_in_domain(model), "label_out_of_domain"),
        (F.col("weight").isNotNull() & (~_finite(F.col("weight")) | (F.col("weight") < 0)), "bad_weight"),
    ]
    rules += [(_blank(F.col(r.entity_column)), f"missing_entity_id:{r.entity_column}") for r in model.random_effects]
    if model.fixed_effect.source == "score_column":
        rules.append((~_finite(F.col(model.fixed_effect.score_column)), "missing_score"))
    bad_feature = F.lit(False)
    for bag in feature_bags(model):
        features = F.coalesce(F.col("features")[bag], F.array())
        bad_feature = bad_feature | F.exists(features, lambda f: _blank(f["name"]) | ~_finite(f["value"]))
    rules.append((bad_feature, "bad_feature"))
    reason = F.lit(None).cast("string")
    for broken, name in reversed(rules):
        reason = F.when(F.coalesce(broken, F.lit(True)), F.lit(name)).otherwise(reason)
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
            normalised = F.transform(
                features,
                lambda f: F.struct(
                    f["name"].alias("name"), F.coalesce(f["term"], F.lit("")).alias("term"), f["value"].alias("value")
                ),
            )
            return normalised.cast(FEATURES).alias(name)
    return F.col(name)


def _blank(column: Column) -> Column:
    return column.isNull() | (F.trim(column) == "")


def _finite(column: Column) -> Column:
    return column.isNotNull() & ~F.isnan(column) & (F.abs(column) != float("inf"))
