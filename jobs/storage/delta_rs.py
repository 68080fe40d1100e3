"""The embedded engine: delta-rs writes the tables from Arrow on the driver; Spark reads each snapshot's file list."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import unquote

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructType

from jobs.runtime.errors import ConfigError
from jobs.storage.store import (
    HISTORY_PAGES,
    Commit,
    Guard,
    GuardedCommit,
    TableStore,
    WriteMode,
    concurrent_writer,
    utc_from_millis,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from deltalake import CommitProperties
    from deltalake import DeltaTable as RsDeltaTable


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
        # Per thread, the tables a guarded write reads on one snapshot from its check to its commit.
        self._snapshots = threading.local()
        self._scheme = None if local else root.partition("://")[0]

    def exists(self, name: str) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(self.path(name), storage_options=self.storage_options)

    def schema(self, name: str) -> StructType:
        return spark_schema(self._table(name))

    def partition_columns(self, name: str) -> list[str]:
        return list(self._table(name).metadata().partition_columns)

    def read(self, name: str, *, version: int | None = None, where: str | None = None) -> DataFrame:
        table = self._table(name, version)
        if "deletionVectors" in (table.protocol().reader_features or []):
            # Its files still hold the rows the vectors delete: reading them as they are would be wrong.
            raise ConfigError(
                f"table {name!r} has deletion vectors (storage.deletion_vectors, written by Spark's Delta): "
                "read it with storage.backend spark-delta"
            )
        schema = spark_schema(table)
        # The snapshot's own files (the folder also holds files later commits removed), pruned by ``where``.
        paths = [self._spark_path(uri) for uri in table.file_uris(file_pruning_predicate=where)]
        if not paths:
            return self.spark.createDataFrame([], schema)
        # Partition values live in the files' folder names, below the table's own folder.
        base = self._spark_path(table.table_uri)
        frame = self.spark.read.schema(schema).option("basePath", base).parquet(*paths).select(*schema.fieldNames())
        return frame if where is None else frame.where(where)

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

    def guarded_commits(self, name: str, app_id: str | None) -> Iterator[GuardedCommit]:
        table, seen = self._table(name), 0
        for limit in HISTORY_PAGES:
            page = table.history(limit)
            for entry in page[seen:]:
                commit = GuardedCommit.from_user_metadata(entry["version"], entry.get("userMetadata"))
                if commit is not None and app_id in (None, commit.guard.app_id):
                    yield commit
            if limit is None or len(page) < limit:
                return
            seen = len(page)

    def replace(self, name: str, frame: DataFrame, schema: StructType, *, partition_by: Sequence[str] = ()) -> None:
        import pyarrow as pa
        from deltalake import Schema as RsSchema
        from deltalake import write_deltalake

        data = frame.toArrow().cast(pa.schema(RsSchema.from_json(schema.json()).to_arrow()))
        write_deltalake(
            self._table(name), data, mode="overwrite", schema_mode="overwrite", partition_by=list(partition_by) or None
        )

    def row_count(self, name: str) -> int:
        """The table's rows, from its files' statistics (no file is read)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        actions = pa.table(self._table(name).get_add_actions(flatten=True))  # an Arrow C-stream table
        return int(pc.sum(actions.column("num_records")).as_py() or 0) if actions.num_rows else 0

    def delete(self, name: str, where: str) -> None:
        self._table(name).delete(where)

    def _create(self, name: str, schema: StructType, partition_by: list[str], properties: Mapping[str, str]) -> None:
        from deltalake import DeltaTable
        from deltalake import Schema as RsSchema

        DeltaTable.create(
            self.path(name),
            RsSchema.from_json(schema.json()),  # Delta's schema JSON is Spark's
            mode="ignore",
            partition_by=partition_by or None,
            configuration=dict(properties),
            storage_options=self.storage_options,
        )

    def _write(self, name: str, frame: DataFrame, mode: WriteMode, guard: Guard | None, where: str | None) -> None:
        from deltalake import write_deltalake

        table = self._table(name)
        write_deltalake(
            table, arrow_data(table, frame), mode=mode, predicate=where, commit_properties=commit_properties(guard)
        )

    def _merge(self, name: str, frame: DataFrame, condition: str, guard: Guard | None, matched_if: str | None) -> None:
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
            .when_matched_update_all(predicate=matched_if)
            .when_not_matched_insert_all()
            .execute()
        )

    def _guarded(self, name: str, guard: Guard | None, write: Callable[[Guard | None], None]) -> bool:
        """The check and the commit on one snapshot: a commit of the guard's app id made in between (a second
        writer) fails this one, Delta's own conflict check, instead of both landing."""
        from deltalake.exceptions import CommitFailedError

        if guard is None:
            return super()._guarded(name, guard, write)
        with self._one_snapshot(name):
            try:
                return super()._guarded(name, guard, write)
            except CommitFailedError as error:
                raise concurrent_writer(name, guard, cause=error) from error

    @contextlib.contextmanager
    def _one_snapshot(self, name: str) -> Iterator[None]:
        """Every read of table ``name`` in this thread, until the block ends, sees the snapshot loaded first."""
        if not hasattr(self._snapshots, "tables"):
            self._snapshots.tables = {}
        self._snapshots.tables[name] = self._table(name)
        try:
            yield
        finally:
            del self._snapshots.tables[name]

    def _table(self, name: str, version: int | None = None) -> RsDeltaTable:
        from deltalake import DeltaTable

        pinned = getattr(self._snapshots, "tables", {}).get(name)
        if pinned is not None and version is None:
            return pinned
        return DeltaTable(self.path(name), version=version, storage_options=self.storage_options)

    def _spark_path(self, uri: str) -> str:
        """A delta-rs file URI as a path Spark reads: percent-decoded, with the root's scheme."""
        path = unquote(uri)  # delta-rs percent-encodes (a space is %20); Hadoop paths are plain text
        scheme, separator, rest = path.partition("://")
        if separator and self._scheme is not None and scheme != self._scheme:
            path = f"{self._scheme}://{rest}"  # e.g. s3:// back to the root's s3a://
        return path


def spark_schema(table: RsDeltaTable) -> StructType:
    """A delta-rs table's schema as Spark's (Delta stores its schema in Spark's JSON form)."""
    return StructType.fromJson(json.loads(table.schema().to_json()))


def arrow_data(table: RsDeltaTable, frame: DataFrame) -> pa.Table:
    """The frame collected to the driver as Arrow, in the table's column order and Arrow types."""
    import pyarrow as pa

    target = pa.schema(table.schema().to_arrow())
    return frame.toArrow().select(target.names).cast(target)


def commit_properties(guard: Guard | None) -> CommitProperties | None:
    """delta-rs commit properties recording ``guard`` in the commit: its transaction, and its userMetadata."""
    from deltalake import CommitProperties, Transaction

    if guard is None:
        return None
    return CommitProperties(
        app_transactions=[Transaction(guard.app_id, guard.version)],
        # delta-rs writes custom metadata into commitInfo as is: this key is the one Spark's history shows.
        custom_metadata={"userMetadata": guard.user_metadata()},
    )
