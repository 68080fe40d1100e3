"""Spark's own Delta Lake: what clusters and Databricks write the tables with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from jobs.storage.store import TXN_APP_ID, TXN_VERSION, Commit, Guard, TableStore, WriteMode, utc_from_millis

if TYPE_CHECKING:
    from delta.tables import DeltaTable as SparkDeltaTable


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
