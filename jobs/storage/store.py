"""The table store: Delta tables read and written as Spark DataFrames, under a root path or in a catalog schema.

Two engines share one interface (and one contract test suite, run on both):

- ``DeltaRsStore`` (``jobs.storage.delta_rs``), the embedded default: delta-rs writes the tables from Arrow on the
  driver, and Spark reads a snapshot through the snapshot's own file list.
- ``SparkDeltaStore`` (``jobs.storage.spark_delta``), for clusters and Databricks: Spark's own Delta Lake
  (``io.delta:delta-spark_4.2_2.13``), through SQL and the DataFrame API only, so it runs on Spark Connect too.

Every write can carry a :class:`Guard`, a Delta transaction id ``(app_id, version)`` with a few facts about the
write: the write is made, and the transaction recorded in the same commit, only if the table has not seen that app
id at that version or later. A replayed micro-batch is thereby written at most once. The guard is recorded twice in
the commit: as Delta's transaction action (``txn``), which both engines honour, and as the commit's ``userMetadata``
(JSON), which ``DESCRIBE HISTORY`` shows on every platform and which tells who wrote what.

A guard whose facts name the stream batch that writes it (its :attr:`Guard.identity`) fences a second writer: a
table that holds the guard's number from another stream batch refuses the write with
:class:`ConcurrentWriterError` instead of skipping it as a replay, and a *claim* (a batch's first write, which
takes its number) is checked at commit: delta-rs checks and commits on one snapshot, so a commit of the same app
id in between fails this one (Delta's own conflict check); Spark's Delta skips a write whose number its table
holds already, so after a claim the store reads back which batch holds the number.

Tables are created with no column mapping and, unless a store is told otherwise for a table, no deletion vectors
(see :data:`TABLE_PROPERTIES`), so that both engines can read and write them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructType

from jobs.runtime.errors import ConcurrentWriterError, ConfigError, SchemaMismatchError
from jobs.runtime.faults import crash_point
from jobs.runtime.session import delta_available
from jobs.runtime.settings import StorageConfig

# Set on every table at creation; delta-rs 1.6 accepts and records both (checked by the contract tests).
TABLE_PROPERTIES: Mapping[str, str] = {
    "delta.enableDeletionVectors": "false",
    "delta.columnMapping.mode": "none",
}

TABLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
DELTA_JAR = "io.delta:delta-spark_4.2_2.13"
DELTA_JAR_MISSING = f"Spark's Delta Lake ({DELTA_JAR}) is not in the session"
# Spark's Delta takes a MERGE's transaction id and commit metadata from these session settings only.
TXN_APP_ID = "spark.databricks.delta.write.txnAppId"
TXN_VERSION = "spark.databricks.delta.write.txnVersion"
USER_METADATA = "spark.databricks.delta.commitInfo.userMetadata"
# The key of a guard's record in a commit's userMetadata JSON.
GUARD_KEY = "lambda_learner"
# History is read newest first in pages of growing size: the commit looked for is nearly always recent.
HISTORY_PAGES = (16, 256, None)
# The facts that name the stream batch a guarded write belongs to: one number written by two of them is two writers.
IDENTITY_FACTS = ("stream", "stream_batch")

WriteMode = Literal["append", "overwrite"]


@dataclass(frozen=True)
class Guard:
    """A write made at most once: Delta's transaction id (app id, version), and facts recorded with it."""

    app_id: str
    version: int
    facts: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    # The batch's first write, which takes its number: checked at commit against a second writer.
    claim: bool = dataclasses.field(default=False, compare=False)
    # A number just handed out, never written: no table can hold it but through a second writer, and the batch's
    # claim (its first write) refuses that one. The batch's other writes need not read the tables' guards first.
    fresh: bool = dataclasses.field(default=False, compare=False)

    def user_metadata(self) -> str:
        """The commit's userMetadata: the guard and its facts as JSON."""
        return json.dumps({GUARD_KEY: {"app_id": self.app_id, "version": self.version, **self.facts}}, sort_keys=True)

    @property
    def identity(self) -> tuple[Any, ...] | None:
        """The stream batch that writes under this guard, None for a write that names none (a program's own)."""
        if not all(key in self.facts for key in IDENTITY_FACTS):
            return None
        return tuple(self.facts[key] for key in IDENTITY_FACTS)


@dataclass(frozen=True)
class GuardedCommit:
    """A commit made under a guard, as the table's history records it."""

    table_version: int
    guard: Guard

    @classmethod
    def from_user_metadata(cls, table_version: int, user_metadata: str | None) -> GuardedCommit | None:
        """The guard a commit's userMetadata records, or None for a commit made without one."""
        if not user_metadata:
            return None
        try:
            record = json.loads(user_metadata).get(GUARD_KEY)
        except (ValueError, AttributeError):
            return None  # someone else's metadata
        if not isinstance(record, dict):
            return None
        facts = {key: value for key, value in record.items() if key not in ("app_id", "version")}
        return cls(table_version, Guard(record["app_id"], int(record["version"]), facts))


