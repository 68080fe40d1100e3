"""The table store's contract, run against both adapters on real local Spark and real Delta tables."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DoubleType,
    IntegerType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from jobs.runtime.cli import CONFIG_ERROR_EXIT_CODE
from jobs.runtime.errors import ConcurrentWriterError, ConfigError
from jobs.runtime.faults import PAUSE_VARIABLE
from jobs.runtime.jvm import ENV_VAR
from jobs.runtime.session import delta_available
from jobs.runtime.settings import StorageConfig
from jobs.storage.delta_rs import DeltaRsStore
from jobs.storage.spark_delta import SparkDeltaStore
from jobs.storage.store import TXN_APP_ID, Guard, TableStore, open_store
from tests.jobs.jobrun import ROOT

SCORES = StructType(
    [
        StructField("entity_id", StringType(), nullable=False),
        StructField("batch_id", LongType()),
        StructField("score", DoubleType()),
    ]
)

COEFFICIENTS = ArrayType(
    StructType(
        [
            StructField("name", StringType()),
            StructField("term", StringType()),
            StructField("mean", DoubleType()),
            StructField("variance", DoubleType()),
        ]
    )
)
FEATURES = ArrayType(
    StructType(
        [StructField("name", StringType()), StructField("term", StringType()), StructField("value", DoubleType())]
    )
)
# Every column type the jobs' tables use.
STATE = StructType(
    [
        StructField("entity_type", StringType(), nullable=False),
        StructField("entity_id", StringType(), nullable=False),
        StructField("generation", LongType()),
        StructField("rows", IntegerType()),
        StructField("offset", DoubleType()),
        StructField("active", BooleanType()),
        StructField("updated_at", TimestampType()),
        StructField("coefficients", COEFFICIENTS),
        StructField("features", FEATURES),
        StructField("metrics", MapType(StringType(), DoubleType())),
    ]
)

STANDARD_ACTIONS = {"commitInfo", "protocol", "metaData", "add", "remove", "txn", "cdc", "domainMetadata"}
COMMIT_FILE = re.compile(r"\d{20}\.json")
OPERATIONS = ["append", "overwrite", "merge"]


def scores(spark: SparkSession, *rows: tuple[str, int, float]) -> DataFrame:
    return spark.createDataFrame(list(rows), SCORES)


def content(frame: DataFrame) -> list[tuple]:
    return sorted(tuple(row) for row in frame.collect())


def write(store: TableStore, operation: str, name: str, frame: DataFrame, guard: Guard | None = None) -> bool:
    """One of the three writes; merge upserts on entity_id."""
    if operation == "merge":
        return store.merge(name, frame, ["entity_id"], guard=guard)
    return getattr(store, operation)(name, frame, guard=guard)


def delta_log(store: TableStore, name: str) -> list[list[dict]]:
    """The table's commits, each as its list of actions (a local table)."""
    folder = Path(store.location(name)) / "_delta_log"
    commits = sorted(path for path in folder.iterdir() if COMMIT_FILE.fullmatch(path.name))
    assert [int(path.stem) for path in commits] == list(range(len(commits)))
    return [[json.loads(line) for line in path.read_text().splitlines() if line.strip()] for path in commits]


def actions(commit: list[dict], kind: str) -> list[dict]:
    return [action[kind] for action in commit if kind in action]


