"""The nightly job on generated streams with a known truth, in real Delta tables, with real process crashes."""

import json
import shutil
import subprocess
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from jobs.nightly_retrain import run_nightly
from jobs.runtime.faults import CRASH_EXIT_CODE
from jobs.storage.ingest import ingest_batch
from jobs.storage.store import open_store
from tests.jobs.jobrun import run_job, write_config
from tests.jobs.streams import (
    IngestedStream,
    config_for,
    ingest_files,
    ingest_stream,
    landing_files,
    rmse,
    stream_spec,
    truth_coefficients,
)

ROW_CAP = 300
# A batch of one event first, then the first six of the stream's eight files (the first night's);
# the last two come later. The hold-out is the two hours before the newest event: batch 4's last
# events fall in it, so the first night trains on the batches wholly before it, 0 to 3.
TRAINED_FILES = 6
LONELY_BATCH = 0
CUTOFF = 3


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory):
    """One extra single-event entity, then one stream, one nightly run."""
    stream = ingest_stream(
        spark,
        tmp_path_factory.mktemp("nightly"),
        stream_spec(),
        "nightly.holdout_hours=2",
        f"model.random_effects.per_item.max_rows_per_entity={ROW_CAP}",
        files=0,
    )
    lonely = {
        "event_id": "lonely-1",
        "event_time": "2026-11-01T00:30:00Z",
        "label": 1,
        "member_id": "member-lonely",
        "item_id": "item-000001",
        "features": {"member": [{"name": "m", "term": "0", "value": 1.0}]},
    }
    ingest_batch(
        stream.store, stream.config, spark.createDataFrame([(json.dumps(lonely),)], "value string"), LONELY_BATCH
    )
    ingest_files(spark, stream, landing_files(stream)[:TRAINED_FILES], first_batch_id=LONELY_BATCH + 1)
    report = run_nightly(spark, stream.store, stream.config)
    return stream, report


def priors(stream):
    return stream.store.read("re_priors").toPandas()


def test_the_fixed_and_random_effects_recover_the_truth(trained):
    stream, report = trained
    assert report.status == "published" and report.generation == 1
    fixed_truth, entity_truth = truth_coefficients(stream.truth)
    fixed = stream.store.read("fixed_effect").where("name != 'intercept'").collect()
    fixed_error = rmse([row.mean - fixed_truth[(row.name, row.term)] for row in fixed])
    # Measured 0.03 on this stream (truth scale 0.5).
    assert fixed_error < 0.1

    truth = {(r.re_type, r.entity_id, r.name, r.term): r.value for r in entity_truth.itertuples()}
    learnt = priors(stream)

    def slope_error(re_type, least_rows):
        return rmse(
            [
                c["mean"] - truth[(re_type, row.entity_id, c["name"], c["term"])]
                for row in learnt[(learnt.re_type == re_type) & (learnt.rows >= least_rows)].itertuples()
                for c in row.coefficients
                if c["name"] != "intercept"
            ]
        )

    # Truth scale 0.7. Measured on this stream: members with >= 100 rows 0.26, with >= 200 rows 0.16;
    # items (300 rows each, capped) 0.13. More rows, smaller error.
    assert slope_error("per_member", 100) < 0.35
    assert slope_error("per_member", 200) < slope_error("per_member", 50)
    assert slope_error("per_item", 100) < 0.2


def test_the_full_model_beats_the_fixed_effect_alone_on_the_holdout(trained):
    _, report = trained
    validation = report.validation
    assert validation["full.auc"] > validation["fixed_only.auc"] + 0.05
    assert validation["full.log_loss"] < validation["fixed_only.log_loss"]
    for re_type in ("per_member", "per_item"):
        assert validation[f"full.per_entity_auc.{re_type}"] > validation[f"fixed_only.per_entity_auc.{re_type}"]
    assert 0.8 < validation["full.calibration"] < 1.25


def test_both_random_effect_types_are_published_with_their_generation_and_cutoff(trained):
    stream, report = trained
    learnt = priors(stream)
    assert set(learnt.re_type) == {"per_member", "per_item"}
    assert (learnt.generation == 1).all() and (learnt.cutoff_batch_id == report.cutoff_batch_id).all()
    assert report.cutoff_batch_id == CUTOFF
    fixed = stream.store.read("fixed_effect").toPandas()
    assert (fixed.generation == 1).all() and (fixed.cutoff_batch_id == CUTOFF).all()
    metrics = stream.store.read("metrics").where("job = 'nightly'").collect()
    assert [(row.status, row.generation) for row in metrics] == [("published", 1)]
    assert metrics[0]["values"]["full.auc"] == pytest.approx(report.validation["full.auc"])


def test_an_entity_with_one_row_gets_a_random_effect(trained):
    stream, _ = trained
    learnt = priors(stream)
    (lonely,) = learnt[learnt.entity_id == "member-lonely"].itertuples()
    assert lonely.rows == 1
    assert {(c["name"], c["term"]) for c in lonely.coefficients} == {("intercept", "intercept"), ("m", "0")}
    assert all(np.isfinite(c["mean"]) and 0 < c["variance"] <= 1.0 for c in lonely.coefficients)