@dataclass(frozen=True)
class Commit:
    """One entry of a table's history."""

    version: int
    timestamp: datetime  # UTC
    operation: str  # as the engine names it: WRITE, MERGE, CREATE TABLE, ...


class TableStore(ABC):
    """Delta tables read and written as Spark DataFrames."""

    def __init__(self, spark: SparkSession, root: str) -> None:
        self.spark = spark
        self.root = root

    @staticmethod
    def checked_name(name: str) -> str:
        if not TABLE_NAME.fullmatch(name):
            raise ValueError(f"table name {name!r} must be letters, digits, '_', '.' or '-'")
        return name

    def path(self, name: str) -> str:
        """The table's place under the root: the root joined with ``name`` (a local folder or a URI)."""
        return f"{self.root.rstrip('/')}/{self.checked_name(name)}"

    def location(self, name: str) -> str:
        """Where the table's files are (for a table kept by name in a catalog, where the catalog put it)."""
        return self.path(name)

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether the Delta table ``name`` exists."""

    @abstractmethod
    def schema(self, name: str) -> StructType:
        """The table's current schema (with its nullability)."""

    @abstractmethod
    def partition_columns(self, name: str) -> list[str]:
        """The table's partition columns, in order."""

    def create(
        self,
        name: str,
        schema: StructType,
        *,
        partition_by: Sequence[str] = (),
        properties: Mapping[str, str] | None = None,
    ) -> None:
        """Creates an empty table if there is none; refuses an existing table of another schema or partitioning.

        Field names and types must match (nullability may differ). ``properties`` (Delta table
        properties: delta-rs refuses keys it does not know) are added to :data:`TABLE_PROPERTIES`,
        which only :meth:`allowed_properties` may override.
        """
        properties = dict(properties or {})
        for key, value in TABLE_PROPERTIES.items():
            if properties.setdefault(key, value) != value and key not in self.allowed_properties():
                raise ValueError(f"table property {key} must be {value} (both engines must read the tables)")
        if not self.exists(name):
            self._create(name, schema, list(partition_by), properties)
            return
        difference = schema_difference(self.schema(name), schema)
        if difference is not None:
            raise SchemaMismatchError(f"table {name!r} already exists with another schema: {difference}")
        if self.partition_columns(name) != list(partition_by):
            raise SchemaMismatchError(
                f"table {name!r} already exists partitioned by {self.partition_columns(name)}, not {list(partition_by)}"
            )

    def allowed_properties(self) -> set[str]:
        """Keys of :data:`TABLE_PROPERTIES` this engine may set otherwise (none: both engines read every table)."""
        return set()

    @abstractmethod
    def read(self, name: str, *, version: int | None = None, where: str | None = None) -> DataFrame:
        """The current snapshot, or the snapshot at ``version`` (time travel); with ``where``, its rows matching it.

        ``where`` is a SQL predicate; files that cannot hold a matching row (by partition values or column
        statistics) are not read at all.
        """

    def append(self, name: str, frame: DataFrame, *, guard: Guard | None = None) -> bool:
        """Adds the rows; False (and nothing written) if ``guard`` was already applied."""
        return self._guarded_write(name, frame, "append", guard, None)

    def overwrite(self, name: str, frame: DataFrame, *, guard: Guard | None = None, where: str | None = None) -> bool:
        """Replaces all rows, or those matching the SQL predicate ``where`` (every new row must match it).

        False (and nothing written) if ``guard`` was already applied.
        """
        return self._guarded_write(name, frame, "overwrite", guard, where)

    def merge(
        self,
        name: str,
        frame: DataFrame,
        keys: Sequence[str],
        *,
        guard: Guard | None = None,
        matched_if: str | None = None,
    ) -> bool:
        """Upserts: rows matching on all ``keys`` get every column updated, the others are inserted.

        ``frame`` must hold at most one row per key. ``matched_if``, a SQL condition on the table's row
        ``t`` (and the new row ``s``), limits the update to matching rows that hold it: a compare-and-set,
        checked at commit (a row changed by a concurrent commit fails this one). False (and nothing
        written) if ``guard`` was already applied.
        """
        self._check_columns(name, frame)
        missing = [key for key in keys if key not in frame.columns]
        if not keys or missing:
            raise ValueError(f"merge into {name!r} needs key columns of the table; got {list(keys)}")
        condition = merge_condition(keys)
        return self._guarded(name, guard, lambda given: self._merge(name, frame, condition, given, matched_if))

    @abstractmethod
    def replace(self, name: str, frame: DataFrame, schema: StructType, *, partition_by: Sequence[str] = ()) -> None:
        """Replaces the table's rows and columns with ``frame`` (of ``schema``), in one new version."""

    @abstractmethod
    def delete(self, name: str, where: str) -> None:
        """Removes the rows matching the SQL predicate ``where`` (unguarded: deleting twice changes nothing)."""

    @abstractmethod
    def version(self, name: str) -> int:
        """The table's latest version."""

    @abstractmethod
    def history(self, name: str) -> list[Commit]:
        """The table's commits, oldest first."""

    @abstractmethod
    def guarded_commits(self, name: str, app_id: str | None) -> Iterator[GuardedCommit]:
        """The commits made under a guard of ``app_id`` (None: of any), newest first, as far back as the log keeps
        them."""

    def last_guarded_commit(self, name: str, app_id: str) -> GuardedCommit | None:
        return next(self.guarded_commits(name, app_id), None)

    @abstractmethod
    def transaction_version(self, name: str, app_id: str) -> int | None:
        """The latest version recorded for ``app_id`` in the table, None if it never wrote."""

    def applied(self, name: str, guard: Guard | None) -> bool:
        """Whether the table already holds the write ``guard`` stands for.

        Raises ConcurrentWriterError if it holds the guard's number from another stream batch. A fresh guard's
        write is not yet held (the claim, checked, is where a second writer of its number shows).
        """
        if guard is None or (guard.fresh and not guard.claim):
            return False
        recorded = self.transaction_version(name, guard.app_id)
        if recorded is None or recorded < guard.version:
            return False
        if guard.identity is not None:
            holders = self.holders(name, guard)
            if holders and holders[0].guard.identity not in (None, guard.identity):
                raise concurrent_writer(name, guard, holders[0].guard)
        return True

    def holders(self, name: str, guard: Guard) -> list[GuardedCommit]:
        """The table's commits under ``guard``'s app id and number, newest first (numbers only grow over commits)."""
        found = []
        for commit in self.guarded_commits(name, guard.app_id):
            if commit.guard.version < guard.version:
                break
            if commit.guard.version == guard.version:
                found.append(commit)
        return found

    def _guarded(self, name: str, guard: Guard | None, write: Callable[[Guard | None], None]) -> bool:
        """``write(guard)``, unless the table holds the guard's write already (then False)."""
        if self.applied(name, guard):
            return False
        if guard is not None:
            crash_point("store:checked", guard.facts.get("stream"))
        write(guard)
        return True

    def _guarded_write(
        self, name: str, frame: DataFrame, mode: WriteMode, guard: Guard | None, where: str | None
    ) -> bool:
        self._check_columns(name, frame)
        return self._guarded(name, guard, lambda given: self._write(name, frame, mode, given, where))

    def _check_columns(self, name: str, frame: DataFrame) -> None:
        expected, given = self.schema(name).fieldNames(), frame.columns
        if sorted(expected) != sorted(given):
            raise SchemaMismatchError(f"frame columns {given} do not match table {name!r} columns {expected}")

    @abstractmethod
    def _create(
        self, name: str, schema: StructType, partition_by: list[str], properties: Mapping[str, str]
    ) -> None: ...

    @abstractmethod
    def _write(self, name: str, frame: DataFrame, mode: WriteMode, guard: Guard | None, where: str | None) -> None: ...

    @abstractmethod
    def _merge(self, name: str, frame: DataFrame, condition: str, guard: Guard | None, matched_if: str | None) -> None:
        """Merges with the target aliased ``t`` and the source ``s``."""