class TableStoreContract:
    """What every adapter does; subclasses provide ``store`` on a fresh root."""

    @pytest.fixture
    def store(self) -> TableStore:
        raise NotImplementedError

    def test_create_is_idempotent(self, store):
        assert not store.exists("scores")
        store.create("scores", SCORES)
        store.create("scores", SCORES)
        assert store.exists("scores")
        assert store.version("scores") == 0
        assert store.schema("scores") == SCORES
        assert content(store.read("scores")) == []

    def test_create_refuses_another_schema(self, store):
        store.create("scores", SCORES)
        retyped = StructType([*SCORES.fields[:2], StructField("score", StringType())])
        with pytest.raises(ValueError, match=r"'scores'.*'score' is double in the table, string here"):
            store.create("scores", retyped)
        widened = StructType([*SCORES.fields, StructField("weight", DoubleType())])
        with pytest.raises(ValueError, match=r"'scores'.*'weight'"):
            store.create("scores", widened)
        with pytest.raises(ValueError, match=r"'scores'.*'score'"):
            store.create("scores", StructType(SCORES.fields[:2]))
        relaxed = StructType([StructField(field.name, field.dataType, nullable=True) for field in SCORES.fields])
        store.create("scores", relaxed)  # nullability is not part of the comparison
        assert store.version("scores") == 0

    def test_tables_have_no_deletion_vectors_and_no_column_mapping(self, store):
        store.create("scores", SCORES, properties={"delta.logRetentionDuration": "interval 60 days"})
        (metadata,) = actions(delta_log(store, "scores")[0], "metaData")
        assert metadata["configuration"]["delta.enableDeletionVectors"] == "false"
        assert metadata["configuration"]["delta.columnMapping.mode"] == "none"
        assert metadata["configuration"]["delta.logRetentionDuration"] == "interval 60 days"
        (protocol,) = actions(delta_log(store, "scores")[0], "protocol")
        features = set(protocol.get("readerFeatures") or []) | set(protocol.get("writerFeatures") or [])
        assert not features & {"deletionVectors", "columnMapping"}
        # Deletion vectors only where the engine allows them (Spark's Delta, for the live state), asked for by name.
        if "delta.enableDeletionVectors" not in store.allowed_properties():
            with pytest.raises(ValueError, match=r"delta\.enableDeletionVectors"):
                store.create("other", SCORES, properties={"delta.enableDeletionVectors": "true"})
            assert not store.exists("other")
            return
        store.create("other", SCORES, properties={"delta.enableDeletionVectors": "true"})
        (protocol,) = actions(delta_log(store, "other")[0], "protocol")
        assert "deletionVectors" in set(protocol.get("writerFeatures") or [])

    def test_writes_and_spark_reads_see_exactly_the_current_snapshot(self, store, spark):
        store.create("scores", SCORES)
        assert store.append("scores", scores(spark, ("a", 1, 0.1), ("b", 1, 0.2)))
        assert store.append("scores", scores(spark, ("c", 2, 0.3)))
        assert content(store.read("scores")) == [("a", 1, 0.1), ("b", 1, 0.2), ("c", 2, 0.3)]

        assert store.overwrite("scores", scores(spark, ("b", 3, 2.0), ("d", 3, 4.0)))
        assert content(store.read("scores")) == [("b", 3, 2.0), ("d", 3, 4.0)]

        assert store.merge("scores", scores(spark, ("d", 4, 40.0), ("e", 4, 50.0)), ["entity_id"])
        current = store.read("scores")
        assert content(current) == [("b", 3, 2.0), ("d", 4, 40.0), ("e", 4, 50.0)]
        # The folder still holds the files the overwrite and the merge removed: the read must skip them.
        on_disk = {path.name for path in Path(store.location("scores")).glob("*.parquet")}
        read = {Path(uri).name for uri in current.inputFiles()}
        assert read < on_disk

    def test_overwrite_where_replaces_only_the_matching_rows(self, store, spark):
        store.create("scores", SCORES)
        store.append("scores", scores(spark, ("a", 1, 0.1), ("b", 2, 0.2), ("c", 2, 0.3)))
        guard = Guard("nightly", 2)
        assert store.overwrite("scores", scores(spark, ("d", 2, 4.0)), guard=guard, where="batch_id = 2")
        assert content(store.read("scores")) == [("a", 1, 0.1), ("d", 2, 4.0)]
        assert not store.overwrite("scores", scores(spark, ("e", 2, 5.0)), guard=guard, where="batch_id = 2")
        assert content(store.read("scores")) == [("a", 1, 0.1), ("d", 2, 4.0)]

    def test_merge_matches_on_all_keys(self, store, spark):
        store.create("scores", SCORES)
        store.append("scores", scores(spark, ("a", 1, 0.1), ("a", 2, 0.2)))
        store.merge("scores", scores(spark, ("a", 2, 9.0), ("a", 3, 0.3)), ["entity_id", "batch_id"])
        assert content(store.read("scores")) == [("a", 1, 0.1), ("a", 2, 9.0), ("a", 3, 0.3)]

    def test_writes_refuse_frames_of_other_columns(self, store, spark):
        store.create("scores", SCORES)
        with pytest.raises(ValueError, match="'scores'"):
            store.append("scores", scores(spark, ("a", 1, 0.1)).drop("score"))
        with pytest.raises(ValueError, match="'scores'"):
            store.merge("scores", scores(spark, ("a", 1, 0.1)), ["entity"])
        assert store.version("scores") == 0

    @pytest.mark.parametrize("operation", OPERATIONS)
    def test_a_replayed_guard_writes_nothing(self, store, spark, operation):
        store.create("scores", SCORES)
        assert write(store, operation, "scores", scores(spark, ("a", 1, 0.1)), Guard("nearline", 5))
        version, before = store.version("scores"), content(store.read("scores"))

        for replayed in (5, 4):
            assert not write(store, operation, "scores", scores(spark, ("b", 1, 9.9)), Guard("nearline", replayed))
        assert store.version("scores") == version
        assert content(store.read("scores")) == before

        assert write(store, operation, "scores", scores(spark, ("a", 6, 0.6)), Guard("nearline", 6))
        assert write(store, operation, "scores", scores(spark, ("c", 1, 0.7)), Guard("nightly", 1))
        assert store.version("scores") == version + 2
        assert store.transaction_version("scores", "nearline") == 6
        assert store.transaction_version("scores", "nightly") == 1
        assert store.transaction_version("scores", "never") is None

    @pytest.mark.parametrize("claim", [True, False], ids=["claim", "later-write"])
    def test_a_number_another_stream_batch_holds_is_refused_not_skipped(self, store, spark, claim):
        store.create("scores", SCORES)
        held = Guard("nearline", 3, {"stream": "a", "stream_batch": 0}, claim=claim)
        assert store.append("scores", scores(spark, ("a", 1, 0.1)), guard=held)
        version = store.version("scores")

        replay = Guard("nearline", 3, {"stream": "a", "stream_batch": 0, "ingested": 5}, claim=claim)
        assert not store.append("scores", scores(spark, ("b", 1, 9.9)), guard=replay)
        second_writer = Guard("nearline", 3, {"stream": "b", "stream_batch": 7}, claim=claim)
        refusal = r"table 'scores' holds it from batch 0 of stream a, and this is batch 7 of stream b"
        with pytest.raises(ConcurrentWriterError, match=refusal):
            store.append("scores", scores(spark, ("c", 1, 9.9)), guard=second_writer)
        # An older number, held by the other stream batch, is refused too: never skipped as a replay.
        assert store.append(
            "scores", scores(spark, ("d", 1, 0.4)), guard=Guard("nearline", 4, {"stream": "a", "stream_batch": 1})
        )
        with pytest.raises(ConcurrentWriterError, match="holds it from batch 0 of stream a"):
            store.merge("scores", scores(spark, ("e", 1, 9.9)), ["entity_id"], guard=second_writer)
        assert store.version("scores") == version + 1
        assert content(store.read("scores")) == [("a", 1, 0.1), ("d", 1, 0.4)]

    @pytest.mark.parametrize("operation", OPERATIONS)
    def test_a_guarded_empty_write_records_its_transaction(self, store, spark, operation):
        store.create("scores", SCORES)
        empty = scores(spark)
        assert write(store, operation, "scores", empty, Guard("nearline", 7))
        assert store.version("scores") == 1
        assert store.transaction_version("scores", "nearline") == 7
        assert not write(store, operation, "scores", scores(spark, ("a", 1, 0.1)), Guard("nearline", 7))
        assert content(store.read("scores")) == []

    def test_version_history_and_time_travel(self, store, spark):
        store.create("scores", SCORES)
        store.append("scores", scores(spark, ("a", 1, 0.1)))
        store.overwrite("scores", scores(spark, ("b", 2, 0.2)))
        store.merge("scores", scores(spark, ("b", 3, 0.3), ("c", 3, 0.4)), ["entity_id"])

        assert store.version("scores") == 3
        history = store.history("scores")
        assert [(commit.version, commit.operation) for commit in history] == [
            (0, "CREATE TABLE"),
            (1, "WRITE"),
            (2, "WRITE"),
            (3, "MERGE"),
        ]
        assert all(commit.timestamp.utcoffset() == timedelta(0) for commit in history)

        assert content(store.read("scores", version=0)) == []
        assert content(store.read("scores", version=1)) == [("a", 1, 0.1)]
        assert content(store.read("scores", version=2)) == [("b", 2, 0.2)]
        assert content(store.read("scores", version=3)) == [("b", 3, 0.3), ("c", 3, 0.4)]

    def test_the_log_is_standard_delta(self, store, spark):
        store.create("scores", SCORES)
        store.append("scores", scores(spark, ("a", 1, 0.1)), guard=Guard("nearline", 1))
        store.overwrite("scores", scores(spark, ("b", 2, 0.2)))
        store.merge("scores", scores(spark, ("b", 3, 0.3)), ["entity_id"], guard=Guard("nearline", 2))
        store.merge("scores", scores(spark), ["entity_id"], guard=Guard("nearline", 3))

        log = delta_log(store, "scores")
        assert len(log) == 5
        for commit in log:
            assert all(len(action) == 1 and set(action) <= STANDARD_ACTIONS for action in commit)
            assert all(not add.get("deletionVector") for add in actions(commit, "add"))
        create, append, overwrite, merge, empty_merge = log

        (metadata,) = actions(create, "metaData")
        assert actions(create, "protocol")
        assert StructType.fromJson(json.loads(metadata["schemaString"])) == SCORES
        assert metadata["partitionColumns"] == []

        assert actions(append, "add") and not actions(append, "remove")
        assert actions(overwrite, "add") and actions(overwrite, "remove")
        assert actions(merge, "add") and actions(merge, "remove")
        assert not actions(empty_merge, "add") and not actions(empty_merge, "remove")
        transactions = [[(txn["appId"], txn["version"]) for txn in actions(commit, "txn")] for commit in log]
        assert transactions == [[], [("nearline", 1)], [], [("nearline", 2)], [("nearline", 3)]]

    def test_column_types_round_trip(self, store, spark):
        store.create("state", STATE)
        summer = timezone(timedelta(hours=2))
        rows = [
            (
                "member",
                "m1",
                3,
                12,
                -0.25,
                True,
                datetime(2026, 7, 1, 14, 30, 5, 123456, tzinfo=summer),
                [("age", "", 0.5, 0.01), ("country", "fr", -1.25, 0.2)],
                [("age", "", 31.0)],
                {"auc": 0.71, "log_loss": 0.42},
            ),
            ("member", "m2", None, None, None, None, None, [], None, {}),
        ]
        assert store.append("state", spark.createDataFrame(rows, STATE))
        assert store.schema("state") == STATE

        frame = store.read("state")
        assert [(field.name, field.dataType) for field in frame.schema] == [
            (field.name, field.dataType) for field in STATE
        ]
        back = sorted(frame.toArrow().to_pylist(), key=lambda row: row["entity_id"])
        assert back[0]["updated_at"] == datetime(2026, 7, 1, 12, 30, 5, 123456, tzinfo=UTC)
        assert back[0]["updated_at"].utcoffset() == timedelta(0)
        assert back[0]["coefficients"] == [
            {"name": "age", "term": "", "mean": 0.5, "variance": 0.01},
            {"name": "country", "term": "fr", "mean": -1.25, "variance": 0.2},
        ]
        assert back[0]["features"] == [{"name": "age", "term": "", "value": 31.0}]
        assert dict(back[0]["metrics"]) == {"auc": 0.71, "log_loss": 0.42}
        assert (back[0]["generation"], back[0]["rows"], back[0]["offset"], back[0]["active"]) == (3, 12, -0.25, True)
        assert back[1] == {
            "entity_type": "member",
            "entity_id": "m2",
            "generation": None,
            "rows": None,
            "offset": None,
            "active": None,
            "updated_at": None,
            "coefficients": [],
            "features": None,
            "metrics": [],
        }

    def test_guarded_commits_record_the_guard_and_its_facts_newest_first(self, store, spark):
        store.create("scores", SCORES)
        store.append("scores", scores(spark, ("a", 1, 0.1)), guard=Guard("nearline", 1, {"stream": "s", "batch": 0}))
        store.append("scores", scores(spark, ("b", 1, 0.2)))
        store.merge("scores", scores(spark, ("a", 2, 0.3)), ["entity_id"], guard=Guard("nightly", 9))
        store.overwrite("scores", scores(spark, ("c", 3, 0.4)), guard=Guard("nearline", 2, {"stream": "s", "batch": 1}))

        nearline = list(store.guarded_commits("scores", "nearline"))
        assert [(c.table_version, c.guard.version, dict(c.guard.facts)) for c in nearline] == [
            (4, 2, {"stream": "s", "batch": 1}),
            (1, 1, {"stream": "s", "batch": 0}),
        ]
        assert store.last_guarded_commit("scores", "nightly").guard == Guard("nightly", 9)
        assert store.last_guarded_commit("scores", "never") is None
        # A long history is read page by page.
        for version in range(3, 40):
            store.append("scores", scores(spark), guard=Guard("nearline", version, {"batch": version}))
        assert [c.guard.version for c in store.guarded_commits("scores", "nearline")] == [*range(39, 2, -1), 2, 1]
        assert store.last_guarded_commit("scores", "nightly").table_version == 3

    def test_partitioned_tables_read_only_the_partitions_asked_for(self, store, spark):
        partitioned = StructType([*SCORES.fields, StructField("day", StringType(), nullable=False)])
        store.create("days", partitioned, partition_by=["day"])
        store.create("days", partitioned, partition_by=["day"])
        assert store.partition_columns("days") == ["day"]
        with pytest.raises(ValueError, match=r"'days'.*partitioned by \['day'\]"):
            store.create("days", partitioned)
        rows = [("a", 1, 0.1, "2026-11-01"), ("b", 1, 0.2, "2026-11-02"), ("c", 2, 0.3, "2026-11-03")]
        store.append("days", spark.createDataFrame(rows, partitioned))
        assert store.read("days").columns == partitioned.fieldNames()
        assert content(store.read("days")) == sorted(rows)
        recent = store.read("days", where="day >= '2026-11-02'")
        assert content(recent) == sorted(rows[1:])
        assert all("2026-11-01" not in uri for uri in recent.inputFiles())
        # Column statistics prune files too: each append above wrote one file per day.
        late = store.read("days", where="batch_id >= 2")
        assert content(late) == [rows[2]]
        assert len(late.inputFiles()) == 1

        store.delete("days", "day < '2026-11-02'")
        assert content(store.read("days")) == sorted(rows[1:])
        store.merge("days", spark.createDataFrame([("b", 5, 5.0, "2026-11-02")], partitioned), ["entity_id", "day"])
        assert content(store.read("days")) == [("b", 5, 5.0, "2026-11-02"), rows[2]]


