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
    (``stream.max_files_per_trigger``, ``stream.max_offsets_per_trigger`` for Kafka), and by size
    if ``stream.max_bytes_per_trigger`` is set.
    """
    reader = spark.readStream.options(**_rate_limits(stream)).options(**stream.options)
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
    return reader.options(**_rate_limits(stream)).options(**stream.options).load(stream.path).select(*FILE_COLUMNS)


def batch_input(batch: DataFrame, stream: StreamConfig, typed_schema: StructType) -> DataFrame | LandedFiles:
    """A micro-batch of :func:`read_batches` as the job parses it: the frame, or the typed landing files to read."""
    return LandedFiles.of(batch, typed_schema) if _landed_paths(stream) else batch


def _rate_limits(stream: StreamConfig) -> dict[str, str]:
    """The source's options bounding a batch (settings in ``stream.options`` win, being set after)."""
    if stream.source == "kafka":
        limits = {"maxOffsetsPerTrigger": stream.max_offsets_per_trigger}
    elif stream.source == "autoloader":
        limits = {
            "cloudFiles.maxFilesPerTrigger": stream.max_files_per_trigger,
            "cloudFiles.maxBytesPerTrigger": stream.max_bytes_per_trigger,
        }
    elif stream.source == "delta":
        limits = {
            "maxFilesPerTrigger": stream.max_files_per_trigger,
            "maxBytesPerTrigger": stream.max_bytes_per_trigger,
        }
    elif stream.max_bytes_per_trigger is not None:
        # Spark's file source refuses both bounds at once: the size bound replaces the count.
        limits = {"maxBytesPerTrigger": stream.max_bytes_per_trigger}
    else:
        limits = {"maxFilesPerTrigger": stream.max_files_per_trigger}
    return {name: str(limit) for name, limit in limits.items() if limit is not None}


def _landed_paths(stream: StreamConfig) -> bool:
    return stream.source == "files" and stream.format == "parquet"
