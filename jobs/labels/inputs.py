"""The label join's two input streams, read by the shared sources and put into one frame of arrivals.

Impressions (``impression_id``, ``impression_time``, the entity ids, the outside score if the model
takes one, ``features``) and clicks (``impression_id``, ``click_time``, ``kind``) come as JSON text
(landing files, Kafka, Auto Loader) or typed columns (parquet, Delta). Both become rows of
:func:`~jobs.labels.schemas.arrivals_schema`, and one query reads their union: one checkpoint
holds both streams' offsets, and each micro-batch holds what arrived on either since the last.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from jobs.labels.schemas import (
    CLICK,
    CLICK_JSON,
    CLICK_TYPED,
    DEFAULT_KIND,
    IMPRESSION,
    arrivals_schema,
    impression_json_schema,
    impression_typed_schema,
    payload_fields,
)
from jobs.runtime.settings import Config, LabelJoinConfig, LabelJoinStream, ModelConfig, StreamConfig
from jobs.storage.parsing import CORRUPT, TEXT_COLUMN
from jobs.streaming.source import read_stream


def stream_settings(stream: LabelJoinStream, join: LabelJoinConfig) -> StreamConfig:
    """One input stream as the shared sources take it, with the join's trigger and checkpoint."""
    return StreamConfig(
        source=stream.source,
        path=stream.path,
        format=stream.format,
        options=stream.options,
        trigger=join.trigger,
        processing_time=join.processing_time,
        checkpoint=join.checkpoint,
        max_files_per_trigger=stream.max_files_per_trigger,
        max_offsets_per_trigger=stream.max_offsets_per_trigger,
        max_bytes_per_trigger=stream.max_bytes_per_trigger,
    )


def read_arrivals(spark: SparkSession, config: Config) -> DataFrame:
    """Both configured streams as one streaming frame of arrivals."""
    join, model = config.label_join, config.model
    impressions = read_stream(spark, stream_settings(join.impressions, join), impression_typed_schema(model))
    clicks = read_stream(spark, stream_settings(join.clicks, join), CLICK_TYPED)
    return impressions_as_arrivals(impressions, model).unionByName(clicks_as_arrivals(clicks, model))


def impressions_as_arrivals(raw: DataFrame, model: ModelConfig) -> DataFrame:
    """Raw impressions (JSON text or typed columns) as arrivals."""
    fields = _fields(raw, impression_json_schema(model), impression_typed_schema(model))
    return _arrivals(fields, IMPRESSION, "impression_time", F.lit(None).cast("string"), model)


def clicks_as_arrivals(raw: DataFrame, model: ModelConfig) -> DataFrame:
    """Raw clicks (JSON text or typed columns) as arrivals; a click without a kind is a ``click``."""
    fields = _fields(raw, CLICK_JSON, CLICK_TYPED)
    kind = F.coalesce(F.col("kind"), F.lit(DEFAULT_KIND))
    return _arrivals(fields, CLICK, "click_time", kind, model)


def _fields(raw: DataFrame, json_schema: StructType, typed_schema: StructType) -> DataFrame:
    """The record's fields by name (the time still as text or timestamp), ``payload`` and ``malformed``."""
    if raw.columns == [TEXT_COLUMN]:
        schema = StructType([*json_schema.fields, StructField(CORRUPT, StringType())])
        options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT}
        parsed = raw.select(F.col(TEXT_COLUMN).alias("payload"), F.from_json(TEXT_COLUMN, schema, options).alias("r"))
        blank = F.trim(F.coalesce(F.col("payload"), F.lit(""))) == ""
        malformed = F.col("r").isNull() | F.col(f"r.{CORRUPT}").isNotNull() | blank
        return parsed.select(
            *[F.col(f"r.{field.name}").alias(field.name) for field in json_schema.fields],
            F.col("payload"),
            F.coalesce(malformed, F.lit(True)).alias("malformed"),
        )
    present = set(raw.columns)

    def column(field: StructField) -> Column:
        if field.name not in present:
            return F.lit(None).cast(field.dataType).alias(field.name)
        return F.col(field.name).try_cast(field.dataType).alias(field.name)

    return raw.select(
        *[column(field) for field in typed_schema.fields],
        F.to_json(F.struct(*[F.col(name) for name in raw.columns])).alias("payload"),
        F.lit(False).alias("malformed"),
    )


def _arrivals(fields: DataFrame, stream: str, time_column: str, kind: Column, model: ModelConfig) -> DataFrame:
    present = set(fields.columns)
    time = F.col(time_column)
    columns = {
        "stream": F.lit(stream),
        "impression_id": F.col("impression_id"),
        # Text is parsed as ISO-8601 (UTC without a zone); a typed time is kept.
        "time": F.try_to_timestamp(time) if dict(fields.dtypes)[time_column] == "string" else time,
        "kind": kind,
        **{
            field.name: F.col(field.name) if field.name in present else F.lit(None).cast(field.dataType)
            for field in payload_fields(model)
        },
        "payload": F.col("payload"),
        "malformed": F.col("malformed"),
    }
    schema = arrivals_schema(model)
    return fields.select(*[columns[field.name].cast(field.dataType).alias(field.name) for field in schema.fields])