class TestDeltaRsStore(TableStoreContract):
    @pytest.fixture
    def store(self, spark, tmp_path):
        return DeltaRsStore(spark, str(tmp_path / "tables"))

    def test_a_relative_root_is_made_absolute(self, spark, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        store = DeltaRsStore(spark, "var/tables")
        assert store.root == str(tmp_path / "var" / "tables")
        assert store.path("scores") == str(tmp_path / "var" / "tables" / "scores")

    def test_a_root_with_spaces_and_hashes_reads_back(self, spark, tmp_path):
        # delta-rs percent-encodes such paths in its file URIs; Spark needs them decoded.
        store = DeltaRsStore(spark, str(tmp_path / "my tables #1"))
        store.create("scores", SCORES)
        store.append("scores", scores(spark, ("a", 1, 0.1)))
        assert content(store.read("scores")) == [("a", 1, 0.1)]

    @pytest.mark.parametrize("root", ["tables[1]", "tables{a,b}", "100%"])
    def test_a_root_delta_rs_or_spark_cannot_use_is_refused(self, spark, tmp_path, root):
        with pytest.raises(ConfigError, match=r"storage\.root"):
            DeltaRsStore(spark, str(tmp_path / root))

    def test_a_claim_beaten_to_its_commit_by_another_writer_fails_there(self, store, spark, monkeypatch):
        """Two writers take the same number at once: the one whose check passed first but commits second fails
        at its commit (the check and the commit read one snapshot), it does not write beside the other."""
        store.create("scores", SCORES)
        other = DeltaRsStore(spark, store.root)  # the second writer: another process's store
        monkeypatch.setenv(PAUSE_VARIABLE, "store:checked@late=8")  # only the late stream waits there
        outcome: dict[str, object] = {}

        def late() -> None:
            guard = Guard("nearline", 0, {"stream": "late", "stream_batch": 0}, claim=True)
            try:
                outcome["written"] = store.append("scores", scores(spark, ("late", 1, 0.1)), guard=guard)
            except ConcurrentWriterError as error:
                outcome["refused"] = str(error)

        writer = threading.Thread(target=late)
        writer.start()
        time.sleep(3)  # the late writer is in its pause by now (if not, the holder's check refuses it instead)
        early = Guard("nearline", 0, {"stream": "early", "stream_batch": 0}, claim=True)
        assert other.append("scores", scores(spark, ("early", 1, 0.2)), guard=early)
        writer.join()
        assert "written" not in outcome, outcome
        assert "batch 0 of app id 'nearline' was taken by another writer" in outcome["refused"]
        assert content(store.read("scores")) == [("early", 1, 0.2)]


class TestSparkDeltaStore(TableStoreContract):
    @pytest.fixture
    def store(self, spark, tmp_path):
        return SparkDeltaStore(spark, str(tmp_path / "tables"))

    def test_a_write_from_another_thread_never_commits_under_a_guarded_write_s_settings(
        self, store, spark, monkeypatch
    ):
        """A guarded SQL write sets its transaction in the session: a lease renewed meanwhile from another
        thread, through the same session, must wait for it, not commit under that transaction."""
        for name in ("scores", "leases"):
            store.create(name, SCORES)
        # Long enough for the other write to commit if it did not wait (Delta reads the settings at commit).
        monkeypatch.setenv(PAUSE_VARIABLE, "spark_delta:guard_set=15")
        guarded = threading.Thread(
            target=store.append, args=("scores", scores(spark, ("a", 1, 0.1))), kwargs={"guard": Guard("app", 7)}
        )
        guarded.start()
        while spark.conf.get(TXN_APP_ID, None) is None:  # the guarded write now holds its settings
            time.sleep(0.01)
        monkeypatch.delenv(PAUSE_VARIABLE)
        store.merge("leases", scores(spark, ("nightly", 1, 0.0)), ["entity_id"])
        guarded.join()
        assert store.transaction_version("scores", "app") == 7
        assert store.transaction_version("leases", "app") is None
        assert store.last_guarded_commit("leases", "app") is None


class TestSparkDeltaCatalogStore(TableStoreContract):
    """Managed tables by name in a catalog schema, as Unity Catalog users keep them (Spark's session catalog here)."""

    @pytest.fixture
    def store(self, spark):
        schema = f"contract_{uuid.uuid4().hex[:12]}"
        spark.sql(f"CREATE SCHEMA spark_catalog.{schema}")
        yield SparkDeltaStore(spark, None, catalog="spark_catalog", schema=schema)
        spark.sql(f"DROP SCHEMA spark_catalog.{schema} CASCADE")

    def test_tables_are_named_not_placed(self, store, spark):
        store.create("scores", SCORES)
        assert spark.catalog.tableExists(f"spark_catalog.{store.schema_name}.scores")
        assert store.identifier("scores") == f"`spark_catalog`.`{store.schema_name}`.`scores`"


def test_open_store_auto_takes_what_the_session_has(spark, tmp_path):
    store = open_store(spark, StorageConfig(backend="auto", root=str(tmp_path)))
    assert type(store) is (SparkDeltaStore if delta_available(spark) else DeltaRsStore)


def test_open_store_passes_storage_options_to_delta_rs(spark, tmp_path):
    options = {"timeout": "30s"}
    store = open_store(spark, StorageConfig(backend="delta-rs", root=str(tmp_path), storage_options=options))
    assert isinstance(store, DeltaRsStore)
    assert store.storage_options == options
    store.create("scores", SCORES)
    assert store.exists("scores")


def test_open_store_refuses_spark_delta_without_the_jar(tmp_path):
    """A session without Spark's Delta (no jars fetched) refuses the engine in one line, exit code 2."""
    environment = {**os.environ, ENV_VAR: str(tmp_path / "no-jars")}
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.nightly_retrain",
            "--config",
            "conf/local.yaml",
            "--set",
            "storage.backend=spark-delta",
            "--set",
            f"storage.root={tmp_path / 'tables'}",
        ],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert refused.returncode == CONFIG_ERROR_EXIT_CODE, refused.stderr[-2000:]
    (line,) = [line for line in refused.stderr.splitlines() if "storage.backend" in line]
    assert "io.delta:delta-spark_4.2_2.13" in line and "make jars" in line
    assert "Traceback" not in refused.stderr