def test_an_entity_over_the_row_cap_is_trained_on_a_sample_of_its_rows(trained):
    stream, _ = trained
    learnt = priors(stream)
    items = learnt[learnt.re_type == "per_item"]
    events = stream.store.read("events")
    training = events.where(F.col("batch_id") <= CUTOFF).groupBy("item_id").count().toPandas()
    counts = training.set_index("item_id")["count"]
    assert (counts > ROW_CAP).sum() >= 3
    assert all(row.rows == min(ROW_CAP, counts[row.entity_id]) for row in items.itertuples())


def test_a_rerun_of_the_same_night_publishes_nothing(trained, spark):
    stream, _ = trained
    models = ("re_priors", "fixed_effect")
    before = {name: stream.store.version(name) for name in models}
    again = run_nightly(spark, stream.store, stream.config)
    assert again.status == "already_published" and again.generation == 1
    assert {name: stream.store.version(name) for name in models} == before
    # The outcome is recorded once (one metrics row); a second rerun writes nothing at all.
    recorded = {name: stream.store.version(name) for name in (*models, "metrics")}
    assert run_nightly(spark, stream.store, stream.config).status == "already_published"
    assert {name: stream.store.version(name) for name in recorded} == recorded


def test_an_empty_window_publishes_nothing(spark, tmp_path):
    config = config_for(tmp_path)
    store = open_store(spark, config.storage)
    report = run_nightly(spark, store, config)
    assert report.status == "empty_window"
    assert store.read("fixed_effect").count() == 0 and store.read("re_priors").count() == 0


def test_a_hold_out_that_cannot_define_a_metric_does_not_block_publication(spark, tmp_path):
    """Low traffic: a hold-out where no entity has both labels (no per-entity AUC), then one whose weights are all 0.

    Neither says the model is broken: the metric is left out, named in the reason, and the generation is published.
    """
    stream = ingest_stream(spark, tmp_path, stream_spec(events=600, slices=3), "nightly.holdout_hours=0.5", files=3)
    (newest,) = stream.store.read("events").agg(F.unix_seconds(F.max("event_time"))).first()

    def hand_batch(batch_id: int, hours: float, weight: float) -> None:
        moment = datetime.fromtimestamp(newest + hours * 3600, tz=UTC).isoformat().replace("+00:00", "Z")
        events = [
            {
                "event_id": f"hand-{batch_id}-{label}",
                "event_time": moment,
                "label": label,
                "weight": weight,
                "member_id": f"member-hand-{batch_id}-{label}",
                "item_id": f"item-hand-{batch_id}-{label}",
                "features": {"global": [{"name": "g", "term": "0", "value": 1.0}]},
            }
            for label in (0, 1)
        ]
        raw = spark.createDataFrame([(json.dumps(event),) for event in events], "value string")
        ingest_batch(stream.store, stream.config, raw, batch_id)

    hand_batch(3, hours=2, weight=1.0)  # two entities of one event each: per-entity AUCs undefined
    first = run_nightly(spark, stream.store, stream.config)
    assert first.status == "published", first.reason
    assert "not computable on this hold-out: fixed_only.per_entity_auc.per_item" in first.reason
    assert set(first.validation) == {
        f"{model}.{metric}" for model in ("fixed_only", "full") for metric in ("auc", "log_loss", "calibration")
    }

    hand_batch(4, hours=4, weight=0.0)
    second = run_nightly(spark, stream.store, stream.config)
    assert second.status == "published", second.reason
    assert second.validation == {} and "current.log_loss" in second.reason
    assert second.reason.startswith("not worse than the current generation")


def copy_published(trained, folder, spark, engine: str):
    """A copy of the trained tables (generation 1) and the stream's two later files, ingested since by ``engine``.

    delta-rs wrote the trained tables; Spark's Delta takes them over as they are (one format, both engines).
    """
    stream, _ = trained
    shutil.copytree(stream.folder / "tables", folder / "tables")
    config = config_for(folder, "nightly.holdout_hours=2", "nightly.passes=1", f"storage.backend={engine}")
    copy = IngestedStream(stream.truth, config, open_store(spark, config.storage), folder)
    ingest_files(spark, copy, landing_files(stream)[TRAINED_FILES:], first_batch_id=TRAINED_FILES + 1)
    return config, copy.store


@pytest.fixture
def published(trained, tmp_path, spark):
    return copy_published(trained, tmp_path, spark, "delta-rs")


@pytest.fixture(params=["delta-rs", "spark-delta"])
def published_by_each_engine(trained, tmp_path, spark, request):
    return copy_published(trained, tmp_path, spark, request.param)


def generations(store, table):
    return sorted({row.generation for row in store.read(table).select("generation").collect()})


