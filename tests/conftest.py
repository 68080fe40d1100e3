"""One local Spark session for the whole test run (starting one takes seconds)."""

import pytest

from jobs.runtime.settings import SparkConfig


@pytest.fixture(scope="session")
def spark():
    from jobs.runtime.session import spark_session

    session = spark_session(SparkConfig(master="local[2]", app_name="lambda-learner-tests", shuffle_partitions=2))
    yield session
    session.stop()