def test_a_catalog_needs_spark_delta(spark):
    with pytest.raises(ConfigError, match=r"storage\.catalog"):
        open_store(spark, StorageConfig(backend="delta-rs", catalog="main", schema="lambda_learner"))


@pytest.mark.parametrize("writer_engine", ["delta-rs", "spark-delta"])
def test_a_table_written_by_one_engine_is_read_and_guarded_by_the_other(spark, tmp_path, writer_engine):
    root = str(tmp_path / "tables")
    engines = {"delta-rs": DeltaRsStore(spark, root), "spark-delta": SparkDeltaStore(spark, root)}
    writer = engines[writer_engine]
    reader = engines["spark-delta" if writer_engine == "delta-rs" else "delta-rs"]
    writer.create("scores", SCORES)
    writer.append("scores", scores(spark, ("a", 1, 0.1)), guard=Guard("nearline", 1, {"batch": 1}))
    writer.merge("scores", scores(spark, ("a", 2, 0.2), ("b", 2, 0.3)), ["entity_id"], guard=Guard("nearline", 2))

    assert content(reader.read("scores")) == [("a", 2, 0.2), ("b", 2, 0.3)]
    assert content(reader.read("scores", version=1)) == [("a", 1, 0.1)]
    assert [(c.version, c.operation) for c in reader.history("scores")] == [
        (0, "CREATE TABLE"),
        (1, "WRITE"),
        (2, "MERGE"),
    ]
    assert reader.transaction_version("scores", "nearline") == 2
    assert [c.guard for c in reader.guarded_commits("scores", "nearline")] == [
        Guard("nearline", 2),
        Guard("nearline", 1),
    ]
    assert reader.last_guarded_commit("scores", "nearline").table_version == 2
    # The other engine's guard holds: a replay writes nothing, the next version writes.
    assert not reader.append("scores", scores(spark, ("c", 9, 9.9)), guard=Guard("nearline", 2))
    assert reader.append("scores", scores(spark, ("c", 3, 0.4)), guard=Guard("nearline", 3))
    assert writer.transaction_version("scores", "nearline") == 3
    assert not writer.merge("scores", scores(spark, ("a", 9, 9.9)), ["entity_id"], guard=Guard("nearline", 3))
    assert content(writer.read("scores")) == [("a", 2, 0.2), ("b", 2, 0.3), ("c", 3, 0.4)]