def open_store(spark: SparkSession, config: StorageConfig) -> TableStore:
    """The store ``config`` asks for; ``auto`` takes Spark's Delta when its jar is on the classpath."""
    has_delta = delta_available(spark)
    if config.backend == "spark-delta" and not has_delta:
        raise ConfigError(
            f"config key 'storage.backend' is spark-delta, but {DELTA_JAR_MISSING}; "
            "run make jars (local sessions load it from .jars/) or add it to the cluster, or use backend delta-rs"
        )
    # Each engine's module imports its engine's package: a cluster may have only one of them.
    if config.backend == "spark-delta" or (config.backend == "auto" and has_delta):
        from jobs.storage.spark_delta import SparkDeltaStore

        return SparkDeltaStore(spark, config.root, catalog=config.catalog, schema=config.schema)
    if config.catalog is not None:
        raise ConfigError("config key 'storage.catalog' needs storage.backend spark-delta (delta-rs writes paths only)")
    from jobs.storage.delta_rs import DeltaRsStore

    return DeltaRsStore(spark, config.root, config.storage_options)


def concurrent_writer(
    name: str, guard: Guard, holder: Guard | None = None, cause: object = None
) -> ConcurrentWriterError:
    """The one message for a batch number two streams took: who holds it, who was refused, and what to do."""
    this = _batch_of(guard)
    held = f"holds it from {_batch_of(holder)}" if holder is not None else f"took it at the same moment ({cause})"
    return ConcurrentWriterError(
        f"batch {guard.version} of app id {guard.app_id!r} was taken by another writer: table {name!r} {held}, "
        f"and this is {this}. Two streams write these tables at once (a backfill beside the live job, overlapping "
        "runs): stop one of them. This stream wrote nothing of its batch; started again with its checkpoint, it "
        "redoes it under the next free number (docs/operations.md, 'One writer per set of tables')"
    )


def _batch_of(guard: Guard) -> str:
    identity = guard.identity
    return "a write of no stream" if identity is None else f"batch {identity[1]} of stream {identity[0]}"


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
