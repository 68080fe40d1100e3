"""The streaming sources a job reads: landing files, Kafka, Auto Loader or a Delta table."""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from jobs.runtime.settings import StreamConfig
from jobs.storage.landed import BINARY_FILE, FILE_COLUMNS, LandedFiles
from jobs.storage.parsing import TEXT_COLUMN


def read_stream(spark: SparkSession, stream: StreamConfig, typed_schema: StructType) -> DataFrame:
    """The configured source as a streaming frame: JSON text in a ``value`` column, or typed columns.

    ``typed_schema`` is what typed files (parquet) hold. Every source is rate limited by default
    (``stream.max_files_per_trigger``, ``stream.max_offsets_per_trigger`` for Kafka).
    """
    reader = spark.readStream
    # The rate limit each source knows; settings in stream.options win.
    limits = {
        "kafka": ("maxOffsetsPerTrigger", stream.max_offsets_per_trigger),
        "autoloader": ("cloudFiles.maxFilesPerTrigger", stream.max_files_per_trigger),
    }
    name, limit = limits.get(stream.source, ("maxFilesPerTrigger", stream.max_files_per_trigger))
    if limit is not None:
        reader = reader.option(name, limit)
    reader = reader.options(**stream.options)
    if stream.source == "kafka":
        return reader.format("kafka").load().select(F.col("value").cast("string").alias(TEXT_COLUMN))
    if stream.source == "delta":
        return reader.format("delta").load(stream.path)
    typed = stream.format == "parquet"
    if stream.source == "autoloader":
        reader = reader.format("cloudFiles").option("cloudFiles.format", "parquet" if typed else "text")
    else:
        reader = reader.format("parquet" if typed else "text")
    if typed:
        reader = reader.schema(typed_schema)
    return reader.load(stream.path)


def read_batches(spark: SparkSession, stream: StreamConfig, typed_schema: StructType) -> DataFrame:
    """:func:`read_stream`, except that typed landing files come as their paths, read per batch (:func:`batch_input`).

    A parquet file the reader cannot read then costs its own rows (quarantined whole), not the stream.
    """
    if not _landed_paths(stream):
        return read_stream(spark, stream, typed_schema)
    reader = spark.readStream.format("binaryFile").schema(BINARY_FILE)
    if stream.max_files_per_trigger is not None:
        reader = reader.option("maxFilesPerTrigger", stream.max_files_per_trigger)
    return reader.options(**stream.options).load(stream.path).select(*FILE_COLUMNS)


def batch_input(batch: DataFrame, stream: StreamConfig, typed_schema: StructType) -> DataFrame | LandedFiles:
    """A micro-batch of :func:`read_batches` as the job parses it: the frame, or the typed landing files to read."""
    return LandedFiles.of(batch, typed_schema) if _landed_paths(stream) else batch


def _landed_paths(stream: StreamConfig) -> bool:
    return stream.source == "files" and stream.format == "parquet"
