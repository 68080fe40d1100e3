"""The jobs on a real Spark standalone cluster, submitted with spark-submit and the artifacts of ``make dist``.

A master and two workers run from the pip-installed pyspark on 127.0.0.1. Every submission runs from
a temporary folder and ships the project's code (the ``--py-files`` zip) and the executors' Python
(the packed environment, ``--archives``): nothing on the executors can import the repository or
the project's virtualenv. docs/deploy.md holds the same command lines for a real cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
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
import yaml
from deltalake import DeltaTable

from jobs.simulate.writers import generate
from tests.jobs.streams import stream_spec

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"
CODE_ZIP = DIST / "lambda_learner_spark.zip"
ENVIRONMENT = DIST / "lambda_learner_spark_env.tar.gz"
SPARK_HOME = Path(pyspark.__file__).resolve().parent
WORKERS = 2
SUBMIT_TIMEOUT = 600.0
# Variables that would hand the daemons or the executors the test's own interpreter or paths.
INHERITED = ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "PYTHONPATH", "PYTHONHOME", "SPARK_HOME", "SPARK_CONF_DIR")

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


def submit(cluster: Cluster, workspace: Path, script: Path, *arguments: str) -> subprocess.CompletedProcess:
    """spark-submit in client mode from ``workspace``, shipping the zip and the packed environment."""
    command = [
        str(SPARK_HOME / "bin" / "spark-submit"),
        *("--master", cluster.master, "--deploy-mode", "client"),
        *("--py-files", str(CODE_ZIP), "--archives", f"{ENVIRONMENT}#environment"),
        *("--conf", "spark.pyspark.python=./environment/bin/python"),
        *("--conf", f"spark.pyspark.driver.python={sys.executable}"),
        *("--conf", "spark.executor.memory=1g", "--conf", "spark.executor.cores=1"),
        *("--conf", "spark.sql.shuffle.partitions=2", "--conf", "spark.sql.session.timeZone=UTC"),
        *("--conf", "spark.ui.enabled=false", "--conf", "spark.driver.host=127.0.0.1"),
        str(script),
        *arguments,
    ]
    environment = clean_environment(SPARK_CONF_DIR=str(cluster.conf_dir))
    process = subprocess.Popen(
        command,
        cwd=workspace,
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


def last_json(output: str):
    """The last JSON line a job printed: spark-submit mixes the driver's log lines into its output."""
    return json.loads([line for line in output.splitlines() if line.startswith(("{", "["))][-1])


def test_the_executors_run_the_shipped_environment_and_code(dist: Path, cluster: Cluster, tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = submit(cluster, tmp_path, script)
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


def test_the_nearline_then_the_nightly_job_run_on_the_cluster(dist: Path, cluster: Cluster, tmp_path: Path) -> None:
    stream = generate(stream_spec(events=1200, slices=2, bad_event_rate=0.02), tmp_path / "stream")
    tables = tmp_path / "tables"
    settings = {
        "spark": {"master": None},  # the session spark-submit made
        "storage": {"backend": "delta-rs", "root": str(tables)},
        "stream": {
            "source": "files",
            "path": str(stream.landing),
            "format": "json",
            "trigger": "available_now",
            "max_files_per_trigger": 1,
            "checkpoint": str(tmp_path / "checkpoint"),
        },
        "nearline": {"entity_buckets": 4},
        "nightly": {"entity_buckets": 4, "holdout_hours": 1, "passes": 1},
    }
    # Only the job's own settings are deployed: the defaults come with the shipped code.
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(settings))

    nearline = submit(cluster, tmp_path, ROOT / "jobs" / "nearline_update.py", "--config", str(config))
    assert nearline.returncode == 0, nearline.stderr[-5000:]
    events = DeltaTable(str(tables / "events")).to_pyarrow_table()
    assert events.num_rows > 0 and pc.count_distinct(events["batch_id"]).as_py() == len(stream.files)
    metrics = DeltaTable(str(tables / "metrics")).to_pyarrow_table()
    assert pc.sum(pc.equal(metrics["job"], "nearline")).as_py() == len(stream.files)
    state = DeltaTable(str(tables / "re_state")).to_pyarrow_table()
    assert set(state["re_type"].to_pylist()) == {"per_member", "per_item"}

    nightly = submit(cluster, tmp_path, ROOT / "jobs" / "nightly_retrain.py", "--config", str(config))
    assert nightly.returncode == 0, nightly.stderr[-5000:]
    report = last_json(nightly.stdout)
    assert report["status"] == "published" and report["generation"] == 1, report
    fixed_effect = DeltaTable(str(tables / "fixed_effect")).to_pyarrow_table()
    assert fixed_effect.num_rows > 0 and set(fixed_effect["generation"].to_pylist()) == {1}
    priors = DeltaTable(str(tables / "re_priors")).to_pyarrow_table()
    assert set(priors["re_type"].to_pylist()) == {"per_member", "per_item"}
