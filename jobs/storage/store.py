"""The table store: Delta tables under one root, read and written as Spark DataFrames.

Two adapters share one interface (and one contract test suite):

- ``DeltaRsStore`` (``jobs.storage.delta_rs``), the embedded default: delta-rs writes the tables from Arrow on the
  driver, and Spark reads a snapshot through the snapshot's own file list.
- ``SparkDeltaStore`` (``jobs.storage.spark_delta``), for clusters and Databricks: Spark's own Delta Lake (needs the
  ``io.delta:delta-spark_2.13`` jar on the classpath).

Every write can carry a :class:`Guard`, a Delta transaction id ``(app_id, version)``: the write
is made, and the transaction recorded in the same commit, only if the table has not seen that
app id at that version or later. A replayed micro-batch is thereby written at most once.

Tables are created with deletion vectors off and no column mapping (see
:data:`TABLE_PROPERTIES`) so that both engines can read and write them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructType

from jobs.runtime.errors import ConfigError, SchemaMismatchError
from jobs.runtime.session import delta_available
from jobs.runtime.settings import StorageConfig

# Set on every table at creation; delta-rs 1.6 accepts and records both (checked by the contract tests).
TABLE_PROPERTIES: Mapping[str, str] = {
    "delta.enableDeletionVectors": "false",
    "delta.columnMapping.mode": "none",
}

TABLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
DELTA_JAR_MISSING = "Spark's Delta Lake jar (io.delta:delta-spark_2.13) is not on the classpath"
# Spark's Delta takes a MERGE's transaction id from these session settings only.
TXN_APP_ID = "spark.databricks.delta.write.txnAppId"
TXN_VERSION = "spark.databricks.delta.write.txnVersion"

WriteMode = Literal["append", "overwrite"]


@dataclass(frozen=True)
class Guard:
    """A write made at most once: Delta's transaction id (app id, version)."""

    app_id: str
    version: int


@dataclass(frozen=True)
class Commit:
    """One entry of a table's history."""

    version: int
    timestamp: datetime  # UTC
    operation: str  # as the engine names it: WRITE, MERGE, CREATE TABLE, ...


