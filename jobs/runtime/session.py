"""The Spark session: a local one built here, or the one a cluster or Databricks already has."""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from jobs.runtime.settings import SparkConfig

LOCAL_DEFAULTS = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.adaptive.enabled": "true",
}


def spark_session(config: SparkConfig) -> SparkSession:
    """``master: null`` takes the active (or spark-submit's) session; otherwise a local session is built."""
    if config.master is None:
        session = SparkSession.getActiveSession() or SparkSession.builder.appName(config.app_name).getOrCreate()
        for key, value in config.conf.items():
            session.conf.set(key, value)
        return session
    # Workers must run the driver's interpreter, so they import the same packages.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.master(config.master).appName(config.app_name)
    settings = {**LOCAL_DEFAULTS, "spark.sql.shuffle.partitions": str(config.shuffle_partitions), **config.conf}
    for key, value in settings.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session


def delta_available(spark: SparkSession) -> bool:
    """Whether Spark's own Delta Lake (the JVM classes) is on this session's classpath."""
    jvm = getattr(spark, "_jvm", None)
    if jvm is None:  # Spark Connect: no JVM handle; Databricks always has Delta
        return "DATABRICKS_RUNTIME_VERSION" in os.environ or "delta" in spark.conf.get("spark.sql.extensions", "")
    try:
        jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")
    except Exception:  # py4j reports ClassNotFoundException as a generic Py4JJavaError
        return False
    return True
