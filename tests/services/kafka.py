"""A real single-node Kafka 4.4 broker for the tests, run from the jars ``make jars`` fetched into ``.jars/kafka``.

One JVM in KRaft mode (broker and controller in one process, no ZooKeeper) on free ports of 127.0.0.1, with its
config, data and log in a folder the caller gives (a pytest ``tmp_path``). Topics are made, records written and
deleted with Kafka's own tools (``java -cp`` on the same jars), so the tests need no Python Kafka client (and no
Spark session of their own: Spark's Kafka sink would do too, but its cached producers outlive the broker).

    with KafkaBroker(tmp_path / "kafka") as broker:
        broker.create_topic("events", partitions=2)
        broker.produce("events", ['{"event_id": "e1"}', ...])
"""

from __future__ import annotations

import atexit
import base64
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from jobs.runtime.jvm import jar_paths
from tests.services import ServiceError, accepts_connections, free_port, stop_process, tail, wait_until

HOST = "127.0.0.1"
# Kafka 4.4.0's class names (the admin commands moved from kafka.admin (Scala) to org.apache.kafka.tools in 4.0).
SERVER_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
TOPIC_COMMAND = "org.apache.kafka.tools.TopicCommand"
CONFIG_COMMAND = "org.apache.kafka.tools.ConfigCommand"
DELETE_RECORDS_COMMAND = "org.apache.kafka.tools.DeleteRecordsCommand"
GET_OFFSET_SHELL = "org.apache.kafka.tools.GetOffsetShell"
CONSOLE_PRODUCER = "org.apache.kafka.tools.ConsoleProducer"
# The line KafkaRaftServer logs once the broker is unfenced and serving; an open port alone comes a little earlier.
STARTED_LINE = "Kafka Server started"

# Topic settings under which the broker deletes old data within seconds (for tests of offsets that disappear).
# Only closed segments are deleted, and a segment closes when a later append finds it older than segment.ms, so this
# is not deterministic: ``KafkaBroker.delete_records`` is.
SHORT_RETENTION = {
    "retention.ms": "1000",
    "segment.ms": "100",
    "file.delete.delay.ms": "0",
}

