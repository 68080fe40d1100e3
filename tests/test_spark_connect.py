"""Both jobs through Spark Connect, as Databricks standard access mode and serverless run them.

One local Spark Connect server (``tests.services.connect``: ``local[2]`` with the fetched jars) serves the module.
The jobs run in child processes with ``--set spark.remote=sc://127.0.0.1:<port>``: a Connect client cannot share a
process with this run's classic session (tests/services/test_services.py says why). The nearline job's
``foreachBatch`` function is pickled to the server and runs there, in a Python process of the server's; with delta-rs
the tables are written from that process. The tables of each run must equal, row for row, those of a classic run of
the same stream in this process.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from deltalake import DeltaTable

from jobs.nearline_update import run_nearline
from jobs.nightly_retrain import run_nightly
from jobs.runtime.config import load_config
from jobs.simulate.spec import GroundTruth
from jobs.simulate.writers import generate
from jobs.storage.store import open_store
from tests.jobs.jobrun import ROOT, WALL_CLOCK, run_job, same_rows
from tests.jobs.streams import stream_spec
from tests.services.connect import ConnectServer

# Every table both jobs write, with the columns that order its rows.
TABLES = {
    "events": ["batch_id", "event_id"],
    "quarantine": ["batch_id", "payload"],
    "re_state": ["re_type", "entity_id"],
    "metrics": ["job", "batch_id"],
    "fixed_effect": ["generation", "name", "term"],
    "re_priors": ["re_type", "entity_id"],
}
# Differ between any two runs by nature: wall-clock times, and run ids (a streaming query's id is new per checkpoint).
UNCOMPARABLE = {*WALL_CLOCK, "run_id"}
FILES = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ConnectServer(tmp_path_factory.mktemp("connect")) as running:
        yield running


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> GroundTruth:
    folder = tmp_path_factory.mktemp("connect-stream")
    return generate(stream_spec(events=600, slices=FILES, bad_event_rate=0.05), folder / "stream")


def job_config(folder: Path, stream: GroundTruth, backend: str, trigger: str) -> Path:
    """A deployment's settings file (no local session settings): one landing file per micro-batch."""
    settings = {
        "storage": {"backend": backend, "root": str(folder / "tables")},
        "stream": {
            "source": "files",
            "path": str(stream.landing),
            "format": "json",
            "trigger": trigger,
            "processing_time": "1 second",
            "max_files_per_trigger": 1,
            "checkpoint": str(folder / "checkpoint"),
        },
        "nearline": {"entity_buckets": 4},
        "nightly": {"entity_buckets": 4, "holdout_hours": 1, "passes": 1},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture(scope="module")
def classic(spark, stream: GroundTruth, tmp_path_factory) -> Path:
    """The reference: both jobs on the same stream in this process's classic session; its tables' folder."""
    folder = tmp_path_factory.mktemp("classic")
    config = load_config(job_config(folder, stream, "delta-rs", "available_now"))
    run_nearline(spark, config)
    report = run_nightly(spark, open_store(spark, config.storage), config)
    assert report.status == "published", report
    return folder / "tables"


def table_rows(tables: Path, name: str) -> list[dict]:
    """A table's rows (read with delta-rs, whoever wrote them) without what differs by nature, in a stable order."""
    rows = []
    for row in DeltaTable(str(tables / name)).to_pyarrow_table().to_pylist():
        row = {key: value for key, value in row.items() if key not in UNCOMPARABLE}
        if isinstance(row.get("values"), list):  # the metrics map, less its timings
            row["values"] = {key: value for key, value in row["values"] if not key.startswith("seconds.")}
        rows.append(row)
    return sorted(rows, key=lambda row: tuple(str(row[column]) for column in TABLES[name]))


def assert_as_classic(tables: Path, classic: Path, stream: GroundTruth) -> None:
    for name in TABLES:
        assert same_rows(table_rows(tables, name), table_rows(classic, name), rel=1e-9), name
    # What those tables say: every valid event counted once, a generation published, state for every entity.
    events = table_rows(tables, "events")
    assert len(events) == len({row["event_id"] for row in events}) == stream.events - stream.bad_events
    assert {row["generation"] for row in table_rows(tables, "fixed_effect")} == {1}
    for re_type, column in (("per_member", "member_id"), ("per_item", "item_id")):
        state = {row["entity_id"] for row in table_rows(tables, "re_state") if row["re_type"] == re_type}
        assert state == {row[column] for row in events}, re_type
    batches = [row for row in table_rows(tables, "metrics") if row["job"] == "nearline"]
    assert [row["batch_id"] for row in batches] == list(range(FILES))


def writers(table: Path) -> set[str]:
    """Which engines made the table's commits: delta-rs, or Spark's Delta Lake."""
    engines = {str(entry.get("engineInfo")) for entry in DeltaTable(str(table)).history()}
    return {
        "delta-rs" if engine.startswith("delta-rs") else engine.rpartition(" ")[2].split("/")[0] for engine in engines
    }


def run_nightly_job(config: Path, server: ConnectServer) -> None:
    nightly = run_job("jobs.nightly_retrain", config, extra=["--set", f"spark.remote={server.url}"])
    assert nightly.returncode == 0, f"{nightly.stderr[-5000:]}\nserver log: {server.log_path}"
    assert '"status": "published"' in nightly.stdout, nightly.stdout[-2000:]


def test_both_jobs_run_on_spark_connect_with_spark_delta_tables_and_an_available_now_trigger(
    server: ConnectServer, stream: GroundTruth, classic: Path, tmp_path: Path
):
    config = job_config(tmp_path, stream, "spark-delta", "available_now")
    nearline = run_job("jobs.nearline_update", config, extra=["--set", f"spark.remote={server.url}"])
    assert nearline.returncode == 0, f"{nearline.stderr[-5000:]}\nserver log: {server.log_path}"
    run_nightly_job(config, server)

    assert_as_classic(tmp_path / "tables", classic, stream)
    # Written by Spark's Delta Lake on the server.
    assert writers(tmp_path / "tables" / "re_state") == {"Delta-Lake"}


def test_both_jobs_run_on_spark_connect_with_delta_rs_on_the_server_and_a_stop_signal_ends_the_stream(
    server: ConnectServer, stream: GroundTruth, classic: Path, tmp_path: Path
):
    config = job_config(tmp_path, stream, "delta-rs", "processing_time")
    command = [sys.executable, "-m", "jobs.nearline_update", "--config", str(config)]
    log = tmp_path / "nearline.log"
    with log.open("w") as output:
        job = subprocess.Popen(
            [*command, "--set", f"spark.remote={server.url}"], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        # The query never ends by itself: wait until the server-side batches have drained the landing folder.
        metrics, deadline = tmp_path / "tables" / "metrics", time.monotonic() + 600
        while not (metrics.is_dir() and len(DeltaTable(str(metrics)).to_pyarrow_table()) == FILES):
            assert job.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, f"no {FILES} batches after 10 minutes; server log: {server.log_path}"
            time.sleep(1)
        stopped_at = time.monotonic()
        job.send_signal(signal.SIGTERM)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    output = log.read_text()
    assert job.returncode == 0, output[-5000:]
    assert time.monotonic() - stopped_at < 60
    assert "stop requested" in output
    run_nightly_job(config, server)

    assert_as_classic(tmp_path / "tables", classic, stream)
    # Written by delta-rs, in the server's Python process that ran foreachBatch.
    assert writers(tmp_path / "tables" / "re_state") == {"delta-rs"}


def test_nothing_in_the_jobs_reaches_for_the_jvm():
    """Spark Connect has no JVM in the client: no py4j handle anywhere, but the local session's log level."""
    allowed = {("jobs/runtime/session.py", 'session.sparkContext.setLogLevel("WARN")')}
    pattern = re.compile(r"\b(_jvm|_jsparkSession|_jdf|_jsc|_gateway|sparkContext|SparkContext)\b")
    found = set()
    for path in sorted((ROOT / "jobs").rglob("*.py")):
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]
            if pattern.search(code):
                found.add((str(path.relative_to(ROOT)), code.strip()))
    assert found <= allowed, found - allowed