def test_the_gate_keeps_a_worse_model_out_and_force_publishes_it(published_by_each_engine, spark):
    config, store = published_by_each_engine
    crippled = config_for(
        Path(store.root).parent,
        f"storage.backend={config.storage.backend}",
        "nightly.holdout_hours=2",
        "nightly.passes=1",
        "model.random_effects.per_member.penalty=1000000",
        "model.random_effects.per_item.penalty=1000000",
    )
    kept = run_nightly(spark, store, crippled)
    assert kept.status == "kept" and kept.generation == 1
    assert "below the current generation" in kept.reason
    assert kept.validation["full.auc"] < kept.validation["current.auc"] - crippled.nightly.auc_tolerance
    assert generations(store, "fixed_effect") == [1] and generations(store, "re_priors") == [1]
    (row,) = store.read("metrics").where("status = 'kept'").collect()
    assert row.note == kept.reason

    forced = run_nightly(spark, store, crippled, force_publish=True)
    assert forced.status == "published" and forced.generation == 2
    assert generations(store, "fixed_effect") == [1, 2]


def test_a_better_model_is_published(published, spark):
    config, store = published
    report = run_nightly(spark, store, config)
    assert report.status == "published" and report.generation == 2
    assert report.validation["full.auc"] >= report.validation["current.auc"] - config.nightly.auc_tolerance


def nightly_process(config_path, crash_at=None):
    return run_job("jobs.nightly_retrain", config_path, crash_at=crash_at)


# Where the killed run dies, one point on each engine (every point each run): publication is the job's
# sequence of guarded writes, and both engines' guards pass the same store contract (tests/jobs/test_tables.py).
# With each point, the generations re_priors holds after the crash: the fixed effect (the commit point) is not
# written at either, so generation 1 stays current.
PUBLICATION_CRASHES = {
    "delta-rs": ("nightly:before_publish", [1]),
    "spark-delta": ("nightly:between_priors_and_fixed_effect", [1, 2]),  # half published
}


def test_a_crash_before_or_during_publication_leaves_the_current_generation_intact(trained, spark, tmp_path):
    """On both engines at once: each a real nightly process killed at its point, then one run to the end."""
    published = {engine: copy_published(trained, tmp_path / engine, spark, engine) for engine in PUBLICATION_CRASHES}
    priors_before = {engine: store.read("re_priors").count() for engine, (_, store) in published.items()}
    runs: dict[str, list[subprocess.CompletedProcess]] = {}
    crashed_generations: dict[str, tuple[list[int], list[int]]] = {}

    def crashed_then_finished(engine: str) -> None:
        config, store = published[engine]
        config_path = write_config(tmp_path / engine / "job", config)
        runs[engine] = [nightly_process(config_path, crash_at=PUBLICATION_CRASHES[engine][0])]
        crashed_generations[engine] = (generations(store, "fixed_effect"), generations(store, "re_priors"))
        runs[engine].append(nightly_process(config_path))

    # Side by side: most of each process is a JVM starting.
    chains = [threading.Thread(target=crashed_then_finished, args=(engine,)) for engine in published]
    for thread in chains:
        thread.start()
    for thread in chains:
        thread.join()

    for engine, (config, store) in published.items():
        crashed, finished = runs[engine]
        assert crashed.returncode == CRASH_EXIT_CODE, (engine, crashed.stderr[-2000:])
        assert crashed_generations[engine] == ([1], PUBLICATION_CRASHES[engine][1]), engine
        assert store.read("re_priors").where("generation = 1").count() == priors_before[engine]
        assert finished.returncode == 0, (engine, finished.stderr[-2000:])
        report = json.loads(finished.stdout.strip().splitlines()[-1])
        assert report["status"] == "published" and report["generation"] == 2
        priors = store.read("re_priors").where("generation = 2").toPandas()
        assert not priors.duplicated(["re_type", "entity_id"]).any()
        assert (priors.cutoff_batch_id == report["cutoff_batch_id"]).all()

        assert run_nightly(spark, store, config).status == "already_published"  # in this process: no JVM to start
        assert store.read("re_priors").where("generation = 2").count() == len(priors)
        # One row for the publication (none from the crashed runs), one for the rerun's outcome.
        rows = store.read("metrics").where("job = 'nightly' AND generation = 2").orderBy("recorded_at").collect()
        assert [row.status for row in rows] == ["published", "already_published"]


def test_a_rolled_back_generation_number_is_never_reused(published, spark):
    config, store = published
    assert run_nightly(spark, store, config).generation == 2
    for table in ("fixed_effect", "re_priors"):
        store.delete(table, "generation = 2")  # the rollback of docs/operations.md

    # The same night again: generation 1 is current, so it trains, and publishes under a new number.
    again = run_nightly(spark, store, config, force_publish=True)
    assert again.status == "published" and again.generation == 3
    assert generations(store, "fixed_effect") == [1, 3] and generations(store, "re_priors") == [1, 3]
