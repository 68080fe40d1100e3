"""Smoke tests of the fetched jars and the test services, for real: Spark's Delta Lake and Kafka connector in a classic
local session, a Kafka broker, and a Spark Connect server with a Python client.

The Connect client runs in a child Python process: in pyspark 4.2, ``SparkSession.builder.remote(url).getOrCreate()``
refuses to start while a classic SparkContext is active in the process (SESSION_ALREADY_EXIST), and once started it
sets ``SPARK_CONNECT_MODE_ENABLED`` for the whole process, which turns ``pyspark.sql.functions`` into Connect's for
every later classic test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jobs.runtime.jvm import spark_jars_conf
from tests.services.connect import ConnectServer
from tests.services.kafka import KafkaBroker


@pytest.fixture(scope="module")
def classic_spark():
    """A classic local session with the fetched jars; the run's shared one if it already has them."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    active = SparkContext._active_spark_context
    # getOrCreate would hand back a context started earlier in this process as it is: jars can't be added to it.
    if active is not None and "delta-spark_" not in active.getConf().get("spark.jars", ""):
        pytest.fail("this process's Spark session was started without jobs.runtime.jvm.spark_jars_conf()")
    builder = SparkSession.builder.master("local[2]").appName("lambda-learner-services-smoke")
    settings = {
        **spark_jars_conf(),
        "spark.sql.shuffle.partitions": "2",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.databricks.delta.snapshotPartitions": "2",  # not Delta's 50 tasks per state rebuild
    }
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    yield spark
    if active is None:  # a shared session is left to its owner
        spark.stop()


@pytest.fixture(scope="module")
def kafka_broker(tmp_path_factory):
    with KafkaBroker(tmp_path_factory.mktemp("kafka")) as broker:
        yield broker


def test_delta_table_in_a_classic_session(classic_spark, tmp_path):
    path = str(tmp_path / "delta_table")
    rows = [(1, "a"), (2, "b"), (3, "c")]
    classic_spark.createDataFrame(rows, "id long, name string").write.format("delta").save(path)
    classic_spark.createDataFrame([(4, "d")], "id long, name string").write.format("delta").mode("append").save(path)

    back = classic_spark.read.format("delta").load(path).orderBy("id").collect()
    assert [(row.id, row.name) for row in back] == [*rows, (4, "d")]
    assert (tmp_path / "delta_table" / "_delta_log").is_dir()
    # DESCRIBE HISTORY goes through the SQL extension and the Delta catalog.
    history = classic_spark.sql(f"DESCRIBE HISTORY delta.`{path}`").collect()
    assert [row.version for row in history] == [1, 0]


def test_kafka_sink_and_source_with_a_real_broker(classic_spark, kafka_broker):
    topic = "smoke"
    kafka_broker.create_topic(topic, partitions=1)
    payloads = [json.dumps({"entity": f"e{i}", "value": i}) for i in range(5)]
    frame = classic_spark.createDataFrame([(f"e{i}", p) for i, p in enumerate(payloads)], "key string, value string")
    frame.write.format("kafka").option("kafka.bootstrap.servers", kafka_broker.bootstrap_servers).option(
        "topic", topic
    ).save()

    def read_back() -> list[tuple[int, str]]:
        rows = (
            classic_spark.read.format("kafka")
            .option("kafka.bootstrap.servers", kafka_broker.bootstrap_servers)
            .option("subscribe", topic)
            .option("startingOffsets", "earliest")
            .option("endingOffsets", "latest")
            .load()
            .selectExpr("offset", "CAST(value AS STRING) AS value")
            .orderBy("offset")
            .collect()
        )
        return [(row.offset, row.value) for row in rows]

    # Two writing tasks: the order in the topic is theirs, so compare offsets and contents.
    first = read_back()
    assert [offset for offset, _ in first] == [0, 1, 2, 3, 4]
    assert sorted(value for _, value in first) == sorted(payloads)
    assert kafka_broker.offsets(topic, "latest") == {0: 5}

    # The broker drops offsets 0 and 1 for good: a reader from the earliest offset now starts at 2.
    kafka_broker.delete_records(topic, partition=0, before_offset=2)
    assert kafka_broker.offsets(topic, "earliest") == {0: 2}
    assert read_back() == first[2:]


CONNECT_CLIENT = textwrap.dedent(
    """
    import json, sys
    import pandas as pd
    from pyspark.sql import SparkSession

    url, path = sys.argv[1], sys.argv[2]
    spark = SparkSession.builder.remote(url).getOrCreate()

    def per_entity(pdf: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"entity": [pdf["entity"].iloc[0]], "total": [float(pdf["x"].sum())]})

    frame = spark.createDataFrame([("a", 1.0), ("a", 2.0), ("b", 5.0)], "entity string, x double")
    totals = frame.groupBy("entity").applyInPandas(per_entity, "entity string, total double")
    totals.write.format("delta").save(path)
    back = spark.read.format("delta").load(path).orderBy("entity").collect()
    print(json.dumps({"rows": [[r.entity, r.total] for r in back], "version": spark.version}))
    spark.stop()
    """
)


def test_connect_server_runs_pandas_udfs_and_delta(tmp_path):
    with ConnectServer(tmp_path / "connect") as server:
        assert server.url.startswith("sc://127.0.0.1:")
        result = subprocess.run(
            [sys.executable, "-c", CONNECT_CLIENT, server.url, str(tmp_path / "connect_delta")],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\nserver log: {server.log_path}"
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["rows"] == [["a", 3.0], ["b", 5.0]]
    assert output["version"].startswith("4.2")
    assert (tmp_path / "connect_delta" / "_delta_log").is_dir()
