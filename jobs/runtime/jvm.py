"""The JVM jars the project fetched with Maven (``make jars``, ``jvm/fetch.py``), and the Spark settings that load them.

pip-installed pyspark ships Spark's own jars but neither Spark's Delta Lake nor its Kafka connector. ``jvm/fetch.py``
copies those (less everything pyspark already has) into ``<repo>/.jars/spark/``, and a Kafka broker for the tests
into ``<repo>/.jars/kafka/``. Nothing is downloaded when a session starts: a local session only gets these paths.

This module does not import pyspark, so the test launchers (a Kafka broker, a Spark Connect server) can use it too.
"""

from __future__ import annotations

import os
from pathlib import Path

# Names the folder holding ``spark/`` and ``kafka/`` (``jvm/fetch.py`` fetches into it too); else ``<repo>/.jars``.
ENV_VAR = "LAMBDA_LEARNER_JARS"
REPO_ROOT = Path(__file__).resolve().parents[2]
KINDS = ("spark", "kafka")

# Spark's Delta Lake, switched on only when its jar is among the fetched ones.
DELTA_JAR_PREFIX = "delta-spark_"
DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}


def jars_root() -> Path:
    """The folder that holds one sub-folder of jars per kind."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".jars"


def jar_paths(kind: str) -> list[str]:
    """Absolute paths of the fetched jars of ``kind`` ("spark" or "kafka"), sorted; [] if none were fetched."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of jars {kind!r}; expected one of {KINDS}")
    folder = jars_root() / kind
    if not folder.is_dir():
        return []
    return sorted(str(path) for path in folder.glob("*.jar"))


def spark_jars_conf() -> dict[str, str]:
    """Settings for a local session (or a ``spark-submit``) that put the fetched Spark jars on its classpath.

    With the Delta jar among them, Spark's Delta Lake is switched on as well (its SQL extension and its catalog as
    the session catalog). ``{}`` when nothing was fetched, so a cluster or Databricks session, which brings its own
    jars, is left alone.
    """
    jars = jar_paths("spark")
    if not jars:
        return {}
    # spark.jars, not spark.jars.packages: the jars are already here, and a session start must not download.
    conf = {"spark.jars": ",".join(jars)}
    if any(Path(jar).name.startswith(DELTA_JAR_PREFIX) for jar in jars):
        conf.update(DELTA_CONF)
    return conf
