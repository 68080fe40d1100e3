"""Bad input never stops a job: poisoned events, poisoned state and a model that must not be published."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from jobs.game.fixed_effect import FixedEffectModel
from jobs.game.validation import non_finite
from jobs.nearline_update import NearlineUpdater, run_nearline
from jobs.nightly_retrain import run_nightly
from jobs.runtime.errors import ConfigError
from jobs.runtime.faults import CRASH_EXIT_CODE
from jobs.simulate.writers import generate
from jobs.storage.store import open_store
from tests.jobs.jobrun import run_job, write_config
from tests.jobs.streams import config_for, stream_config, stream_spec, update_on_files


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-input")
    return generate(stream_spec(events=900, slices=3, seed=41), folder / "stream"), folder


def test_one_event_far_in_the_future_or_ancient_is_quarantined_and_cannot_move_the_window(spark, stream, tmp_path):
    truth, _ = stream
    files = sorted(truth.landing.glob("part-*"))
    line = json.loads(files[1].read_text().splitlines()[0])
    poisoned = tmp_path / "part-00001.json"
    odd = [{**line, "event_id": "future", "event_time": "2099-01-01T00:00:00Z"}]
    odd.append({**line, "event_id": "ancient", "event_time": "1901-01-01T00:00:00Z"})
    poisoned.write_text(files[1].read_text() + "".join(json.dumps(event) + "\n" for event in odd))
    config = config_for(tmp_path, "nightly.holdout_hours=0", "nightly.passes=1")
    store = open_store(spark, config.storage)
    update_on_files(spark, NearlineUpdater(config), [files[0], poisoned, files[2]])

    reasons = {row.reason.split(" ")[0] for row in store.read("quarantine").collect()}
    assert reasons == {"bad_event_time:after", "bad_event_time:before"}
    report = run_nightly(spark, store, config)
    assert report.status == "published" and report.training_rows == truth.events


def test_a_landing_file_the_reader_cannot_read_is_quarantined_whole_and_the_stream_goes_on(spark, tmp_path):
    truth = generate(stream_spec(events=900, slices=3, seed=43, format="parquet"), tmp_path / "stream")
    landing = truth.landing
    first = pq.read_table(sorted(landing.glob("part-*"))[0])
    # The producer's schema drifted: member ids written as INT64, then event times as text.
    drifted = first.set_column(first.schema.get_field_index("member_id"), "member_id", pa.array(range(len(first))))
    pq.write_table(drifted, landing / "part-00000-drifted-id.parquet")
    as_text = first.column("event_time").cast(pa.string())
    pq.write_table(first.set_column(1, "event_time", as_text), landing / "part-00001-drifted-time.parquet")
    (landing / "part-00002-truncated.parquet").write_bytes(b"PAR1 cut short")
    config = stream_config(tmp_path, landing, "stream.format=parquet", "stream.max_files_per_trigger=2")

    run_nearline(spark, config)

    store = open_store(spark, config.storage)
    assert store.read("events").count() == truth.events
    quarantined = store.read("quarantine").where("reason LIKE 'unreadable_file:%'").collect()
    by_file = {json.loads(row.payload)["path"].rsplit("/", 1)[1]: row.reason for row in quarantined}
    assert sorted(by_file) == [
        "part-00000-drifted-id.parquet",
        "part-00001-drifted-time.parquet",
        "part-00002-truncated.parquet",
    ]
    drifted_id = by_file["part-00000-drifted-id.parquet"]
    assert "[member_id]" in drifted_id and "INT64" in drifted_id
    assert "[event_time]" in by_file["part-00001-drifted-time.parquet"]
    assert "is not a Parquet file" in by_file["part-00002-truncated.parquet"]
    assert all(json.loads(row.payload)["bytes"] > 0 for row in quarantined)
    batches = store.read("metrics").where("job = 'nearline'").collect()
    assert sum(row["values"]["files_unreadable"] for row in batches) == 3
    assert sum(row["values"]["rows_quarantined"] for row in batches) == 3
    assert sum(row["values"]["rows_valid"] for row in batches) == truth.events


def test_every_nightly_outcome_has_one_metrics_row_and_a_rerun_adds_none(spark, stream, tmp_path):
    truth, _ = stream
    config = config_for(tmp_path, "nightly.holdout_hours=0", "nightly.passes=1")
    store = open_store(spark, config.storage)
    for _ in range(2):
        assert run_nightly(spark, store, config).status == "empty_window"
    update_on_files(spark, NearlineUpdater(config), sorted(truth.landing.glob("part-*")))
    assert run_nightly(spark, store, config).status == "published"
    for _ in range(2):
        assert run_nightly(spark, store, config).status == "already_published"
    rows = store.read("metrics").where("job = 'nightly'").orderBy("recorded_at").collect()
    assert [(row.status, row.generation) for row in rows] == [
        ("empty_window", None),
        ("published", 1),
        ("already_published", 1),
    ]


def test_a_nightly_killed_after_its_commit_point_gets_its_metrics_row_on_the_rerun(spark, stream, tmp_path):
    truth, _ = stream
    config = config_for(tmp_path, "nightly.holdout_hours=1", "nightly.passes=1")
    store = open_store(spark, config.storage)
    update_on_files(spark, NearlineUpdater(config), sorted(truth.landing.glob("part-*")))
    path = write_config(tmp_path, config)
    killed = run_job("jobs.nightly_retrain", path, crash_at="nightly:after_publish")
    assert killed.returncode == CRASH_EXIT_CODE, killed.stderr[-3000:]
    assert store.read("fixed_effect").select("generation").distinct().count() == 1
    assert store.read("metrics").where("job = 'nightly'").count() == 0

    rerun = run_job("jobs.nightly_retrain", path)
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["status"] == "already_published"
    (published,) = store.read("metrics").where("job = 'nightly' AND status = 'published'").collect()
    assert published.generation == 1 and 0.5 < published["values"]["full.auc"] < 1.0
    assert published["values"]["training_rows"] + published["values"]["holdout_rows"] == truth.events
    assert store.read("metrics").where("job = 'nightly'").count() == 2


def test_an_entity_with_a_broken_state_keeps_it_and_the_batch_goes_on(spark, stream, tmp_path):
    truth, _ = stream
    files = sorted(truth.landing.glob("part-*"))
    config = config_for(tmp_path)
    store = open_store(spark, config.storage)
    updater = NearlineUpdater(config)
    update_on_files(spark, updater, files[:2])
    # A member whose stored variances were corrupted (NaN), and who has events in the next batch.
    member = json.loads(files[2].read_text().splitlines()[0])["member_id"]
    state = store.read("re_state").where((F.col("re_type") == "per_member") & (F.col("entity_id") == member))
    broken = state.withColumn(
        "coefficients", F.transform("coefficients", lambda c: c.withField("variance", F.lit(float("nan"))))
    )
    store.merge("re_state", broken, ["re_type", "entity_id"])
    before = broken.first().coefficients

    update_on_files(spark, updater, files[2:], first_batch_id=2)
    (batch,) = store.read("metrics").where("batch_id = 2").collect()
    assert batch.status == "updated"
    assert batch["values"]["failed_updates.per_member"] == 1
    assert batch["values"]["failures.per_member.non_finite_prior"] == 1
    assert batch["values"]["entities_updated.per_member"] > 10
    (after,) = store.read("re_state").where(F.col("entity_id") == member).collect()
    assert [(c.name, c.term, c.mean) for c in after.coefficients] == [(c.name, c.term, c.mean) for c in before]

    # A live state too large for the delta-rs engine is refused at start, with a message naming the way out.
    small = config_for(tmp_path, "storage.delta_rs_max_state_entities=5")
    with pytest.raises(ConfigError, match=r"live state holds \d+ entity states.*storage.backend spark-delta"):
        NearlineUpdater(small).store(spark)


def test_the_gate_never_publishes_what_is_not_finite(spark):
    finite = FixedEffectModel("global", ("intercept",), ("intercept",), (0.1,), (0.5,))
    coefficients = spark.createDataFrame(
        [("a", [("x", "", 0.5, 0.1)])],
        "entity_id string, coefficients array<struct<name:string,term:string,mean:double,variance:double>>",
    )
    assert non_finite({"full.auc": 0.7}, finite, {"per_member": coefficients}) is None
    assert "full.log_loss" in non_finite({"full.auc": 0.7, "full.log_loss": float("nan")}, finite, {})
    infinite = FixedEffectModel("global", ("intercept",), ("intercept",), (float("inf"),), (0.5,))
    assert "fixed effect" in non_finite({}, infinite, {})
    bad = coefficients.withColumn(
        "coefficients",
        F.array(
            F.struct(
                F.lit("x").alias("name"),
                F.lit("").alias("term"),
                F.lit(1.0).alias("mean"),
                F.lit(float("nan")).alias("variance"),
            )
        ),
    )
    assert "per_member" in non_finite({}, finite, {"per_member": bad})
