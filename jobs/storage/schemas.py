"""The tables' schemas (docs/tables.md), in one place.

Coefficients are name-term-value, as in the original library and Photon-ML's model
format, so a notebook reads a model with plain SQL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    DateType,
    DoubleType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from jobs.runtime.errors import SchemaMismatchError
from jobs.runtime.settings import ModelConfig

if TYPE_CHECKING:
    from jobs.storage.store import TableStore

FEATURE = StructType(
    [
        StructField("name", StringType()),
        StructField("term", StringType()),
        StructField("value", DoubleType()),
    ]
)
FEATURES = ArrayType(FEATURE)

COEFFICIENT = StructType(
    [
        StructField("name", StringType()),
        StructField("term", StringType()),
        StructField("mean", DoubleType()),
        StructField("variance", DoubleType()),
    ]
)
COEFFICIENTS = ArrayType(COEFFICIENT)

QUARANTINE = StructType(
    [
        StructField("batch_id", LongType(), False),
        StructField("payload", StringType()),
        StructField("reason", StringType(), False),
        StructField("quarantined_at", TimestampType()),
    ]
)

FIXED_EFFECT = StructType(
    [
        StructField("generation", LongType(), False),
        StructField("name", StringType(), False),
        StructField("term", StringType(), False),
        StructField("mean", DoubleType()),
        StructField("variance", DoubleType()),
        StructField("cutoff_batch_id", LongType()),
        StructField("trained_at", TimestampType()),
    ]
)

RE_PRIORS = StructType(
    [
        StructField("re_type", StringType(), False),
        StructField("entity_id", StringType(), False),
        StructField("generation", LongType(), False),
        StructField("cutoff_batch_id", LongType()),
        StructField("coefficients", COEFFICIENTS),
        StructField("rows", LongType()),
        StructField("trained_at", TimestampType()),
    ]
)

RE_STATE = StructType(
    [
        StructField("re_type", StringType(), False),
        StructField("entity_id", StringType(), False),
        StructField("generation", LongType()),
        StructField("coefficients", COEFFICIENTS),
        StructField("last_batch_id", LongType()),
        StructField("updates", LongType()),
        StructField("rows", LongType()),
        StructField("updated_at", TimestampType()),
    ]
)

METRICS = StructType(
    [
        StructField("job", StringType(), False),
        StructField("run_id", StringType(), False),
        StructField("batch_id", LongType()),
        StructField("generation", LongType()),
        StructField("status", StringType()),
        StructField("values", MapType(StringType(), DoubleType())),
        StructField("note", StringType()),
        StructField("recorded_at", TimestampType()),
    ]
)

# The fixed-effect coefficient that stands for an outside model's score (source: score_column).
SCORE_COEFFICIENT = ("__score__", "")


def bag_column(bag: str) -> str:
    """The events-table column holding feature bag ``bag``."""
    return f"features_{bag}"


def bag_arrays(bag: str) -> list[Column]:
    """The bag's features as three parallel arrays, ``names``, ``terms`` and ``values`` (empty for a missing bag)."""
    features = F.coalesce(F.col(bag_column(bag)), F.array().cast(FEATURES))
    # A field of an array of structs is an array (GetArrayStructFields): no lambda per element.
    return [
        features.getField("name").alias("names"),
        features.getField("term").alias("terms"),
        features.getField("value").alias("values"),
    ]


def feature_bags(model: ModelConfig) -> list[str]:
    """Every bag the model reads, fixed effect first, without repeats."""
    bags = [model.fixed_effect.feature_bag] + [r.feature_bag for r in model.random_effects]
    return list(dict.fromkeys(bags))


def events_schema(model: ModelConfig) -> StructType:
    """Valid events as stored: the parsed fields, one column per feature bag, the ingesting batch."""
    fields = [
        StructField("event_id", StringType(), False),
        StructField("event_time", TimestampType(), False),
        StructField("label", DoubleType(), False),
        StructField("weight", DoubleType(), False),
    ]
    fields += [StructField(r.entity_column, StringType(), False) for r in model.random_effects]
    if model.fixed_effect.source == "score_column":
        fields.append(StructField(model.fixed_effect.score_column, DoubleType(), False))
    fields += [StructField(bag_column(bag), FEATURES) for bag in feature_bags(model)]
    fields += [
        StructField("batch_id", LongType(), False),
        StructField("ingested_at", TimestampType()),
        # The partition: the nightly window and the retention read and drop whole days.
        StructField("event_date", DateType(), False),
    ]
    return StructType(fields)


def metrics_row(
    spark: SparkSession,
    job: str,
    run_id: str,
    batch_id: int | None,
    generation: int | None,
    status: str,
    values: dict[str, float],
    note: str | None,
) -> DataFrame:
    """One row of the metrics table, recorded now."""
    row = (job, run_id, batch_id, generation, status, {key: float(value) for key, value in values.items()}, note)
    return spark.createDataFrame([row], StructType(METRICS.fields[:-1])).withColumn(
        "recorded_at", F.current_timestamp()
    )


# Partition columns by table (the others are not partitioned).
PARTITIONING = {"events": ["event_date"]}


def create_tables(store: TableStore, model: ModelConfig, *, deletion_vectors: bool = False) -> None:
    """Every table of the system, created if missing (a table of another schema is refused).

    ``deletion_vectors``: the live state is created with them (Spark's Delta only): its MERGE then
    rewrites no file, whatever the state's size.
    """
    state = {"delta.enableDeletionVectors": "true"} if deletion_vectors else {}
    for name, schema in table_schemas(model).items():
        properties = state if name == "re_state" else {}
        try:
            store.create(name, schema, partition_by=PARTITIONING.get(name, ()), properties=properties)
        except SchemaMismatchError as error:
            raise SchemaMismatchError(
                f"{error}. If you added or removed a random-effect type, a feature bag or the score column, stop "
                "the jobs and run: python -m jobs.migrate --config <your settings> (docs/operations.md)"
            ) from None


def table_schemas(model: ModelConfig) -> dict[str, StructType]:
    """Every table of the system by name."""
    return {
        "events": events_schema(model),
        "quarantine": QUARANTINE,
        "fixed_effect": FIXED_EFFECT,
        "re_priors": RE_PRIORS,
        "re_state": RE_STATE,
        "metrics": METRICS,
    }
