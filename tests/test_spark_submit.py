"""The jobs on a real Spark standalone cluster, submitted with spark-submit as docs/deploy.md says, word for word.

A master and two workers run from the pip-installed pyspark on 127.0.0.1. The spark-submit commands are read from
docs/deploy.md and run as they are, from the repository's folder: the jars ``make jars`` fetched (Spark's Delta
Lake, the Kafka connector) shipped with ``--jars``, the project's code as the ``--py-files`` zip and the executors'
Python as the packed environment (``--archives``) of ``make dist``. Only the master's address is replaced, a few
settings for this small machine are added, and ``--set`` overrides follow ``--config conf/cluster.yaml``. The
nearline job reads a real Kafka broker's topic and both jobs write Spark's Delta tables (``storage.backend:
spark-delta``, as conf/cluster.yaml says), read back here with delta-rs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyspark
import pytest
from deltalake import DeltaTable

from jobs.runtime.jvm import jar_paths
from jobs.simulate.writers import generate
from tests.jobs.streams import stream_spec
from tests.services.kafka import KafkaBroker

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"
CODE_ZIP = DIST / "lambda_learner_spark.zip"
ENVIRONMENT = DIST / "lambda_learner_spark_env.tar.gz"
SPARK_HOME = Path(pyspark.__file__).resolve().parent
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
# The master the documented commands name; the test's cluster replaces it.
DOCUMENTED_MASTER = "spark://master:7077"
WORKERS = 2
SUBMIT_TIMEOUT = 600.0
# Variables that would hand the daemons or the executors the test's own interpreter or paths.
INHERITED = ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "PYTHONPATH", "PYTHONHOME", "SPARK_HOME", "SPARK_CONF_DIR")
TOPIC = "training-events"

# Runs on the executors: where the interpreter, the project's code and a dependency come from.
PROBE = """
import json
import os
import sys

from pyspark.sql import SparkSession


def whereabouts(_):
    import numpy
    import pandas

    import lambda_learner
    import udfs.entity_kernels

    yield {
        "cwd": os.getcwd(),
        "executable": sys.executable,
        "prefix": sys.prefix,
        "path": sys.path,
        "numpy": numpy.__file__,
        "pandas": pandas.__file__,
        "lambda_learner": lambda_learner.__file__,
        "udfs": udfs.entity_kernels.__file__,
    }


spark = SparkSession.builder.appName("where-executors-import-from").getOrCreate()
print(json.dumps(spark.sparkContext.parallelize(range(8), 8).mapPartitions(whereabouts).collect()))
spark.stop()
"""


@dataclass(frozen=True)
class Cluster:
    master: str
    work_dirs: tuple[Path, ...]
    conf_dir: Path  # empty: no spark-defaults.conf from elsewhere


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without Python or Spark settings, everything bound to 127.0.0.1."""
    environment = {key: value for key, value in os.environ.items() if key not in INHERITED}
    return environment | {"SPARK_HOME": str(SPARK_HOME), "SPARK_LOCAL_IP": "127.0.0.1"} | extra


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process's group (a worker's executors, a driver's Python), then SIGKILL to what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return  # the whole group is gone
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)


