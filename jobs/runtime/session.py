"""The Spark session: a local one built here, a Spark Connect one, or the one a cluster or Databricks already has."""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from jobs.runtime.jvm import DELTA_CONF, spark_jars_conf
from jobs.runtime.settings import SparkConfig

# Every session the jobs run in reads and writes times in UTC, local or not.
SESSION_DEFAULTS = {"spark.sql.session.timeZone": "UTC"}
LOCAL_DEFAULTS = {
    **SESSION_DEFAULTS,
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.adaptive.enabled": "true",
    # Delta rebuilds a snapshot with 50 tasks by default: far more than one machine's tables need.
    "spark.databricks.delta.snapshotPartitions": "2",
}


def spark_session(config: SparkConfig) -> SparkSession:
    """A Spark Connect session (``remote``), the active one (``master: null``), or a new local one.

    Local sessions get the jars ``make jars`` fetched (Spark's Delta Lake, the Kafka connector);
    nothing is downloaded at start.
    """
    if config.remote is not None:
        return _configured(SparkSession.builder.remote(config.remote).getOrCreate(), config)
    if config.master is None:
        active = SparkSession.getActiveSession() or SparkSession.builder.appName(config.app_name).getOrCreate()
        return _configured(active, config)
    # Workers must run the driver's interpreter, so they import the same packages.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.master(config.master).appName(config.app_name)
    settings = {
        **LOCAL_DEFAULTS,
        **spark_jars_conf(),
        "spark.sql.shuffle.partitions": str(config.shuffle_partitions),
        **config.conf,
    }
    for key, value in settings.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session


def _configured(session: SparkSession, config: SparkConfig) -> SparkSession:
    for key, value in {**SESSION_DEFAULTS, **config.conf}.items():
        session.conf.set(key, value)
    return session


def delta_available(spark: SparkSession) -> bool:
    """Whether the session has Spark's own Delta Lake: its SQL extension configured, or Databricks Runtime."""
    extensions = spark.conf.get("spark.sql.extensions", "") or ""
    return DELTA_CONF["spark.sql.extensions"] in extensions or "DATABRICKS_RUNTIME_VERSION" in os.environ
