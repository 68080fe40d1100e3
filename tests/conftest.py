"""One local Spark session for the whole test run (starting one takes seconds), with Spark's Delta Lake in it."""

import pytest

from jobs.runtime.settings import SparkConfig


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
