"""The table store: Delta tables under one root, read and written as Spark DataFrames.

Two adapters share one interface (and one contract test suite):

- :class:`DeltaRsStore`, the embedded default: delta-rs writes the tables from Arrow on the
  driver, and Spark reads a snapshot through the snapshot's own file list.
- :class:`SparkDeltaStore`, for clusters and Databricks: Spark's own Delta Lake (needs the
  ``io.delta:delta-spark_2.13`` jar on the classpath).

Every write can carry a :class:`Guard`, a Delta transaction id ``(app_id, version)``: the write
is made, and the transaction recorded in the same commit, only if the table has not seen that
app id at that version or later. A replayed micro-batch is thereby written at most once.

Tables are created with deletion vectors off and no column mapping (see
:data:`TABLE_PROPERTIES`) so that both engines can read and write them.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from jobs.config import ConfigError, StorageConfig
from jobs.spark import delta_available

# deltalake and delta (delta-spark) are imported where used: a cluster may have only one of them.
if TYPE_CHECKING:
    import pyarrow as pa
    from delta.tables import DeltaTable as SparkDeltaTable
    from deltalake import CommitProperties
    from deltalake import DeltaTable as RsDeltaTable

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
            raise ValueError(f"table {name!r} already exists with another schema: {difference}")

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
            raise ValueError(f"frame columns {given} do not match table {name!r} columns {expected}")

    @abstractmethod
    def _create(self, name: str, schema: StructType, properties: Mapping[str, str]) -> None: ...

    @abstractmethod
    def _write(self, name: str, frame: DataFrame, mode: WriteMode, guard: Guard | None, where: str | None) -> None: ...

    @abstractmethod
    def _merge(self, name: str, frame: DataFrame, condition: str, guard: Guard | None) -> None:
        """Merges with the target aliased ``t`` and the source ``s``."""


class DeltaRsStore(TableStore):
    """Tables written by delta-rs (through Arrow, on the driver) and read by Spark from each snapshot's file list.

    Local roots are made absolute so that Spark and delta-rs see the same folder.
    ``storage_options`` go to every delta-rs call (object-store credentials and endpoints).
    """

    def __init__(self, spark: SparkSession, root: str, storage_options: Mapping[str, str] | None = None) -> None:
        local = "://" not in root
        # delta-rs cannot open a root with '[' or ']' (and decodes '%' in a local one); Spark would
        # expand the other characters as globs in the file paths it reads.
        if any(character in root for character in "[]{}*?\\" + ("%" if local else "")):
            raise ConfigError(f"config key 'storage.root' {root!r} must not contain any of []{{}}*?\\% for delta-rs")
        if local:
            root = os.path.abspath(root)
        super().__init__(spark, root)
        self.storage_options = dict(storage_options or {})
        self._scheme = None if local else root.partition("://")[0]

    def exists(self, name: str) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(self.path(name), storage_options=self.storage_options)

    def schema(self, name: str) -> StructType:
        return spark_schema(self._table(name))

    def read(self, name: str, *, version: int | None = None) -> DataFrame:
        table = self._table(name, version)
        schema = spark_schema(table)
        # The snapshot's own files: the folder also holds files that later commits removed.
        paths = [self._spark_path(uri) for uri in table.file_uris()]
        if not paths:
            return self.spark.createDataFrame([], schema)
        return self.spark.read.schema(schema).parquet(*paths)

    def version(self, name: str) -> int:
        return self._table(name).version()

    def history(self, name: str) -> list[Commit]:
        newest_first = self._table(name).history()
        return [
            Commit(entry["version"], utc_from_millis(entry["timestamp"]), entry["operation"])
            for entry in reversed(newest_first)
        ]

    def transaction_version(self, name: str, app_id: str) -> int | None:
        return self._table(name).transaction_version(app_id)

    def _create(self, name: str, schema: StructType, properties: Mapping[str, str]) -> None:
        from deltalake import DeltaTable
        from deltalake import Schema as RsSchema

        DeltaTable.create(
            self.path(name),
            RsSchema.from_json(schema.json()),  # Delta's schema JSON is Spark's
            mode="ignore",
            configuration=dict(properties),
            storage_options=self.storage_options,
        )

    def _write(self, name: str, frame: DataFrame, mode: WriteMode, guard: Guard | None, where: str | None) -> None:
        from deltalake import write_deltalake

        table = self._table(name)
        write_deltalake(
            table, arrow_data(table, frame), mode=mode, predicate=where, commit_properties=commit_properties(guard)
        )

    def _merge(self, name: str, frame: DataFrame, condition: str, guard: Guard | None) -> None:
        from deltalake import write_deltalake

        table = self._table(name)
        data = arrow_data(table, frame)
        if data.num_rows == 0:
            # delta-rs makes no commit for a merge of no rows, which would drop the guard's transaction.
            if guard is not None:
                write_deltalake(table, data, mode="append", commit_properties=commit_properties(guard))
            return
        (
            table.merge(data, condition, source_alias="s", target_alias="t", commit_properties=commit_properties(guard))
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute()
        )

    def _table(self, name: str, version: int | None = None) -> RsDeltaTable:
        from deltalake import DeltaTable

        return DeltaTable(self.path(name), version=version, storage_options=self.storage_options)

    def _spark_path(self, uri: str) -> str:
        """A delta-rs file URI as a path Spark reads: percent-decoded, with the root's scheme."""
        path = unquote(uri)  # delta-rs percent-encodes (a space is %20); Hadoop paths are plain text
        scheme, separator, rest = path.partition("://")
        if separator and self._scheme is not None and scheme != self._scheme:
            path = f"{self._scheme}://{rest}"  # e.g. s3:// back to the root's s3a://
        return path


