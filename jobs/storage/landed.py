"""Typed landing files (parquet) of one micro-batch, read by the job rather than by the stream's reader.

Spark's parquet reader fails on a file whose column types drifted (``member_id`` written as INT64,
``event_time`` as text) or that is not parquet at all, before any per-row check can quarantine a row,
and fails the same way on every replay of the batch. So the stream hands over the files' paths
(``binaryFile``, contents not read) and the batch reads them here: when the files cannot be read
together, each is read alone, and those that fail are set aside whole with the reader's error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import BinaryType, LongType, StringType, StructField, StructType, TimestampType

# The columns of Spark's binaryFile source; the stream selects the first and the third.
BINARY_FILE = StructType(
    [
        StructField("path", StringType()),
        StructField("modificationTime", TimestampType()),
        StructField("length", LongType()),
        StructField("content", BinaryType()),
    ]
)
FILE_COLUMNS = ("path", "length")
Parsed = TypeVar("Parsed")


@dataclass(frozen=True)
class UnreadableFile:
    """A landing file the reader could not read: its path, its size and the reader's error."""

    path: str
    bytes: int
    error: str


@dataclass(frozen=True)
class LandedFiles:
    """The typed landing files of one micro-batch (path and size, in path order) and the schema they are read with."""

    spark: SparkSession
    files: tuple[tuple[str, int], ...]
    schema: StructType

    @classmethod
    def of(cls, batch: DataFrame, schema: StructType) -> LandedFiles:
        """The files of a micro-batch of the paths stream (``jobs.streaming.source.read_batches``)."""
        rows = batch.select(*FILE_COLUMNS).collect()
        return cls(batch.sparkSession, tuple(sorted((row.path, row.length) for row in rows)), schema)

    def read(self) -> DataFrame:
        """The files' rows, typed by the schema (lazily: a file's errors show when the frame is computed)."""
        if not self.files:
            return self.spark.createDataFrame([], self.schema)
        return self.spark.read.schema(self.schema).parquet(*[path for path, _ in self.files])

    def parsed(self, parse: Callable[[DataFrame], Parsed]) -> tuple[Parsed, list[UnreadableFile]]:
        """``parse`` of the files' rows, and the files left out because they cannot be read.

        ``parse`` must compute what it returns (a materialised frame): that is when a file fails. The
        files are read alone only after the batch failed, so a batch of good files costs nothing more;
        a failure no single file shows (the storage, not a file) is raised as it came.
        """
        try:
            return parse(self.read()), []
        except Exception:  # Py4JJavaError on a classic session, a captured SparkException on Connect
            unreadable = [file for file in map(self._unreadable, self.files) if file is not None]
            if not unreadable:
                raise
        left_out = {file.path for file in unreadable}
        readable = replace(self, files=tuple(file for file in self.files if file[0] not in left_out))
        return parse(readable.read()), unreadable

    def _unreadable(self, file: tuple[str, int]) -> UnreadableFile | None:
        path, size = file
        try:
            # The noop sink computes every column, as parsing would: a count would read no column.
            self.spark.read.schema(self.schema).parquet(path).write.format("noop").mode("overwrite").save()
        except Exception as error:  # whatever the reader raises, the file is what cannot be read
            return UnreadableFile(path, size, reader_error(error))
        return None


def reader_error(error: Exception) -> str:
    """The reader's own message and its cause, without py4j's wrapper and the stack."""
    lines = [line.strip() for line in str(error).splitlines()]
    messages = [line.split("Exception: ", 1)[1] for line in lines if "Exception: " in line]
    if not messages:
        return next((line for line in lines if line), type(error).__name__)
    return messages[0] if len(messages) == 1 else f"{messages[0]} (cause: {messages[1]})"
