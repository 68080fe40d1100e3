"""Spark's own Delta Lake: what clusters and Databricks write the tables with.

Everything goes through Spark SQL and the DataFrame API, never the JVM from Python: the same code
runs on a classic session, on Spark Connect (Databricks standard access mode, serverless) and on
Databricks Runtime. Tables live under a root path (``delta.`<root>/<name>```) or, with a catalog
and schema, as managed tables ``catalog.schema.name`` (Unity Catalog on Databricks).

Idempotent writes use Delta's own transaction ids (``txnAppId``/``txnVersion``: Delta skips a write
whose version its table has already recorded for the app), and each guarded commit also records
its guard in the commit's ``userMetadata``, which ``DESCRIBE HISTORY`` shows on every platform:
that is how the recorded versions are read back.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from jobs.runtime.errors import ConfigError
from jobs.runtime.faults import crash_point
from jobs.storage.store import (
    HISTORY_PAGES,
    TABLE_PROPERTIES,
    TXN_APP_ID,
    TXN_VERSION,
    USER_METADATA,
    Commit,
    Guard,
    GuardedCommit,
    TableStore,
    WriteMode,
    concurrent_writer,
    utc_from_millis,
)

# A SQL write takes its guard from session-wide settings: a write from another thread (a lease's renewal)
# must not run while they are set, or it would commit under the guard. One SQL write at a time per process.
SQL_WRITES = threading.RLock()
# A claim's own mark among the facts it records: which commit holding its number this write made.
CLAIM_MARK = "claim"
# How Delta refuses a commit that a concurrent commit of the same app id beat (its transaction ids conflict).
CONCURRENT_TRANSACTION = ("ConcurrentTransactionException", "DELTA_CONCURRENT_TRANSACTION")


class SparkDeltaStore(TableStore):
    """Tables read and written by Spark's own Delta Lake, by path under a root or by name in a catalog schema."""

    def __init__(self, spark: SparkSession, root: str | None, *, catalog: str | None = None, schema: str | None = None):
        if (catalog is None) != (schema is None):
            raise ConfigError("config keys 'storage.catalog' and 'storage.schema' go together: set both or neither")
        super().__init__(spark, root or "")
        self.catalog, self.schema_name = catalog, schema

    def allowed_properties(self) -> set[str]:
        return {"delta.enableDeletionVectors"}  # for the live state, which only this engine writes

    def identifier(self, name: str) -> str:
        """The table as Spark SQL names it: ``delta.`<path>``` or ``catalog.schema.name``."""
        if self.catalog is not None:
            return f"`{self.catalog}`.`{self.schema_name}`.`{self.checked_name(name)}`"
        return f"delta.`{self.path(name)}`"

    def location(self, name: str) -> str:
        if self.catalog is None:
            return self.path(name)
        location = self.spark.sql(f"DESCRIBE DETAIL {self.identifier(name)}").first()["location"]
        return location.removeprefix("file:")

    def exists(self, name: str) -> bool:
        if self.catalog is not None:
            return self.spark.catalog.tableExists(f"{self.catalog}.{self.schema_name}.{self.checked_name(name)}")
        try:
            self.spark.sql(f"DESCRIBE DETAIL {self.identifier(name)}").collect()
        except AnalysisException:
            return False
        return True

    def schema(self, name: str) -> StructType:
        return self.spark.table(self.identifier(name)).schema

    def partition_columns(self, name: str) -> list[str]:
        return list(self.spark.sql(f"DESCRIBE DETAIL {self.identifier(name)}").first()["partitionColumns"])

    def read(self, name: str, *, version: int | None = None, where: str | None = None) -> DataFrame:
        if version is None:
            frame = self.spark.table(self.identifier(name))
        else:
            frame = self.spark.sql(f"SELECT * FROM {self.identifier(name)} VERSION AS OF {int(version)}")
        # Delta skips files by partition values and column statistics for a filter by itself.
        return frame if where is None else frame.where(where)

    def version(self, name: str) -> int:
        return self._history(name, 1)[0]["version"]

    def history(self, name: str) -> list[Commit]:
        return [
            Commit(row["version"], utc_from_millis(row["millis"]), row["operation"])
            for row in reversed(self._history(name, None))
        ]

    def guarded_commits(self, name: str, app_id: str | None) -> Iterator[GuardedCommit]:
        seen = 0
        for limit in HISTORY_PAGES:
            page = self._history(name, limit)
            for row in page[seen:]:
                commit = GuardedCommit.from_user_metadata(row["version"], row["user_metadata"])
                if commit is not None and app_id in (None, commit.guard.app_id):
                    yield commit
            if limit is None or len(page) < limit:
                return
            seen = len(page)

    def transaction_version(self, name: str, app_id: str) -> int | None:
        latest = next(self.guarded_commits(name, app_id), None)
        return None if latest is None else latest.guard.version

    def replace(self, name: str, frame: DataFrame, schema: StructType, *, partition_by: Sequence[str] = ()) -> None:
        columns = ", ".join(f"CAST(`{f.name}` AS {f.dataType.simpleString()}) AS `{f.name}`" for f in schema)
        partitioning = f" PARTITIONED BY ({', '.join(f'`{c}`' for c in partition_by)})" if partition_by else ""
        # The properties the store manages carry over (deletion vectors of the live state, column mapping).
        properties = self.spark.sql(f"SHOW TBLPROPERTIES {self.identifier(name)}").collect()
        kept = ", ".join(f"'{row.key}' = '{row.value}'" for row in properties if row.key in TABLE_PROPERTIES)
        self._guarded_sql(
            f"CREATE OR REPLACE TABLE {self.identifier(name)} USING DELTA{partitioning}"
            + (f" TBLPROPERTIES ({kept})" if kept else "")
            + f" AS SELECT {columns} FROM {{source}}",
            frame,
            None,
        )

    def delete(self, name: str, where: str) -> None:
        with SQL_WRITES:
            self.spark.sql(f"DELETE FROM {self.identifier(name)} WHERE {where}")

    def _create(
        self, name: str, schema: StructType, partition_by: Sequence[str], properties: Mapping[str, str]
    ) -> None:
        columns = ", ".join(
            f"`{field.name}` {field.dataType.simpleString()}{'' if field.nullable else ' NOT NULL'}"
            for field in schema.fields
        )
        partitioning = f" PARTITIONED BY ({', '.join(f'`{c}`' for c in partition_by)})" if partition_by else ""
        settings = ", ".join(f"'{key}' = '{value}'" for key, value in properties.items())
        with SQL_WRITES:
            self.spark.sql(
                f"CREATE TABLE IF NOT EXISTS {self.identifier(name)} ({columns}) USING DELTA{partitioning}"
                + (f" TBLPROPERTIES ({settings})" if settings else "")
            )

    def _write(self, name: str, frame: DataFrame, mode: WriteMode, guard: Guard | None, where: str | None) -> None:
        columns = ", ".join(f"`{column}`" for column in self.schema(name).fieldNames())
        if mode == "append":
            statement = f"INSERT INTO {self.identifier(name)} SELECT {columns} FROM {{source}}"
        elif where is None:
            statement = f"INSERT OVERWRITE {self.identifier(name)} SELECT {columns} FROM {{source}}"
        else:
            statement = f"INSERT INTO {self.identifier(name)} REPLACE WHERE {where} SELECT {columns} FROM {{source}}"
        self._guarded_sql(statement, frame, guard)

    def _merge(self, name: str, frame: DataFrame, condition: str, guard: Guard | None, matched_if: str | None) -> None:
        matched = "WHEN MATCHED" if matched_if is None else f"WHEN MATCHED AND ({matched_if})"
        self._guarded_sql(
            f"MERGE INTO {self.identifier(name)} t USING {{source}} s ON {condition} "
            f"{matched} THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *",
            frame,
            guard,
        )

    def _guarded(self, name: str, guard: Guard | None, write: Callable[[Guard | None], None]) -> bool:
        """A claim is written with no check first and read back after: Delta skips a write whose number its
        table holds already (its transaction id, checked at commit), so only the commit holding the number says
        whether it is this write's, a replay's, or a second writer's. Every other write is checked first."""
        try:
            if guard is None or not guard.claim or guard.identity is None:
                return super()._guarded(name, guard, write)
            stamped = dataclasses.replace(guard, facts={**guard.facts, CLAIM_MARK: uuid.uuid4().hex})
            write(stamped)
        except Exception as error:
            if guard is not None and any(marker in str(error) for marker in CONCURRENT_TRANSACTION):
                raise concurrent_writer(name, guard, cause=type(error).__name__) from error
            raise
        holders = self.holders(name, guard)
        if not holders:
            return True  # nothing to hold: Delta made no commit for this (empty) write
        holder = holders[0].guard
        if holder.identity not in (None, guard.identity):
            raise concurrent_writer(name, guard, holder)
        if holder.facts.get(CLAIM_MARK) != stamped.facts[CLAIM_MARK]:
            return False  # written before a restart: Delta skipped this write
        if len(holders) > 1:
            raise RuntimeError(f"table {name!r} holds batch {guard.version} of {guard.app_id!r} twice: not skipped")
        return True

    def _guarded_sql(self, statement: str, frame: DataFrame, guard: Guard | None) -> None:
        """One SQL write of ``frame`` (a temporary view named in ``{source}``), under ``guard``.

        SQL writes take their transaction id and commit metadata from session settings, set for this
        statement only (and no other SQL write of the process runs meanwhile). The same statements serve
        paths and catalog tables, classic and Connect sessions.
        """
        view = f"lambda_learner_source_{uuid.uuid4().hex}"
        frame.createOrReplaceTempView(view)
        settings = {}
        if guard is not None:
            settings = {TXN_APP_ID: guard.app_id, TXN_VERSION: str(guard.version), USER_METADATA: guard.user_metadata()}
        with SQL_WRITES:
            try:
                for key, value in settings.items():
                    self.spark.conf.set(key, value)
                crash_point("spark_delta:guard_set")
                self.spark.sql(statement.format(source=view))
            finally:
                for key in settings:
                    self.spark.conf.unset(key)
                self.spark.catalog.dropTempView(view)

    def _history(self, name: str, limit: int | None) -> list[dict]:
        """Newest first: version, commit time in epoch milliseconds, operation, userMetadata."""
        query = f"DESCRIBE HISTORY {self.identifier(name)}" + ("" if limit is None else f" LIMIT {int(limit)}")
        rows = self.spark.sql(query).select(
            "version",
            F.unix_millis("timestamp").alias("millis"),
            "operation",
            F.col("userMetadata").alias("user_metadata"),
        )
        return [row.asDict() for row in rows.collect()]