class TableStore(ABC):
    """Delta tables under one root, read and written as Spark DataFrames."""

    def __init__(self, spark: SparkSession, root: str) -> None:
        self.spark = spark
        self.root = root

    def path(self, name: str) -> str:
        """The table's location: the root joined with ``name`` (a local folder or a URI)."""
        if not TABLE_NAME.fullmatch(name):
            raise ValueError(f"table name {name!r} must be letters, digits, '_', '.' or '-'")
        return f"{self.root.rstrip('/')}/{name}"

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether a Delta table is at ``path(name)``."""

    @abstractmethod
    def schema(self, name: str) -> StructType:
        """The table's current schema (with its nullability)."""

    def create(self, name: str, schema: StructType, *, properties: Mapping[str, str] | None = None) -> None:
        """Creates an empty table if there is none; refuses an existing table of another schema.

        Field names and types must match (nullability may differ). ``properties`` (Delta table
        properties: delta-rs refuses keys it does not know) are added to :data:`TABLE_PROPERTIES`,
        which cannot be overridden. Tables are never partitioned.
        """
        properties = dict(properties or {})
        for key, value in TABLE_PROPERTIES.items():
            if properties.setdefault(key, value) != value:
                raise ValueError(f"table property {key} must be {value} (both engines must read the tables)")
        if not self.exists(name):
            self._create(name, schema, properties)
            return
        difference = schema_difference(self.schema(name), schema)
        if difference is not None:
            raise SchemaMismatchError(f"table {name!r} already exists with another schema: {difference}")

    @abstractmethod
    def read(self, name: str, *, version: int | None = None) -> DataFrame:
        """The current snapshot, or the snapshot at ``version`` (time travel)."""

    def append(self, name: str, frame: DataFrame, *, guard: Guard | None = None) -> bool:
        """Adds the rows; False (and nothing written) if ``guard`` was already applied."""
        return self._guarded_write(name, frame, "append", guard, None)

    def overwrite(self, name: str, frame: DataFrame, *, guard: Guard | None = None, where: str | None = None) -> bool:
        """Replaces all rows, or those matching the SQL predicate ``where`` (every new row must match it).

        False (and nothing written) if ``guard`` was already applied.
        """
        return self._guarded_write(name, frame, "overwrite", guard, where)

    def merge(self, name: str, frame: DataFrame, keys: Sequence[str], *, guard: Guard | None = None) -> bool:
        """Upserts: rows matching on all ``keys`` get every column updated, the others are inserted.

        ``frame`` must hold at most one row per key. False (and nothing written) if ``guard``
        was already applied.
        """
        self._check_columns(name, frame)
        missing = [key for key in keys if key not in frame.columns]
        if not keys or missing:
            raise ValueError(f"merge into {name!r} needs key columns of the table; got {list(keys)}")
        if self.applied(name, guard):
            return False
        self._merge(name, frame, merge_condition(keys), guard)
        return True

    @abstractmethod
    def version(self, name: str) -> int:
        """The table's latest version."""

    @abstractmethod
    def history(self, name: str) -> list[Commit]:
        """The table's commits, oldest first."""

    @abstractmethod
    def transaction_version(self, name: str, app_id: str) -> int | None:
        """The latest version recorded for ``app_id`` in the table, None if it never wrote."""

    def applied(self, name: str, guard: Guard | None) -> bool:
        """Whether the table already holds the write ``guard`` stands for."""
        if guard is None:
            return False
        recorded = self.transaction_version(name, guard.app_id)
        return recorded is not None and recorded >= guard.version

    def _guarded_write(
        self, name: str, frame: DataFrame, mode: WriteMode, guard: Guard | None, where: str | None
    ) -> bool:
        self._check_columns(name, frame)
        if self.applied(name, guard):
            return False
        self._write(name, frame, mode, guard, where)
        return True

    def _check_columns(self, name: str, frame: DataFrame) -> None:
        expected, given = self.schema(name).fieldNames(), frame.columns
        if sorted(expected) != sorted(given):
            raise SchemaMismatchError(f"frame columns {given} do not match table {name!r} columns {expected}")

    @abstractmethod
    def _create(self, name: str, schema: StructType, properties: Mapping[str, str]) -> None: ...

    @abstractmethod
    def _write(self, name: str, frame: DataFrame, mode: WriteMode, guard: Guard | None, where: str | None) -> None: ...

    @abstractmethod
    def _merge(self, name: str, frame: DataFrame, condition: str, guard: Guard | None) -> None:
        """Merges with the target aliased ``t`` and the source ``s``."""


def open_store(spark: SparkSession, config: StorageConfig) -> TableStore:
    """The store ``config`` asks for; ``auto`` takes Spark's Delta when its jar is on the classpath."""
    has_delta = delta_available(spark)
    if config.backend == "spark-delta" and not has_delta:
        raise ConfigError(
            f"config key 'storage.backend' is spark-delta, but {DELTA_JAR_MISSING}; "
            "add it to the session (spark.jars.packages) or use backend delta-rs or auto"
        )
    # Each engine's module imports its engine's package: a cluster may have only one of them.
    if config.backend == "spark-delta" or (config.backend == "auto" and has_delta):
        from jobs.storage.spark_delta import SparkDeltaStore

        return SparkDeltaStore(spark, config.root)
    from jobs.storage.delta_rs import DeltaRsStore

    return DeltaRsStore(spark, config.root, config.storage_options)


def schema_difference(existing: StructType, wanted: StructType) -> str | None:
    """The first field whose name or type differs (nullability aside), in words; None if none does."""
    existing_types = {field.name: field.dataType.simpleString() for field in existing.fields}
    wanted_types = {field.name: field.dataType.simpleString() for field in wanted.fields}
    for field, wanted_type in wanted_types.items():
        if field not in existing_types:
            return f"field {field!r} ({wanted_type}) is not in the table"
        if existing_types[field] != wanted_type:
            return f"field {field!r} is {existing_types[field]} in the table, {wanted_type} here"
    for field, existing_type in existing_types.items():
        if field not in wanted_types:
            return f"field {field!r} ({existing_type}) is in the table but not in the schema given"
    return None


def merge_condition(keys: Sequence[str]) -> str:
    """Target ``t`` and source ``s`` equal on every key (backticks work in Spark SQL and in delta-rs)."""
    return " AND ".join(f"t.`{key}` = s.`{key}`" for key in keys)


def utc_from_millis(millis: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=millis)
