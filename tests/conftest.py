"""One local Spark session for the whole test run (starting one takes seconds), with Spark's Delta Lake in it."""

import importlib.util
import os
import sys

import pytest

from jobs.runtime.jvm import jar_paths
from jobs.runtime.settings import SparkConfig

# Spark Connect's client side (pyspark[connect]): the Connect tests need it, as Databricks serverless does.
CONNECT_CLIENT_MODULES = ("grpc", "grpc_status", "google.rpc.status_pb2", "zstandard")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def pytest_sessionstart(session):
    """Every part the tests run for real is there, or the run stops here with what to do (no test skips for it)."""
    missing = [f"{kind} jars (run `make jars`)" for kind in ("spark", "kafka") if not jar_paths(kind)]
    missing += [
        f"Python module {name} (pip install 'pyspark[connect]')"
        for name in CONNECT_CLIENT_MODULES
        if not _installed(name)
    ]
    if missing:
        raise pytest.UsageError("the tests need: " + "; ".join(missing))
    from tests.services.class_archive import archive_options, class_archive

    # Every JVM the tests start, this process's session and each job process's, loads the classes pre-parsed.
    # Only a speed-up: without an archive the tests run as they are, slower.
    try:
        os.environ["JDK_JAVA_OPTIONS"] = archive_options(class_archive())
    except RuntimeError as error:
        sys.stderr.write(f"the tests run without a class archive: {error}\n")


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from jobs.runtime.session import spark_session

    # Managed tables (the catalog store's) go to a folder of the run, not the working directory.
    warehouse = tmp_path_factory.mktemp("warehouse")
    settings = SparkConfig(
        master="local[2]",
        app_name="lambda-learner-tests",
        shuffle_partitions=2,
        conf={"spark.sql.warehouse.dir": str(warehouse)},
    )
    session = spark_session(settings)
    yield session
    session.stop()
