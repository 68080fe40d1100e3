"""Exactly once across checkpoint changes, publications, crashes and repeated events: real processes, real tables.

The check every test ends with: each entity's live model has learnt each of its valid events exactly once,
either in the current generation's prior (``re_priors.rows``) or since (``re_state.rows``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from jobs.game.generation import current_generation
from jobs.nearline_update import NearlineUpdater, run_nearline
from jobs.nightly_retrain import run_nightly
from jobs.runtime.errors import ConcurrentRunError, ConfigError, QueryFailedError, StateRestoredError
from jobs.runtime.faults import CRASH_EXIT_CODE, PAUSE_VARIABLE
from jobs.simulate.writers import deliver, generate
from jobs.storage.delta_rs import DeltaRsStore
from jobs.storage.lease import LEASES, TableLease
from jobs.storage.store import open_store
from tests.jobs.jobrun import ROOT, rows, run_job, run_side_by_side, same_rows, write_config
from tests.jobs.streams import config_for, stream_config, stream_spec, update_on_files


def learnt_once(store, config) -> dict:
    """Per (type, entity): events it has, against rows its prior and its live state learnt. Must match."""
    events = store.read("events")
    generation = current_generation(store, config.model)
    state = store.read("re_state").select("re_type", "entity_id", F.col("rows").alias("live"))
    mismatches = {}
    for random_effect in config.model.random_effects:
        counts = events.groupBy(F.col(random_effect.entity_column).alias("entity_id")).count()
        live = state.where(F.col("re_type") == random_effect.name).drop("re_type")
        joined = counts.join(live, "entity_id", "full_outer")
        if generation is not None:
            priors = store.read("re_priors").where(
                (F.col("generation") == generation.number) & (F.col("re_type") == random_effect.name)
            )
            # A prior published twice counts once: the one trained on more rows (as the nearline job takes it).
            prior = priors.groupBy("entity_id").agg(F.max("rows").alias("prior"))
            joined = joined.join(prior, "entity_id", "full_outer")
        else:
            joined = joined.withColumn("prior", F.lit(0))
        joined = joined.fillna(0, ["count", "live", "prior"])
        for row in joined.where(F.col("count") != F.col("live") + F.col("prior")).collect():
            mismatches[(random_effect.name, row.entity_id)] = (row["count"], row.prior, row.live)
    return mismatches


def test_the_documented_backfill_with_its_own_checkpoint_loses_nothing(spark, tmp_path):
    """docs/operations.md: a backfill runs with its own checkpoint on the same tables, then the stream resumes."""
    truth = generate(stream_spec(events=1200, slices=6, seed=31), tmp_path / "stream")
    files = sorted(truth.landing.glob("part-*"))
    config = stream_config(tmp_path, tmp_path / "landing", "nightly.holdout_hours=0")
    main = write_config(tmp_path, config)
    deliver(files[:3], tmp_path / "landing")
    assert run_job("jobs.nearline_update", main).returncode == 0

    deliver(files[3:5], tmp_path / "backfill")
    backfill = run_job(
        "jobs.nearline_update",
        main,
        extra=[
            "--set",
            f"stream.path={tmp_path / 'backfill'}",
            "--set",
            f"stream.checkpoint={tmp_path / 'backfill-checkpoint'}",
            "--set",
            "stream.trigger=available_now",
        ],
    )
    assert backfill.returncode == 0, backfill.stderr[-3000:]
    deliver(files[5:], tmp_path / "landing")
    resumed = run_job("jobs.nearline_update", main)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    store = open_store(spark, config.storage)
    events = store.read("events")
    assert events.count() == events.select("event_id").distinct().count() == truth.events
    batches = [row.batch_id for row in store.read("metrics").where("job = 'nearline'").orderBy("recorded_at").collect()]
    assert len(batches) == 6 and batches == sorted(set(batches))
    assert learnt_once(store, config) == {}
    report = run_nightly(spark, store, config)
    assert report.status == "published" and report.cutoff_batch_id == batches[-1]


def test_a_batch_half_written_under_a_lost_checkpoint_is_finished_from_the_tables_when_the_operator_names_it(
    spark, tmp_path
):
    """docs/operations.md: the job is killed after appending batch 1's events and its checkpoint is lost. A new
    stream is refused with the way out; started with it, it finishes batch 1 from the tables, reads the folder
    again (what batches 0 and 1 learnt is quarantined as theirs) and ends where a run without the kill ends."""
    truth = generate(stream_spec(events=1200, slices=4, seed=37), tmp_path / "stream")
    config = stream_config(tmp_path, truth.landing)
    killed = run_job("jobs.nearline_update", write_config(tmp_path, config), crash_at="nearline:after_events_append@1")
    assert killed.returncode == CRASH_EXIT_CODE, killed.stderr[-3000:]
    shutil.rmtree(config.stream.checkpoint)

    with pytest.raises(QueryFailedError, match="begun but not finished") as refused:
        run_nearline(spark, config)
    assert "start this one with --set nearline.finish_lost_batch=1" in str(refused.value)
    run_nearline(spark, stream_config(tmp_path, truth.landing, "nearline.finish_lost_batch=1"))

    store = open_store(spark, config.storage)
    events = store.read("events")
    assert events.count() == events.select("event_id").distinct().count() == truth.events
    assert learnt_once(store, config) == {}
    (finished,) = store.read("metrics").where("job = 'nearline' AND batch_id = 1").collect()
    assert finished.note.startswith("finished from the tables by stream") and finished["values"]["rows_valid"] == 300
    duplicates = store.read("quarantine").where("reason LIKE 'duplicate_event_id:batch %'").groupBy("reason").count()
    assert {row.reason: row["count"] for row in duplicates.collect()} == {
        "duplicate_event_id:batch 0": 300,
        "duplicate_event_id:batch 1": 300,
    }
    reference = stream_config(tmp_path / "reference", truth.landing)
    run_nearline(spark, reference)
    learnt = ["re_type", "entity_id", "coefficients", "updates", "rows"]
    expected = rows(open_store(spark, reference.storage).read("re_state").select(*learnt), ["re_type", "entity_id"])
    assert same_rows(rows(store.read("re_state").select(*learnt), ["re_type", "entity_id"]), expected, rel=1e-9)


def test_a_rebase_counts_every_ingested_event_exactly_once_and_a_restored_state_is_rebuilt(spark, tmp_path):
    """The nightly holds out its last hour: the rebase must replay it, with everything after its cutoff.

    Then the live state is restored to an earlier version of the same generation (docs/operations.md): it lacks a
    batch its guards count as applied, so the next batch rebuilds it from the priors as a rebase does.
    """
    truth = generate(stream_spec(events=2700, slices=9, seed=32), tmp_path / "stream")
    files = sorted(truth.landing.glob("part-*"))
    config = config_for(tmp_path, "nightly.holdout_hours=1", "nightly.passes=1")
    store = open_store(spark, config.storage)
    updater = NearlineUpdater(config)
    update_on_files(spark, updater, files[:6])
    assert run_nightly(spark, store, config).status == "published"
    update_on_files(spark, updater, files[6:7], first_batch_id=6)
    rebased = store.version("re_state")
    update_on_files(spark, updater, files[7:8], first_batch_id=7)
    (rebase,) = store.read("metrics").where("job = 'nearline' AND status = 'rebased'").collect()
    assert rebase["values"]["replayed_batches"] >= 1
    assert learnt_once(store, config) == {}

    DeltaTable(store.location("re_state")).restore(rebased)  # batch 7 is no longer in the state
    update_on_files(spark, updater, files[8:], first_batch_id=8)
    statuses = [row.status for row in store.read("metrics").where("job = 'nearline'").orderBy("batch_id").collect()]
    assert statuses[6:] == ["rebased", "updated", "rebased"]
    assert learnt_once(store, config) == {}


def test_a_restored_state_without_a_generation_to_rebuild_it_from_is_refused(spark, tmp_path):
    truth = generate(stream_spec(events=600, slices=3, seed=35), tmp_path / "stream")
    files = sorted(truth.landing.glob("part-*"))
    config = config_for(tmp_path)
    store = open_store(spark, config.storage)
    update_on_files(spark, NearlineUpdater(config), files[:1])
    first = store.version("re_state")
    update_on_files(spark, NearlineUpdater(config), files[1:2], first_batch_id=1)
    DeltaTable(store.location("re_state")).restore(first)
    with pytest.raises(StateRestoredError, match=r"'re_state' was restored to an earlier version .* no generation"):
        update_on_files(spark, NearlineUpdater(config), files[2:], first_batch_id=2)
    assert store.read("metrics").where("job = 'nearline'").count() == 2


def test_a_batch_appended_but_not_merged_before_a_publication_is_counted_once(spark, tmp_path):
    truth = generate(stream_spec(events=1600, slices=5, seed=33), tmp_path / "stream")
    files = sorted(truth.landing.glob("part-*"))
    config = stream_config(tmp_path, tmp_path / "landing", "nightly.holdout_hours=0", "nightly.passes=1")
    path = write_config(tmp_path, config)
    deliver(files[:4], tmp_path / "landing")
    crashed = run_job("jobs.nearline_update", path, crash_at="nearline:after_events_append@3")
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr[-3000:]
    store = open_store(spark, config.storage)
    assert run_nightly(spark, store, config).status == "published"
    deliver(files[4:], tmp_path / "landing")
    assert run_job("jobs.nearline_update", path).returncode == 0
    assert learnt_once(store, config) == {}


def test_a_repeated_event_id_in_a_later_batch_is_quarantined_with_the_batch_that_had_it_first(spark, tmp_path):
    truth = generate(stream_spec(events=600, slices=2, seed=34), tmp_path / "stream")
    first, second = sorted(truth.landing.glob("part-*"))
    lines = first.read_text().splitlines()
    # Five sent again as they were, two more ids sent again with another label.
    repeated = lines[:5]
    changed = [json.dumps({**json.loads(line), "label": 1 - json.loads(line)["label"]}) for line in lines[5:7]]
    second.write_text(second.read_text() + "\n".join(repeated + changed) + "\n")
    config = config_for(tmp_path)
    store = open_store(spark, config.storage)
    update_on_files(spark, NearlineUpdater(config), [first, second])

    first_batch = store.read("metrics").where("job = 'nearline'").agg(F.min("batch_id")).first()[0]
    quarantined = store.read("quarantine").collect()
    assert len(quarantined) == 7
    assert all(row.reason == f"duplicate_event_id:batch {first_batch}" for row in quarantined)
    events = store.read("events")
    assert events.count() == events.select("event_id").distinct().count() == truth.events
    assert learnt_once(store, config) == {}


def test_a_batch_retried_in_its_own_process_after_a_failed_write_is_finished_not_written_twice(
    spark, tmp_path, monkeypatch
):
    """A new batch's writes read no guards (its claim is the check); a retry of it may find them written."""
    truth = generate(stream_spec(events=600, slices=2, seed=36), tmp_path / "stream")
    first, second = sorted(truth.landing.glob("part-*"))
    config = config_for(tmp_path)
    updater = NearlineUpdater(config)
    update_on_files(spark, updater, [first])

    def storage_error(*args, **kwargs):
        raise OSError("the state's merge failed (a storage error)")

    # The second batch appends its events and metrics, then its state's merge fails; the caller retries it.
    with monkeypatch.context() as failing:
        failing.setattr(DeltaRsStore, "_merge", storage_error)
        with pytest.raises(OSError, match="state's merge failed"):
            update_on_files(spark, updater, [second], first_batch_id=1)
    update_on_files(spark, updater, [second], first_batch_id=1)

    store = open_store(spark, config.storage)
    events = store.read("events")
    assert events.count() == events.select("event_id").distinct().count() == truth.events
    assert store.read("metrics").where("job = 'nearline'").count() == 2
    assert learnt_once(store, config) == {}