# A small JVM: the tests share 2 cores with Spark. Tiered level 1 starts the JVM faster and is plenty for tests.
BROKER_JVM_OPTS = ["-Xmx256m", "-Xms64m", "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true"]
TOOL_JVM_OPTS = ["-Xmx128m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]

LOG4J2_CONFIG = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""
# The admin tools log to stderr, warnings only (their errors are what a failed call reports).
TOOL_LOG4J2_CONFIG = """\
status = warn
appender.err.type = Console
appender.err.name = err
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = err
"""


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (as ``StorageTool random-uuid`` makes)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


class KafkaBroker:
    """A single-node KRaft Kafka broker (broker and controller in one JVM) for one test session.

    ``workdir`` holds ``server.properties``, the data (``data/``) and ``kafka.log``. ``broker_config`` adds or
    overrides ``server.properties`` entries.
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        broker_config: Mapping[str, str] | None = None,
        start_timeout: float = 90.0,
        stop_timeout: float = 20.0,
        java: str | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.java = java or shutil.which("java") or "java"
        self.port = 0
        self.controller_port = 0
        self.log_path = self.workdir / "kafka.log"
        self._broker_config = dict(broker_config or {})
        self._process: subprocess.Popen | None = None
        jars = jar_paths("kafka")
        if not jars:
            raise ServiceError("no Kafka jars: run `make jars` (jvm/fetch.py) first")
        # The JVM expands the folder/* wildcard itself, which keeps the command line short.
        self.classpath = str(Path(jars[0]).parent / "*")

    # -- life cycle ---------------------------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for ``kafka.bootstrap.servers``."""
        if not self.port:
            raise ServiceError("the broker has not been started")
        return f"{HOST}:{self.port}"

    def start(self) -> KafkaBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.controller_port = free_port(HOST), free_port(HOST)
        while self.controller_port == self.port:
            self.controller_port = free_port(HOST)
        properties = self.workdir / "server.properties"
        properties.write_text(self._server_properties())
        log4j = self.workdir / "log4j2.properties"
        log4j.write_text(LOG4J2_CONFIG.format(log=self.log_path))
        (self.workdir / "tools-log4j2.properties").write_text(TOOL_LOG4J2_CONFIG)
        # KRaft needs its metadata log formatted with a cluster id before the first start.
        self._java(
            STORAGE_TOOL, ["format", "--cluster-id", _cluster_id(), "--config", str(properties), "--ignore-formatted"]
        )
        out = (self.workdir / "kafka.out").open("ab")
        try:
            self._process = subprocess.Popen(
                [
                    self.java,
                    *BROKER_JVM_OPTS,
                    f"-Dlog4j2.configurationFile={log4j}",
                    f"-Dkafka.logs.dir={self.workdir}",
                    "-cp",
                    self.classpath,
                    SERVER_CLASS,
                    str(properties),
                ],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so that stopping it reaches nothing else
            )
        finally:
            out.close()
        atexit.register(self.stop)  # a test run that dies without leaving the context still stops the broker
        try:
            wait_until(self._ready, self._process, self.start_timeout, "the Kafka broker", self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if not accepts_connections(HOST, self.port):
            return False
        try:
            return STARTED_LINE in self.log_path.read_text(errors="replace")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM (a controlled shutdown), then SIGKILL after ``stop_timeout`` seconds."""
        atexit.unregister(self.stop)
        if self._process is not None:
            stop_process(self._process, self.stop_timeout)
            self._process = None

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _server_properties(self) -> str:
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{HOST}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.workdir / "data"),
            "num.partitions": "1",
            # One broker: every internal topic with one replica.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Consumers in tests join at once instead of after the default 3 s.
            "group.initial.rebalance.delay.ms": "0",
            # Retention is checked every second, so a topic with SHORT_RETENTION loses data within seconds.
            "log.retention.check.interval.ms": "1000",
            "log.segment.delete.delay.ms": "0",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "background.threads": "2",
            **self._broker_config,
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    # -- admin --------------------------------------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1, config: Mapping[str, str] | None = None) -> None:
        """Create a topic (one replica); ``config`` sets topic settings, e.g. ``SHORT_RETENTION``."""
        args = ["--bootstrap-server", self.bootstrap_servers, "--create", "--topic", name]
        args += ["--partitions", str(partitions), "--replication-factor", "1"]
        for key, value in (config or {}).items():
            args += ["--config", f"{key}={value}"]
        self._java(TOPIC_COMMAND, args)

    def set_topic_config(self, name: str, config: Mapping[str, str]) -> None:
        """Change settings of an existing topic, e.g. ``SHORT_RETENTION`` to have the broker delete its old data."""
        pairs = ",".join(f"{key}={value}" for key, value in config.items())
        args = ["--bootstrap-server", self.bootstrap_servers, "--alter", "--entity-type", "topics"]
        args += ["--entity-name", name, "--add-config", pairs]
        self._java(CONFIG_COMMAND, args)

    def produce(self, topic: str, values: Iterable[str], *, keys: Iterable[str] | None = None) -> int:
        """Write one record per value (a line of text) to ``topic``, in order, with Kafka's console producer.

        With ``keys`` (one per value) a record's partition is its key's hash, as any producer's default; without,
        the producer picks. Values and keys hold no newline, keys no tab. Returns how many records were written
        (all of them, acknowledged by the broker, or this raises).
        """
        values = list(values)
        args = ["--bootstrap-server", self.bootstrap_servers, "--topic", topic]
        args += ["--producer-property", "acks=all", "--producer-property", "linger.ms=5"]
        if keys is None:
            lines = values
        else:
            keys = list(keys)
            if len(keys) != len(values):
                raise ValueError(f"{len(keys)} keys for {len(values)} values")
            lines = [f"{key}\t{value}" for key, value in zip(keys, values, strict=True)]
            args += ["--property", "parse.key=true", "--property", "key.separator=\t"]
        if any("\n" in line or "\r" in line for line in lines):
            raise ValueError("a record's value or key holds a line break: the console producer would split it")
        # A record the broker refused is an ERROR line of the producer's log; the tool itself still exits 0.
        self._java(CONSOLE_PRODUCER, args, stdin="".join(f"{line}\n" for line in lines), errors_logged_fail=True)
        return len(lines)

    def delete_records(self, topic: str, partition: int, before_offset: int) -> None:
        """Delete every record of ``topic``'s ``partition`` below ``before_offset``: its earliest offset becomes that.

        A consumer whose next offset is below it then finds its offsets gone, deterministically (unlike retention).
        """
        spec = {"partitions": [{"topic": topic, "partition": partition, "offset": before_offset}], "version": 1}
        spec_file = self.workdir / f"delete-records-{topic}-{partition}-{before_offset}.json"
        spec_file.write_text(json.dumps(spec))
        self._java(
            DELETE_RECORDS_COMMAND, ["--bootstrap-server", self.bootstrap_servers, "--offset-json-file", str(spec_file)]
        )

    def offsets(self, topic: str, which: str = "latest") -> dict[int, int]:
        """Each partition's earliest (``which="earliest"``) or latest (next to be written) offset."""
        time_arg = {"earliest": "-2", "latest": "-1"}[which]
        output = self._java(
            GET_OFFSET_SHELL, ["--bootstrap-server", self.bootstrap_servers, "--topic", topic, "--time", time_arg]
        )
        result: dict[int, int] = {}
        for line in output.splitlines():  # topic:partition:offset
            parts = line.strip().rsplit(":", 2)
            if len(parts) == 3 and parts[0] == topic:
                result[int(parts[1])] = int(parts[2])
        return result

    def _java(
        self,
        main_class: str,
        args: Sequence[str],
        timeout: float = 120.0,
        stdin: str | None = None,
        errors_logged_fail: bool = False,
    ) -> str:
        """Run one of Kafka's command-line tools on the fetched jars; its stdout, or an error with its output."""
        log4j = self.workdir / "tools-log4j2.properties"
        cmd = [self.java, *TOOL_JVM_OPTS, f"-Dlog4j2.configurationFile={log4j}", "-cp", self.classpath, main_class]
        cmd += list(args)
        started = time.monotonic()
        result = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.workdir
        )
        took = time.monotonic() - started
        # The tools print some failures and still exit 0 (DeleteRecordsCommand reports per partition).
        failed = result.returncode != 0 or "Error" in result.stdout or "Exception" in result.stdout
        failed = failed or (errors_logged_fail and any(line.startswith("ERROR") for line in result.stderr.splitlines()))
        if failed:
            raise ServiceError(
                f"{main_class} {' '.join(args)} failed (exit {result.returncode}, after {took:.1f} s):\n"
                f"{result.stdout}\n{result.stderr}\nbroker log {self.log_path}:\n{tail(self.log_path, 15)}"
            )
        return result.stdout
