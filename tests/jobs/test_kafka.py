"""The nearline job on a real Kafka broker: exactly once across a kill -9, bounded batches, and lost offsets.

One single-node KRaft broker on 127.0.0.1 serves the module (``tests.services.kafka``). Generated events are written
to a topic as JSON lines with Kafka's console producer; the job, a real process started and killed like a deployed
one, reads them with ``stream.source: kafka``. The tables are read with delta-rs: this process starts no Spark.

What happens when retention deleted offsets the job had not read yet is decided in docs/deploy.md (Kafka): Spark's
``failOnDataLoss=true`` stays, the query stops with one message naming ``stream.options.failOnDataLoss``, and one
start with it false skips the lost range.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
from deltalake import DeltaTable

from jobs.runtime.config import load_config
from jobs.runtime.faults import CRASH_EXIT_CODE
from jobs.simulate.spec import GroundTruth
from jobs.simulate.writers import generate
from jobs.streaming.runner import DATA_LOSS_SETTING
from tests.jobs.jobrun import ROOT, run_job, write_config
from tests.jobs.streams import stream_spec
from tests.services.kafka import KafkaBroker

TOPIC = "training-events"
# Small enough that the backlog of the first two files is several micro-batches.
LIMIT = 250
TABLES = ("events", "quarantine", "metrics", "re_state")


@dataclass
class Consumed:
    """A topic the job consumed, killed once and restarted; the tables as they were then."""

    folder: Path
    config: Path
    truth: GroundTruth
    lines: dict[str, list[str]]  # every landing file's lines
    produced: list[str]  # the files written to the topic so far
    crashed: object
    restarted: object
    tables: dict[str, list[dict]]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with KafkaBroker(tmp_path_factory.mktemp("kafka")) as running:
        yield running


@pytest.fixture(scope="module")
def consumed(broker, tmp_path_factory) -> Consumed:
    """Two files' events on a one-partition topic, read in batches of ``LIMIT``; the job killed after batch 1's
    events append (a real crash point: the process dies at once) and started again."""
    folder = tmp_path_factory.mktemp("kafka-stream")
    truth = generate(stream_spec(events=900, slices=3, bad_event_rate=0.05, seed=5), folder / "stream")
    lines = {path.name: path.read_text().splitlines() for path in truth.files}
    produced = [path.name for path in truth.files[:2]]
    # One partition: the topic's order is the files' order, and the batches are exactly LIMIT records each.
    broker.create_topic(TOPIC, partitions=1)
    broker.produce(TOPIC, [line for name in produced for line in lines[name]])

    settings = [
        "stream.source=kafka",
        f"stream.options.kafka.bootstrap.servers={broker.bootstrap_servers}",
        f"stream.options.subscribe={TOPIC}",
        "stream.options.startingOffsets=earliest",
        f"stream.max_offsets_per_trigger={LIMIT}",
        "stream.trigger=available_now",
        f"stream.checkpoint={folder / 'checkpoint'}",
        f"storage.root={folder / 'tables'}",
        "nearline.entity_buckets=4",
    ]
    config = write_config(folder, load_config(ROOT / "conf" / "local.yaml", settings))
    crashed = run_job("jobs.nearline_update", config, crash_at="nearline:after_events_append@1")
    restarted = run_job("jobs.nearline_update", config)
    tables = {name: table_rows(folder, name) for name in TABLES}
    return Consumed(folder, config, truth, lines, produced, crashed, restarted, tables)


def table_rows(folder: Path, name: str) -> list[dict]:
    rows = DeltaTable(str(folder / "tables" / name)).to_pyarrow_table().to_pylist()
    for row in rows:
        if isinstance(row.get("values"), list):  # a map column: (key, value) pairs
            row["values"] = dict(row["values"])
    return rows


def nearline_batches(metrics: list[dict]) -> list[dict]:
    return sorted((row for row in metrics if row["job"] == "nearline"), key=lambda row: row["batch_id"])


def bad_payloads(stream: Consumed, files: list[str]) -> dict[str, str]:
    """The generated bad events of ``files``: payload -> the reason they are quarantined for."""
    bad = [json.loads(line) for line in (stream.truth.truth / "bad_events.jsonl").read_text().splitlines()]
    return {stream.lines[event["file"]][event["line"]]: event["reason"] for event in bad if event["file"] in files}


def event_ids(lines: list[str]) -> set[str]:
    """The event ids of the lines that are valid JSON with one."""
    ids = set()
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("event_id"), str):
            ids.add(event["event_id"])
    return ids


def test_a_job_killed_mid_stream_counts_every_kafka_event_once_in_bounded_batches(consumed: Consumed):
    assert consumed.crashed.returncode == CRASH_EXIT_CODE, consumed.crashed.stderr[-3000:]
    assert consumed.restarted.returncode == 0, consumed.restarted.stderr[-3000:]
    records = [line for name in consumed.produced for line in consumed.lines[name]]
    bad = bad_payloads(consumed, consumed.produced)

    # stream.max_offsets_per_trigger split the backlog: LIMIT records a batch, the rest in the last one.
    batches = nearline_batches(consumed.tables["metrics"])
    expected = [LIMIT] * (len(records) // LIMIT) + ([len(records) % LIMIT] if len(records) % LIMIT else [])
    assert len(batches) == math.ceil(len(records) / LIMIT) >= 3
    assert [int(row["values"]["rows_in"]) for row in batches] == expected
    assert [row["batch_id"] for row in batches] == list(range(len(batches)))

    # Every valid event once, though batch 1 appended its events before the kill and ran again after it.
    events = consumed.tables["events"]
    ids = [row["event_id"] for row in events]
    assert len(ids) == len(set(ids)) == len(records) - len(bad)
    assert set(ids) == event_ids([line for line in records if line not in bad])
    # Malformed and otherwise bad messages are quarantined with their reason, each once.
    quarantined = {row["payload"]: row["reason"] for row in consumed.tables["quarantine"]}
    assert len(consumed.tables["quarantine"]) == len(bad) == len(quarantined)
    assert quarantined.keys() == bad.keys()
    assert all(quarantined[payload].startswith(reason) for payload, reason in bad.items())
    assert "malformed_payload" in set(bad.values())
    # And the live model learnt each valid event once, for each random-effect type.
    learnt: dict[str, int] = {}
    for row in consumed.tables["re_state"]:
        learnt[row["re_type"]] = learnt.get(row["re_type"], 0) + row["rows"]
    assert learnt == {"per_member": len(ids), "per_item": len(ids)}


def test_offsets_deleted_before_the_job_read_them_stop_it_until_it_is_told_to_skip_them(
    broker: KafkaBroker, consumed: Consumed
):
    # The third file arrives; the broker deletes its first records before the job reads them (as retention would).
    name = consumed.truth.files[2].name
    arrived = consumed.lines[name]
    start = broker.offsets(TOPIC)[0]
    broker.produce(TOPIC, arrived)
    lost = len(arrived) // 3
    broker.delete_records(TOPIC, partition=0, before_offset=start + lost)
    assert broker.offsets(TOPIC, "earliest") == {0: start + lost}
    before = {table: table_rows(consumed.folder, table) for table in ("events", "metrics")}

    # Spark's default failOnDataLoss=true: the job stops, with one message naming the setting and the way out.
    stopped = run_job("jobs.nearline_update", consumed.config)
    assert stopped.returncode != 0
    message = next(
        line for line in stopped.stderr.splitlines() if line.startswith("jobs.streaming.runner.DataLossError")
    )
    assert DATA_LOSS_SETTING in message and f"--set {DATA_LOSS_SETTING}=false" in message, message
    assert f"Spark said: Could not read records in offset [{start}, " in message and f"{TOPIC}-0" in message, message
    assert {table: table_rows(consumed.folder, table) for table in before} == before, "nothing was written"

    # Once with failOnDataLoss=false: the lost range is skipped (Spark logs it), the rest learnt as usual.
    skipped = run_job("jobs.nearline_update", consumed.config, extra=["--set", f"{DATA_LOSS_SETTING}=false"])
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    # Spark's warning names where it went on from.
    assert f"Some data may be lost. Recovering from the earliest offset: {start + lost}" in skipped.stderr
    new_batches = nearline_batches(table_rows(consumed.folder, "metrics"))[len(nearline_batches(before["metrics"])) :]
    assert sum(int(row["values"]["rows_in"]) for row in new_batches) == len(arrived) - lost
    new_ids = {row["event_id"] for row in table_rows(consumed.folder, "events")} - {
        row["event_id"] for row in before["events"]
    }
    bad = bad_payloads(consumed, [name])
    assert new_ids == event_ids([line for line in arrived[lost:] if line not in bad])
    assert not new_ids & event_ids(arrived[:lost])

    # The next start, back on failOnDataLoss=true, has nothing left to complain about.
    again = run_job("jobs.nearline_update", consumed.config)
    assert again.returncode == 0, again.stderr[-3000:]
