"""A local Spark Connect server for the tests: pip-installed pyspark's ``spark-submit`` in a separate process.

``spark-submit --class org.apache.spark.sql.connect.service.SparkConnectServer`` needs no application jar (Spark
recognises the class and runs it as "spark-internal"; the server itself is in pyspark's ``jars/``). It runs
``local[2]`` with the jars ``make jars`` fetched (Delta Lake on, Kafka source and sink), listens on a free port of
127.0.0.1, and runs Python UDFs, ``mapInPandas``/``applyInPandas`` and ``foreachBatch`` workers with this venv's
Python. Clients connect with ``SparkSession.builder.remote(server.url).getOrCreate()`` (which needs pyspark's
``connect`` extra: grpcio, grpcio-status, googleapis-common-protos, zstandard, plus pandas, pyarrow, numpy).

    with ConnectServer(tmp_path / "connect") as server:
        spark = SparkSession.builder.remote(server.url).getOrCreate()
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from jobs.runtime.jvm import REPO_ROOT, spark_jars_conf
from tests.services import ServiceError, accepts_connections, free_port, stop_process, wait_until

HOST = "127.0.0.1"
SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"

# Small and quiet for 2 shared cores; the caller's ``conf`` overrides any of these.
DEFAULT_CONF = {
    "spark.sql.shuffle.partitions": "2",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    # Delta rebuilds a table's state with 50 tasks by default: most of a small test's time on 2 cores.
    "spark.databricks.delta.snapshotPartitions": "2",
}

# The server's log: warnings and errors, on stderr (which goes to connect.log).
LOG4J2_CONFIG = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
"""


def spark_home() -> Path:
    """pip-installed pyspark's folder, which is a SPARK_HOME (``bin/spark-submit``, ``jars/``)."""
    env = os.environ.get("SPARK_HOME")
    if env and (Path(env) / "bin" / "spark-submit").exists():
        return Path(env)
    import pyspark  # only here: the module itself stays importable without pyspark

    return Path(pyspark.__file__).resolve().parent


class ConnectServer:
    """A Spark Connect server (``local[2]``) in its own process, for one test session.

    ``workdir`` is its working directory: its warehouse, scratch space and ``connect.log`` go there.
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        conf: Mapping[str, str] | None = None,
        master: str = "local[2]",
        driver_memory: str = "1g",
        python: str | None = None,
        start_timeout: float = 120.0,
        stop_timeout: float = 20.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.master = master
        self.driver_memory = driver_memory
        # The venv's Python, so that the server's Python workers import what the tests import.
        self.python = python or sys.executable
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port = 0
        self.log_path = self.workdir / "connect.log"
        self._conf = dict(conf or {})
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``sc://127.0.0.1:<port>`` for ``SparkSession.builder.remote``."""
        if not self.port:
            raise ServiceError("the Spark Connect server has not been started")
        return f"sc://{HOST}:{self.port}"

    def command(self) -> list[str]:
        jars_conf = spark_jars_conf()
        if not jars_conf:
            raise ServiceError("no Spark jars: run `make jars` (jvm/fetch.py) first")
        conf = {
            **DEFAULT_CONF,
            **jars_conf,
            "spark.connect.grpc.binding.address": HOST,
            "spark.connect.grpc.binding.port": str(self.port),
            "spark.sql.warehouse.dir": str(self.workdir / "warehouse"),
            "spark.local.dir": str(self.workdir / "tmp"),
            **self._conf,
        }
        cmd = [
            str(spark_home() / "bin" / "spark-submit"),
            "--class",
            SERVER_CLASS,
            "--name",
            "lambda-learner-tests-connect",
            "--master",
            self.master,
            "--driver-memory",
            self.driver_memory,
        ]
        for key, value in conf.items():
            cmd += ["--conf", f"{key}={value}"]
        return cmd

    def start(self) -> ConnectServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(HOST)
        home = spark_home()
        env = {
            **os.environ,
            "SPARK_HOME": str(home),
            "PYSPARK_PYTHON": self.python,
            "PYSPARK_DRIVER_PYTHON": self.python,
            # Python workers get the server's PYTHONPATH: the project's packages import there as in the tests.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            # No conf/ folder of the machine's Spark, if it has one: this server is configured only here.
            "SPARK_CONF_DIR": str(self.workdir / "conf"),
        }
        (self.workdir / "conf").mkdir(exist_ok=True)
        # Warnings and errors only: Spark's INFO lines (several per request) cost the shared cores real time.
        (self.workdir / "conf" / "log4j2.properties").write_text(LOG4J2_CONFIG)
        out = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                self.command(),
                cwd=self.workdir,  # derby.log, metastore_db, spark-warehouse land here, not in the repo
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopping it reaches the JVM and nothing else
            )
        finally:
            out.close()
        atexit.register(self.stop)
        try:
            # The gRPC port opens only after the SparkContext is up, so an open port means ready.
            wait_until(
                lambda: accepts_connections(HOST, self.port),
                self._process,
                self.start_timeout,
                "the Spark Connect server",
                self.log_path,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM (Spark's shutdown hooks stop the server and the SparkContext), then SIGKILL."""
        atexit.unregister(self.stop)
        if self._process is not None:
            stop_process(self._process, self.stop_timeout)
            self._process = None

    def __enter__(self) -> ConnectServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