class SparkDeltaStore(TableStore):
    """Tables read and written by Spark's own Delta Lake (clusters, Databricks).

    Needs a classic (py4j) session for :meth:`transaction_version`. Storage access comes from
    the cluster's Hadoop configuration; ``storage.storage_options`` are for delta-rs only.
    """

    def exists(self, name: str) -> bool:
        from delta.tables import DeltaTable

        return DeltaTable.isDeltaTable(self.spark, self.path(name))

    def schema(self, name: str) -> StructType:
        return self._table(name).toDF().schema

    def read(self, name: str, *, version: int | None = None) -> DataFrame:
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(self.path(name))

    def version(self, name: str) -> int:
        return self._table(name).history(1).select("version").head()[0]

    def history(self, name: str) -> list[Commit]:
        rows = (
            self._table(name)
            .history()
            .select("version", F.unix_millis("timestamp").alias("millis"), "operation")
            .orderBy("version")
            .collect()
        )
        return [Commit(row.version, utc_from_millis(row.millis), row.operation) for row in rows]

    def transaction_version(self, name: str, app_id: str) -> int | None:
        delta_log = self.spark._jvm.org.apache.spark.sql.delta.DeltaLog
        snapshot = delta_log.forTableWithSnapshot(self.spark._jsparkSession, self.path(name))._2()
        recorded = snapshot.transactions().get(app_id)
        return int(recorded.get()) if recorded.isDefined() else None

    def _create(self, name: str, schema: StructType, properties: Mapping[str, str]) -> None:
        from delta.tables import DeltaTable

        builder = DeltaTable.createIfNotExists(self.spark).location(self.path(name)).addColumns(schema)
        for key, value in properties.items():
            builder = builder.property(key, value)
        builder.execute()

    def _write(self, name: str, frame: DataFrame, mode: WriteMode, guard: Guard | None, where: str | None) -> None:
        writer = frame.write.format("delta").mode(mode)
        if where is not None:
            writer = writer.option("replaceWhere", where)
        if guard is not None:
            writer = writer.option("txnAppId", guard.app_id).option("txnVersion", guard.version)
        writer.save(self.path(name))

    def _merge(self, name: str, frame: DataFrame, condition: str, guard: Guard | None) -> None:
        settings = {} if guard is None else {TXN_APP_ID: guard.app_id, TXN_VERSION: str(guard.version)}
        try:
            for key, value in settings.items():
                self.spark.conf.set(key, value)
            (
                self._table(name)
                .alias("t")
                .merge(frame.alias("s"), condition)
                .whenMatchedUpdateAll()
                .whenNotMatchedInsertAll()
                .execute()
            )
        finally:
            for key in settings:
                self.spark.conf.unset(key)

    def _table(self, name: str) -> SparkDeltaTable:
        from delta.tables import DeltaTable

        return DeltaTable.forPath(self.spark, self.path(name))


def open_store(spark: SparkSession, config: StorageConfig) -> TableStore:
    """The store ``config`` asks for; ``auto`` takes Spark's Delta when its jar is on the classpath."""
    has_delta = delta_available(spark)
    if config.backend == "spark-delta" and not has_delta:
        raise ConfigError(
            f"config key 'storage.backend' is spark-delta, but {DELTA_JAR_MISSING}; "
            "add it to the session (spark.jars.packages) or use backend delta-rs or auto"
        )
    if config.backend == "spark-delta" or (config.backend == "auto" and has_delta):
        return SparkDeltaStore(spark, config.root)
    return DeltaRsStore(spark, config.root, config.storage_options)


def spark_schema(table: RsDeltaTable) -> StructType:
    """A delta-rs table's schema as Spark's (Delta stores its schema in Spark's JSON form)."""
    return StructType.fromJson(json.loads(table.schema().to_json()))


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


def arrow_data(table: RsDeltaTable, frame: DataFrame) -> pa.Table:
    """The frame collected to the driver as Arrow, in the table's column order and Arrow types."""
    import pyarrow as pa

    target = pa.schema(table.schema().to_arrow())
    return frame.toArrow().select(target.names).cast(target)


def commit_properties(guard: Guard | None) -> CommitProperties | None:
    """delta-rs commit properties recording ``guard``'s transaction in the commit."""
    from deltalake import CommitProperties, Transaction

    if guard is None:
        return None
    return CommitProperties(app_transactions=[Transaction(guard.app_id, guard.version)])


def utc_from_millis(millis: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=millis)