@pytest.fixture(scope="module")
def dist() -> Path:
    """The artifacts, built once for this module exactly as ``make dist`` builds them."""
    built = subprocess.run(["make", "dist"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert CODE_ZIP.is_file() and ENVIRONMENT.is_file()
    return DIST


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A master and two one-core, 1 GiB workers on free ports of 127.0.0.1, killed at the end."""
    folder = tmp_path_factory.mktemp("cluster")
    (folder / "conf").mkdir()
    environment = clean_environment(
        SPARK_CONF_DIR=str(folder / "conf"), SPARK_LOCAL_DIRS=str(folder / "local"), SPARK_DAEMON_MEMORY="512m"
    )
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    port = free_port()
    master = f"spark://127.0.0.1:{port}"
    commands = [
        [
            spark_class,
            "org.apache.spark.deploy.master.Master",
            *("--host", "127.0.0.1", "--port", str(port), "--webui-port", str(free_port())),
        ]
    ]
    work_dirs = tuple(folder / f"worker-{number}" for number in range(WORKERS))
    for work_dir in work_dirs:
        commands.append(
            [
                spark_class,
                "org.apache.spark.deploy.worker.Worker",
                master,
                *("--host", "127.0.0.1", "--cores", "1", "--memory", "1g"),
                *("--port", str(free_port()), "--webui-port", str(free_port()), "--work-dir", str(work_dir)),
            ]
        )
    processes: list[subprocess.Popen] = []
    logs = [folder / f"daemon-{number}.log" for number in range(len(commands))]
    try:
        for command, log in zip(commands, logs, strict=True):
            with log.open("wb") as output:
                processes.append(
                    subprocess.Popen(
                        command,
                        cwd=folder,
                        env=environment,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group, so that stop() reaches its children
                    )
                )
        wait_for_workers(logs[0], processes)
        yield Cluster(master, work_dirs, folder / "conf")
    finally:
        for process in reversed(processes):
            stop(process)


def wait_for_workers(master_log: Path, processes: Sequence[subprocess.Popen], timeout: float = 120.0) -> None:
    """Until the master has registered every worker; a daemon that dies fails the test with its log."""
    deadline = time.monotonic() + timeout
    while master_log.read_text(errors="replace").count("Registering worker") < WORKERS:
        dead = [process for process in processes if process.poll() is not None]
        assert not dead and time.monotonic() < deadline, master_log.read_text(errors="replace")[-3000:]
        time.sleep(0.5)


def documented_commands() -> dict[str, list[str]]:
    """The spark-submit commands of docs/deploy.md (indented code, continued lines joined), by their script's name."""
    commands: list[str] = []
    current: str | None = None
    for line in DEPLOY_DOC.read_text().splitlines():
        if current is None and not line.startswith("    spark-submit "):
            continue
        current = line.strip() if current is None else f"{current} {line.strip()}"
        if current.endswith("\\"):
            current = current[:-1].rstrip()
        else:
            commands.append(current)
            current = None
    scripts = {}
    for command in commands:
        tokens = shlex.split(command)
        (script,) = [token for token in tokens if token.endswith(".py")]
        scripts[Path(script).name] = tokens
    return scripts


def on_cluster(documented: Sequence[str], cluster: Cluster, workspace: Path) -> list[str]:
    """A documented command for the test's cluster: its master, and settings for one small machine."""
    assert documented[0] == "spark-submit" and DOCUMENTED_MASTER in documented, documented
    command = [str(SPARK_HOME / "bin" / "spark-submit")]
    command += [cluster.master if token == DOCUMENTED_MASTER else token for token in documented[1:]]
    settings = {
        "spark.driver.host": "127.0.0.1",
        "spark.ui.enabled": "false",
        "spark.executor.memory": "1g",
        "spark.executor.cores": "1",
        "spark.sql.shuffle.partitions": "2",
        # Delta rebuilds a snapshot with 50 tasks by default: most of a small job's time on two one-core workers.
        "spark.databricks.delta.snapshotPartitions": "2",
        "spark.sql.warehouse.dir": str(workspace / "warehouse"),
    }
    extra = [item for key, value in settings.items() for item in ("--conf", f"{key}={value}")]
    return [command[0], *extra, *command[1:]]


def submit(command: Sequence[str], cluster: Cluster) -> subprocess.CompletedProcess:
    """Run a spark-submit command from the repository's folder, as docs/deploy.md says."""
    environment = clean_environment(SPARK_CONF_DIR=str(cluster.conf_dir))
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=SUBMIT_TIMEOUT)
    finally:
        stop(process)  # a timed-out driver and whatever it started
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    with KafkaBroker(tmp_path_factory.mktemp("kafka")) as running:
        yield running


def last_json(output: str):
    """The last JSON line a job printed: spark-submit mixes the driver's log lines into its output."""
    return json.loads([line for line in output.splitlines() if line.startswith(("{", "["))][-1])


def test_the_documented_commands_ship_the_fetched_jars_and_the_dist_artifacts():
    commands = documented_commands()
    assert set(commands) == {"nearline_update.py", "nightly_retrain.py"}
    for tokens in commands.values():
        options = dict(zip(tokens[1::2], tokens[2::2], strict=False))
        assert options["--jars"] == ".jars/spark/*.jar"
        assert {Path(jar).name for jar in jar_paths("spark")} >= {
            "delta-spark_4.2_2.13-4.4.0.jar",
            "spark-sql-kafka-0-10_2.13-4.2.0.jar",
        }
        assert (ROOT / options["--py-files"]) == CODE_ZIP
        assert options["--archives"] == f"{ENVIRONMENT.relative_to(ROOT)}#environment"
        assert tokens[-2:] == ["--config", "conf/cluster.yaml"]


def test_the_executors_run_the_shipped_environment_and_code(dist: Path, cluster: Cluster, tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    documented = documented_commands()["nearline_update.py"]
    options = documented[: next(index for index, token in enumerate(documented) if token.endswith(".py"))]
    result = submit([*on_cluster(options, cluster, tmp_path), str(script)], cluster)
    assert result.returncode == 0, result.stderr[-5000:]
    places = last_json(result.stdout)

    assert len(places) == 8
    for place in places:
        executor_dir = Path(place["cwd"])
        assert any(executor_dir.is_relative_to(work_dir) for work_dir in cluster.work_dirs), place
        environment = executor_dir / "environment"
        # The packed environment's interpreter, its site-packages, the shipped zip's modules.
        assert Path(place["executable"]) == environment / "bin" / "python", place
        assert Path(place["prefix"]) == environment, place
        for module in ("numpy", "pandas"):
            assert Path(place[module]).is_relative_to(environment / "lib"), place
        for module in ("lambda_learner", "udfs"):
            assert f"{CODE_ZIP.name}/" in place[module] and not place[module].startswith(str(ROOT)), place
        # Nothing of the repository or of the project's virtualenv on the executors' path but Spark's
        # own zips and jars, which the pip-installed Spark (SPARK_HOME) keeps in the virtualenv.
        foreign = [entry for entry in place["path"] if entry.startswith((str(ROOT), sys.prefix))]
        assert all(Path(entry).is_relative_to(SPARK_HOME) for entry in foreign), place


def test_the_nearline_then_the_nightly_job_run_on_the_cluster_from_kafka_into_spark_delta_tables(
    dist: Path, cluster: Cluster, broker: KafkaBroker, tmp_path: Path
) -> None:
    stream = generate(stream_spec(events=600, slices=2, bad_event_rate=0.02), tmp_path / "stream")
    records = [line for path in stream.files for line in path.read_text().splitlines()]
    broker.create_topic(TOPIC, partitions=1)
    broker.produce(TOPIC, records)
    tables = tmp_path / "tables"
    # After the documented --config conf/cluster.yaml: this machine's tables, broker and a stream that ends.
    overrides = {
        "storage.root": str(tables),
        "stream.options.kafka.bootstrap.servers": broker.bootstrap_servers,
        "stream.options.subscribe": TOPIC,
        "stream.trigger": "available_now",
        "stream.checkpoint": str(tmp_path / "checkpoint"),
        "stream.max_offsets_per_trigger": str(math.ceil(len(records) / 2)),  # two micro-batches
        "nearline.entity_buckets": "4",
        "nightly.entity_buckets": "4",
        "nightly.holdout_hours": "1",
        "nightly.passes": "1",
    }
    arguments = [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
    commands = documented_commands()

    nearline = submit([*on_cluster(commands["nearline_update.py"], cluster, tmp_path), *arguments], cluster)
    assert nearline.returncode == 0, nearline.stderr[-5000:]
    assert (tables / "events" / "_delta_log").is_dir()
    events = DeltaTable(str(tables / "events")).to_pyarrow_table()
    quarantined = DeltaTable(str(tables / "quarantine")).to_pyarrow_table()
    assert events.num_rows + quarantined.num_rows == len(records)
    assert pc.count_distinct(events["event_id"]).as_py() == events.num_rows
    assert sorted(pc.unique(events["batch_id"]).to_pylist()) == [0, 1]
    metrics = DeltaTable(str(tables / "metrics")).to_pyarrow_table()
    assert pc.sum(pc.equal(metrics["job"], "nearline")).as_py() == 2
    state = DeltaTable(str(tables / "re_state")).to_pyarrow_table()
    assert set(state["re_type"].to_pylist()) == {"per_member", "per_item"}
    # Written by Spark's Delta Lake (the commits name their engine), not by delta-rs.
    engines = {str(entry.get("engineInfo", "")) for entry in DeltaTable(str(tables / "re_state")).history()}
    assert any("Delta-Lake" in engine for engine in engines), engines

    nightly = submit([*on_cluster(commands["nightly_retrain.py"], cluster, tmp_path), *arguments], cluster)
    assert nightly.returncode == 0, nightly.stderr[-5000:]
    report = last_json(nightly.stdout)
    assert report["status"] == "published" and report["generation"] == 1, report
    fixed_effect = DeltaTable(str(tables / "fixed_effect")).to_pyarrow_table()
    assert fixed_effect.num_rows > 0 and set(fixed_effect["generation"].to_pylist()) == {1}
    priors = DeltaTable(str(tables / "re_priors")).to_pyarrow_table()
    assert set(priors["re_type"].to_pylist()) == {"per_member", "per_item"}