def test_a_second_nightly_run_is_refused_while_the_first_holds_the_tables(spark, tmp_path):
    truth = generate(stream_spec(events=900, slices=3, seed=35), tmp_path / "stream")
    config = config_for(
        tmp_path,
        "nightly.holdout_hours=0",
        "nightly.passes=1",
        "nightly.lease_minutes=0.2",
        "nightly.lease_wait_minutes=0",
    )
    store = open_store(spark, config.storage)
    update_on_files(spark, NearlineUpdater(config), sorted(truth.landing.glob("part-*")))
    # The lease is taken before training: the pause before publication only keeps the first run holding it well
    # after this process has been refused.
    slow = subprocess.Popen(
        [sys.executable, "-m", "jobs.nightly_retrain", "--config", str(write_config(tmp_path, config))],
        cwd=ROOT,
        env={**os.environ, PAUSE_VARIABLE: "nightly:before_publish=10"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (store.exists("leases") and store.read("leases").where("expires_at > current_timestamp()").count()):
            assert time.monotonic() < deadline and slow.poll() is None, "the first run never took the lease"
            time.sleep(1)
        with pytest.raises(ConcurrentRunError, match=r"another nightly run .* holds these tables until"):
            run_nightly(spark, store, config)
    finally:
        stdout, stderr = slow.communicate(timeout=600)
    assert slow.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "published"
    priors = store.read("re_priors").toPandas()
    assert set(priors.generation) == {1} and not priors.duplicated(["re_type", "entity_id"]).any()
    # Its lease released, the next run starts at once.
    assert run_nightly(spark, store, config).status == "already_published"


def test_a_retry_right_after_a_killed_nightly_waits_for_its_lease_and_runs(spark, tmp_path, caplog):
    """A scheduler retries a nightly run killed with its lease held: the retry waits, saying so, then runs."""
    config = config_for(tmp_path, "nightly.lease_minutes=0.5")
    killed = run_job("jobs.nightly_retrain", write_config(tmp_path, config), crash_at="lease:nightly:taken")
    assert killed.returncode == CRASH_EXIT_CODE, killed.stderr[-3000:]
    store = open_store(spark, config.storage)
    assert store.read("leases").where("expires_at > current_timestamp()").count() == 1

    with caplog.at_level("WARNING", logger="lambda_learner.lease"):
        assert run_nightly(spark, store, config).status == "empty_window"
    assert any("holds these tables until" in message and "waiting" in message for message in caplog.messages)


def test_two_nightly_runs_taking_an_expired_lease_at_once_end_with_one_holder(spark, tmp_path):
    """Both read the lease free; the one that writes second finds the row changed, leaves it and is refused."""
    config = config_for(tmp_path, "nightly.lease_minutes=1", "nightly.lease_wait_minutes=0")
    store = open_store(spark, config.storage)
    late = subprocess.Popen(
        [sys.executable, "-m", "jobs.nightly_retrain", "--config", str(write_config(tmp_path, config))],
        cwd=ROOT,
        env={**os.environ, PAUSE_VARIABLE: "lease:nightly:before_take=15"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not store.exists("leases"):
            assert time.monotonic() < deadline and late.poll() is None, late.communicate()[1][-3000:]
            time.sleep(0.5)
        time.sleep(5)  # the late run has read the lease free and waits to take it
        with TableLease(store, "nightly", minutes=1, wait_minutes=0) as early:
            _, stderr = late.communicate(timeout=300)
            assert early.held()
    finally:
        if late.poll() is None:
            late.kill()
    assert late.returncode != 0
    assert "another nightly run took the lease at the same time" in stderr


def test_a_changed_app_id_is_refused_before_it_writes(spark, tmp_path):
    """A new app id would start the sequence at 0 again, its numbers colliding with the batches already written."""
    truth = generate(stream_spec(events=400, slices=2), tmp_path / "stream")
    config = stream_config(tmp_path, truth.landing)
    files = sorted(truth.landing.glob("part-*"))
    update_on_files(spark, NearlineUpdater(config), files[:1])
    store = open_store(spark, config.storage)
    versions = {table: store.version(table) for table in ("quarantine", "events", "metrics", "re_state")}

    renamed = replace(config, nearline=replace(config.nearline, app_id="lambda-learner-nearline-2"))
    expected = "config key 'nearline.app_id' is 'lambda-learner-nearline-2', but .* app id 'lambda-learner-nearline'"
    with pytest.raises(ConfigError, match=expected):
        update_on_files(spark, NearlineUpdater(renamed), files[1:], first_batch_id=1)
    assert {table: store.version(table) for table in versions} == versions
    update_on_files(spark, NearlineUpdater(config), files[1:], first_batch_id=1)  # the old one goes on
    assert store.read("metrics").where("job = 'nearline'").count() == 2


@pytest.mark.parametrize("zone", ["America/Los_Angeles", "Asia/Tokyo"])
def test_the_lease_reads_its_times_as_utc_whatever_the_drivers_time_zone(spark, tmp_path, monkeypatch, zone):
    """PySpark hands timestamps back naive, in the OS time zone: west of UTC a held lease would look expired, east
    of it a released one would look held for hours."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        store = open_store(spark, config_for(tmp_path).storage)
        with TableLease(store, "nightly", minutes=5), pytest.raises(ConcurrentRunError, match="holds these tables"):
            TableLease(store, "nightly", minutes=5, wait_minutes=0).__enter__()
        with TableLease(store, "nightly", minutes=5) as second:  # released: taken again at once
            assert second.held()
    finally:
        monkeypatch.undo()
        time.tzset()


def test_duplicate_priors_of_a_generation_do_not_stop_the_nearline_job(spark, tmp_path):
    truth = generate(stream_spec(events=900, slices=3, seed=36), tmp_path / "stream")
    files = sorted(truth.landing.glob("part-*"))
    config = config_for(tmp_path, "nightly.holdout_hours=0", "nightly.passes=1")
    store = open_store(spark, config.storage)
    updater = NearlineUpdater(config)
    update_on_files(spark, updater, files[:2])
    assert run_nightly(spark, store, config).status == "published"
    # As if a second run had raced past the lease: every prior twice, the copies trained on fewer rows.
    priors = store.read("re_priors")
    store.append("re_priors", priors.withColumn("rows", F.col("rows") - 1))
    update_on_files(spark, updater, files[2:], first_batch_id=2)
    (batch,) = store.read("metrics").where("job = 'nearline' AND batch_id = 2").collect()
    assert batch.status == "rebased"
    state = store.read("re_state").toPandas()
    assert not state.duplicated(["re_type", "entity_id"]).any()
    assert learnt_once(store, config) == {}


def test_a_nightly_run_whose_lease_another_run_took_stops_before_it_publishes(spark, tmp_path, monkeypatch):
    """Its renewals failed past the lease's end and another run took the lease: it must not publish."""
    truth = generate(stream_spec(events=900, slices=3, seed=38), tmp_path / "stream")
    config = config_for(tmp_path, "nightly.holdout_hours=0", "nightly.passes=1", "nightly.lease_minutes=1")
    store = open_store(spark, config.storage)
    update_on_files(spark, NearlineUpdater(config), sorted(truth.landing.glob("part-*")))
    monkeypatch.setenv(PAUSE_VARIABLE, "nightly:before_publish=5")
    outcome: dict[str, BaseException] = {}

    def nightly() -> None:
        try:
            run_nightly(spark, store, config)
        except BaseException as error:  # the outcome this test looks at
            outcome["error"] = error

    run = threading.Thread(target=nightly)
    run.start()
    while not (store.exists("leases") and store.read("leases").where("expires_at > current_timestamp()").count()):
        assert run.is_alive(), outcome
        time.sleep(0.2)
    now = datetime.now(UTC)
    taken = spark.createDataFrame([("nightly", "another-run", "elsewhere", now, now + timedelta(minutes=5))], LEASES)
    store.merge("leases", taken, ["job"])
    run.join()
    assert isinstance(outcome.get("error"), ConcurrentRunError), outcome
    assert "lost its lease on these tables, now held by holder another-run" in str(outcome["error"])
    assert store.read("fixed_effect").count() == 0 and store.read("re_priors").count() == 0
    (failed,) = store.read("metrics").where("job = 'nightly'").collect()
    assert failed.status == "failed" and "lost its lease" in failed.note


def test_two_streams_writing_the_same_tables_at_once_lose_no_event(spark, tmp_path):
    """A backfill started beside the live job, each with its own checkpoint, on the same tables: both take batch
    numbers from the tables. A stream that took a number the other holds (or finds the other's batch half written)
    stops with one clear error before it writes anything of its batch; started again with its checkpoint, it redoes
    that batch under the next free number. Every event ends in the tables once, learnt once."""
    truth = generate(stream_spec(events=1600, slices=8, seed=43), tmp_path / "stream")
    files = sorted(truth.landing.glob("part-*"))
    paths = {}
    for name, part in (("live", files[:4]), ("backfill", files[4:])):
        deliver(part, tmp_path / name)
        config = stream_config(tmp_path, tmp_path / name, f"stream.checkpoint={tmp_path / f'{name}-checkpoint'}")
        paths[name] = write_config(tmp_path / f"{name}-job", config)
    run_side_by_side("jobs.nearline_update", paths)

    store = open_store(spark, config.storage)
    events = store.read("events")
    assert events.count() + store.read("quarantine").count() == truth.events
    assert events.count() == events.select("event_id").distinct().count()
    assert learnt_once(store, config) == {}
    batches = [row.batch_id for row in store.read("metrics").where("job = 'nearline'").collect()]
    assert sorted(batches) == list(range(8))
