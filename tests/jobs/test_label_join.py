"""The label join on real streams, real Delta tables and real, killed and restarted processes (docs/label_join.md)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import reduce
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.game.generation import current_generation, priors_of
from jobs.game.model import with_game_scores
from jobs.label_join import run_label_join
from jobs.labels.inputs import clicks_as_arrivals, impressions_as_arrivals
from jobs.labels.join import keeps_negative
from jobs.labels.joiner import LabelJoiner
from jobs.labels.schemas import IMPRESSION
from jobs.nearline_update import run_nearline
from jobs.nightly_retrain import run_nightly
from jobs.runtime.errors import ConcurrentWriterError
from jobs.runtime.faults import CRASH_EXIT_CODE
from jobs.runtime.settings import Config
from jobs.simulate.clicks import ClickSpec, ClickTruth, generate_clicks
from jobs.simulate.writers import deliver
from jobs.storage.parsing import typed_raw_schema
from jobs.storage.store import TableStore, open_store
from lambda_learner import metrics
from tests.jobs.jobrun import rows, run_job, run_side_by_side, same_rows, write_config
from tests.jobs.streams import config_for, stream_spec

START = datetime(2026, 11, 1, tzinfo=UTC)
WINDOW, LATENESS = 15.0, 2.0
# Wall-clock columns beside those jobrun.rows leaves out.
LABELLED_AT = "labelled_at"


def at(minutes: float) -> str:
    return (START + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def impression(name: str, minutes: float | None) -> str:
    record = {"impression_id": name, "member_id": "member-1", "item_id": "item-1"}
    if minutes is not None:
        record["impression_time"] = at(minutes)
    record["features"] = {"global": [{"name": "g", "term": "0", "value": 0.5}]}
    return json.dumps(record)


def click(name: str | None, minutes: float, kind: str | None = None) -> str:
    record = {"click_time": at(minutes)} if name is None else {"impression_id": name, "click_time": at(minutes)}
    if kind is not None:
        record["kind"] = kind
    return json.dumps(record)


def table_rows(store: TableStore, table: str, order: list[str]) -> list[dict]:
    frame = store.read(table)
    return rows(frame.drop(LABELLED_AT) if LABELLED_AT in frame.columns else frame, order)


# ---------------------------------------------------------------------------------------------------------------
# Every case, by hand


HAND_SETTINGS = (
    "label_join.attribution_window_minutes=10",
    "label_join.allowed_lateness_minutes=2",
    "label_join.orphan_lookback_minutes=60",
    "label_join.feedback=[{name: click}, {name: like, label: 1, weight: 2.0}, {name: hide, label: 0, weight: 3.0}]",
)
FIRST_IMPRESSIONS = [impression(name, minutes) for name, minutes in (("i1", 0), ("i2", 1), ("i3", 2), ("i3", 2))]
FIRST_CLICKS = [click("i1", 3.5), click("i1", 4.5), click("i2", 1.5, "share"), click("i9", 3.5), click("i3", 1.5)]
FAR_AHEAD = 40_000_000.0
# Five micro-batches of (impressions, clicks); minutes after START. Window 10, lateness 2, lookback 60.
HAND_BATCHES = [
    (
        [*FIRST_IMPRESSIONS, impression("i6", 3), "not json", impression("i7", None)],
        [*FIRST_CLICKS, click("i6", 3.2, "hide"), click("i6", 3.4, "like"), click("i8", 4), click(None, 4)],
    ),
    (
        [impression("i4", 20), impression("i8", 3.8), impression("i3", 2), impression("i5", 0.5)],
        [click("i2", 5.5, "like"), click("i3", 15.5)],
    ),
    ([impression("i10", 21)], [click("i3", 8.5), click("i4", 21.5), click("i4", 22), click("i1", 40)]),
    ([impression("i12", 75)], [click("i11", 80)]),
    # Dated some 76 years ahead: beyond the ingestion clock's bounds, they move no watermark.
    ([impression("i13", 100), impression("i14", FAR_AHEAD)], [click("i1", 79), click("i12", FAR_AHEAD)]),
]
# (event id, label, weight, feedback, micro-batch)
HAND_LABELLED = [
    ("i1", 1.0, 1.0, "click", 0),  # clicked 3.5 minutes after (its second click is a duplicate)
    ("i6", 0.0, 3.0, "hide", 0),  # hidden before it was liked: the first feedback labels it
    ("i2", 1.0, 2.0, "like", 1),  # liked within the window (its "share" is of no known kind)
    ("i8", 1.0, 1.0, "click", 1),  # its click came a batch before it and waited
    ("i3", 0.0, 1.0, None, 1),  # the clicks' watermark (13.5) passed its window (2 + 10)
    ("i4", 1.0, 1.0, "click", 2),
    ("i10", 0.0, 1.0, None, 2),  # the watermark reached 38
]
# (micro-batch, the record's id and time, reason)
HAND_QUARANTINED = [
    (0, None, None, "malformed_impression"),
    (0, "i7", None, "malformed_impression"),
    (0, "i3", at(2), "duplicate_impression"),
    (0, "i1", at(4.5), "duplicate_click"),
    (0, "i2", at(1.5), "unknown_feedback"),
    (0, "i6", at(3.4), "already_labelled"),
    (0, None, at(4), "malformed_click"),
    (0, "i3", at(1.5), "click_before_impression"),
    (1, "i3", at(2), "duplicate_impression"),  # i3 is known from batch 0
    (1, "i5", at(0.5), "late_impression"),  # behind the impressions' watermark (1)
    (1, "i3", at(15.5), "click_after_window"),
    (1, "i9", at(3.5), "orphan_click"),  # no impression came before the impressions' watermark passed it
    (2, "i3", at(8.5), "late_click"),  # within the window, but after i3 was emitted as a negative
    (2, "i4", at(22), "duplicate_click"),
    (2, "i1", at(40), "click_after_window"),
    (4, "i1", at(79), "orphan_click"),  # i1 was forgotten (60 minutes after it) when the watermark reached 78
    (4, "i11", at(80), "orphan_click"),  # waited in batch 3
    (4, "i14", at(FAR_AHEAD), "bad_impression_time:after"),  # the bound follows: the batch's ingestion + 60 minutes
    (4, "i12", at(FAR_AHEAD), "bad_click_time:after"),
]


def instant(collected: datetime) -> datetime:
    """A timestamp as PySpark collects it (naive, in the OS time zone) as the aware UTC instant it is."""
    return collected.astimezone(UTC)


def test_every_case_of_the_join_by_hand(spark, tmp_path):
    started = datetime.now(UTC)
    config = config_for(tmp_path, "storage.backend=delta-rs", *HAND_SETTINGS)
    joiner = LabelJoiner(config)
    for batch_id, (impressions, clicks) in enumerate(HAND_BATCHES):
        joiner.process(arrivals(spark, config, impressions, clicks), batch_id)
    store = joiner.store(spark)
    join = config.label_join

    labelled = store.read(join.output_table).orderBy("label_batch_id", "event_id").collect()
    got = [(r.event_id, r.label, r.weight, r.feedback, r.label_batch_id) for r in labelled]
    assert sorted(got, key=lambda r: (r[4], r[0])) == sorted(HAND_LABELLED, key=lambda r: (r[4], r[0]))
    assert all(r.member_id == "member-1" and r.features["global"][0].value == 0.5 for r in labelled)
    (i8,) = [r for r in labelled if r.event_id == "i8"]
    assert (instant(i8.event_time), instant(i8.feedback_time)) == (
        START + timedelta(minutes=3.8),
        START + timedelta(minutes=4),
    )

    quarantined = []
    for row in store.read(join.quarantine_table).collect():
        payload = json.loads(row.payload) if row.payload.startswith("{") else {}
        time = payload.get("click_time", payload.get("impression_time"))
        reason, _, bound = row.reason.partition(" ")
        if bound:
            assert (
                started + timedelta(minutes=60)
                <= datetime.fromisoformat(bound)
                <= datetime.now(UTC) + timedelta(minutes=60)
            )
        quarantined.append((row.batch_id, payload.get("impression_id"), time, reason))
    key = lambda r: tuple("" if v is None else str(v) for v in r)  # noqa: E731
    assert sorted(quarantined, key=key) == sorted(HAND_QUARANTINED, key=key)

    state = store.read(join.pending_table)
    pending = {r.impression_id for r in state.where("record = 'impression' AND label IS NULL").collect()}
    remembered = {r.impression_id for r in state.where("record = 'impression' AND label IS NOT NULL").collect()}
    assert (pending, remembered) == ({"i12", "i13"}, {"i4", "i10"})
    assert state.where("record = 'click'").count() == 0
    (marks,) = state.where("record = 'watermarks'").collect()
    assert (instant(marks.impressions_watermark), instant(marks.clicks_watermark)) == (
        START + timedelta(minutes=98),
        START + timedelta(minutes=78),
    )
    figures = store.read(join.metrics_table).orderBy("batch_id").collect()
    assert [f["values"]["quarantined"] for f in figures] == [8, 4, 3, 0, 4]
    assert figures[-1]["values"]["quarantined.bad_click_time"] == 1
    assert sum(f["values"]["impressions_in"] for f in figures) == 15
    assert figures[-1]["values"]["pending_impressions"] == 2


def arrivals(spark, config: Config, impressions: list[str], clicks: list[str]):
    frames = [spark.createDataFrame([(line,) for line in lines], "value string") for lines in (impressions, clicks)]
    return impressions_as_arrivals(frames[0], config.model).unionByName(clicks_as_arrivals(frames[1], config.model))


def test_a_second_stream_on_the_same_tables_is_refused_before_it_writes_and_redone_on_restart(spark, tmp_path):
    """Two label join streams on one set of tables: the live one's next number is the one the other took meanwhile.
    It is refused before it writes anything of its batch; restarted, it joins that batch under the next number."""
    config = config_for(tmp_path, "storage.backend=delta-rs", *HAND_SETTINGS)
    join = config.label_join
    live, backfill = LabelJoiner(config, stream_id="live"), LabelJoiner(config, stream_id="backfill")
    live.process(arrivals(spark, config, *HAND_BATCHES[0]), 0)
    backfill.process(arrivals(spark, config, *HAND_BATCHES[1]), 0)  # continues the tables' sequence: number 1
    store = live.store(spark)
    tables = [join.output_table, join.quarantine_table, join.pending_table, join.metrics_table]
    versions = {table: store.version(table) for table in tables}

    with pytest.raises(ConcurrentWriterError, match="holds it from batch 0 of stream backfill, and this is batch 1 of"):
        live.process(arrivals(spark, config, *HAND_BATCHES[2]), 1)  # its own last number + 1: number 1 again
    assert {table: store.version(table) for table in tables} == versions

    restarted = LabelJoiner(config, stream_id="live")  # the stream started again: it looks its number up
    restarted.process(arrivals(spark, config, *HAND_BATCHES[2]), 1)
    numbers = store.read(join.metrics_table).select("batch_id", "run_id").orderBy("batch_id").collect()
    assert [(row.batch_id, row.run_id) for row in numbers] == [(0, "live/0"), (1, "backfill/0"), (2, "live/1")]


def test_typed_input_reads_as_json_does(spark, tmp_path):
    config = config_for(tmp_path)
    lines = [impression("i1", 0), click("i1", 1.5, "like")]
    from_text = arrivals(spark, config, lines[:1], lines[1:])
    typed_impressions = spark.createDataFrame([(line,) for line in lines[:1]], "value string").select(
        F.from_json("value", impression_schema(config)).alias("r")
    )
    typed_clicks = spark.createDataFrame(
        [("i1", START + timedelta(minutes=1.5), "like")], "impression_id string, click_time timestamp, kind string"
    )
    typed = impressions_as_arrivals(typed_impressions.select("r.*"), config.model).unionByName(
        clicks_as_arrivals(typed_clicks, config.model)
    )
    assert typed.drop("payload").collect() == from_text.drop("payload").collect()


def impression_schema(config: Config):
    from jobs.labels.schemas import impression_typed_schema

    return impression_typed_schema(config.model)


def test_a_bad_label_join_setting_is_refused_naming_its_key(tmp_path):
    from jobs.runtime.errors import ConfigError

    for override, key in [
        ("label_join.orphan_lookback_minutes=5", "label_join.orphan_lookback_minutes"),
        ("label_join.app_id=lambda-learner-nearline", "label_join.app_id"),
        ("label_join.output_table=events", "label_join.output_table"),
        ("label_join.negative_sampling_rate=0", "label_join.negative_sampling_rate"),
        ("label_join.negative_sampling_rate=0.0001", "events.max_weight"),  # weighted 10,000: would be quarantined
        ("label_join.feedback=[{name: click, label: 2}]", "label_join.feedback[0].label"),
        ("label_join.clicks.source=kafka", "label_join.clicks.options"),
    ]:
        with pytest.raises(ConfigError, match=f"config key '{key}'".replace("[", r"\[").replace("]", r"\]")):
            config_for(tmp_path, override)


# ---------------------------------------------------------------------------------------------------------------
# A generated stream: the truth, exactly once under kills, and the chain that learns from it

STREAM_SETTINGS = (
    f"label_join.attribution_window_minutes={WINDOW}",
    f"label_join.allowed_lateness_minutes={LATENESS}",
    "label_join.negative_sampling_rate=0.5",
    "label_join.impressions.max_files_per_trigger=1",
    "label_join.clicks.max_files_per_trigger=1",
    "label_join.trigger=available_now",
)
CLICKS = ClickSpec(
    median_delay_minutes=3.0,
    delay_sigma=1.2,  # about 9% of the clicks come after the 15-minute window
    duplicate_rate=0.1,
    orphan_rate=0.05,
    late_rate=0.04,
    late_minutes=40.0,  # after the window has closed: window, lateness and a slice are 27 minutes
    trailing_slices=2,
)


@dataclass
class Chain:
    """The stream, its truth and the tables of the chain that ran on it (label join, nearline, nightly)."""

    truth: ClickTruth
    config: Config
    store: TableStore
    folder: Path


def joined_config(folder: Path, impressions: Path, clicks: Path, *overrides: str) -> Config:
    """The label join on these two folders, its tables and checkpoint under ``folder``."""
    return config_for(
        folder,
        f"label_join.impressions.path={impressions}",
        f"label_join.clicks.path={clicks}",
        f"label_join.checkpoint={folder / 'label-join-checkpoint'}",
        *STREAM_SETTINGS,
        *overrides,
    )


@pytest.fixture(scope="module")
def chain(spark, tmp_path_factory) -> Chain:
    """A drifting stream of impressions and clicks through the whole chain, uninterrupted, on the streaming queries.

    The first half of the files lands, the label join and the nearline job drain it (the nearline job
    in one micro-batch) and the nightly job publishes generation 1; then the rest lands, and both jobs
    drain it again, the nearline job one micro-batch per commit of the label join.
    """
    folder = tmp_path_factory.mktemp("chain")
    spec = stream_spec(events=4800, slices=6, slice_minutes=10.0, drift=0.4, new_entity_rate=0.02, seed=21)
    truth = generate_clicks(spec, CLICKS, folder / "stream")
    landing = folder / "landing"
    tables = folder / "reference" / "tables"
    config = joined_config(
        folder / "reference",
        landing / "impressions",
        landing / "clicks",
        "storage.backend=delta-rs",
        "stream.source=delta",
        f"stream.path={tables / 'labelled_events'}",
        f"stream.checkpoint={folder / 'reference' / 'nearline-checkpoint'}",
        "stream.trigger=available_now",
        "nightly.holdout_hours=0",
        "nightly.passes=1",
    )
    store = open_store(spark, config.storage)
    for impressions, clicks in ((slice(0, 2), slice(0, 2)), (slice(2, None), slice(2, None))):
        deliver(truth.impression_files[impressions], landing / "impressions")
        deliver(truth.click_files[clicks], landing / "clicks")
        run_label_join(spark, config)
        first = impressions.start == 0
        run_nearline(
            spark, replace(config, stream=replace(config.stream, max_files_per_trigger=None)) if first else config
        )
        if first:
            assert run_nightly(spark, store, config).status == "published"
    return Chain(truth, config, store, folder)


def expected_outcome(spark, truth: ClickTruth, rate: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What the truth says the join does: each impression's label (NaN: still pending), and each click's reason."""
    impressions = pd.read_parquet(truth.truth / "impressions.parquet")
    clicks = pd.read_parquet(truth.truth / "clicks.parquet")
    clicks = clicks[clicks.file.notna()].reset_index(drop=True)  # what was delivered
    window = pd.Timedelta(minutes=WINDOW)
    final_clicks_mark = clicks.click_time.max() - pd.Timedelta(minutes=LATENESS)
    final_impressions_mark = impressions.impression_time.max() - pd.Timedelta(minutes=LATENESS)

    times = impressions.set_index("impression_id").impression_time
    clicks["delay"] = clicks.click_time - clicks.impression_id.map(times)
    in_window = clicks.delay.notna() & (clicks.delay <= window)
    on_time = in_window & ~clicks.late
    first = clicks[on_time].sort_values("click_time").drop_duplicates("impression_id")
    clicks["reason"] = None
    clicks.loc[clicks.case == "orphan", "reason"] = np.where(
        clicks.click_time[clicks.case == "orphan"] < final_impressions_mark, "orphan_click", None
    )
    clicks.loc[clicks.delay > window, "reason"] = "click_after_window"
    clicks.loc[in_window & clicks.late, "reason"] = "late_click"
    clicks.loc[on_time & ~clicks.index.isin(first.index), "reason"] = "duplicate_click"

    impressions["positive"] = impressions.impression_id.isin(first.impression_id)
    closed = impressions.impression_time + window < final_clicks_mark
    keep = spark.createDataFrame(impressions[["impression_id"]]).select(
        keeps_negative(F.col("impression_id"), rate).alias("keep")
    )
    impressions["kept"] = [row.keep for row in keep.collect()]
    impressions["label"] = np.where(impressions.positive, 1.0, np.where(closed, 0.0, np.nan))
    impressions["weight"] = np.where(impressions.positive, 1.0, 1.0 / rate)
    impressions["emitted"] = impressions.positive | (closed & impressions.kept)
    return impressions, clicks


def test_the_generated_streams_are_labelled_as_the_truth_says(spark, chain):
    impressions, clicks = expected_outcome(spark, chain.truth, rate=0.5)
    join = chain.config.label_join
    output = chain.store.read(join.output_table).toPandas()
    assert output.event_id.is_unique
    expected = impressions[impressions.emitted].set_index("impression_id")
    assert set(output.event_id) == set(expected.index)
    got = output.set_index("event_id").loc[expected.index]
    assert (got.label == expected.label).all() and (got.weight == expected.weight).all()
    assert (got.feedback.isna() == (got.label == 0)).all()
    # A long tail, duplicates, orphans, late deliveries and sampled negatives all happened.
    assert impressions.positive.sum() > 1000
    assert (~impressions.emitted & (impressions.label == 0)).sum() > 1000

    quarantined = chain.store.read(join.quarantine_table).toPandas()
    payloads = [json.loads(payload) for payload in quarantined.payload]
    got_reasons = sorted(zip([p["impression_id"] for p in payloads], quarantined.reason, strict=True))
    want = clicks[clicks.reason.notna()]
    assert got_reasons == sorted(zip(want.impression_id, want.reason, strict=True))
    assert set(quarantined.reason) == {"orphan_click", "click_after_window", "late_click", "duplicate_click"}

    figures = pd.DataFrame([row["values"] for row in chain.store.read(join.metrics_table).collect()])
    assert figures.impressions_in.sum() == len(impressions)
    assert figures.clicks_in.sum() == len(clicks)
    assert figures.negatives_sampled_out.sum() == ((impressions.label == 0) & ~impressions.kept).sum()
    state = chain.store.read(join.pending_table)
    assert state.where("record = 'impression' AND label IS NULL").count() == impressions.label.isna().sum()


def test_the_nearline_job_reads_the_labelled_events_as_its_stream(chain):
    """No glue: the nearline job's Delta source on the label join's output table, event for event."""
    labelled = chain.store.read(chain.config.label_join.output_table)
    events = chain.store.read("events")
    assert events.count() == labelled.count()
    assert events.select("event_id").subtract(labelled.select("event_id")).count() == 0
    assert chain.store.read("quarantine").count() == 0
    assert set(typed_raw_schema(chain.config.model).fieldNames()) <= set(labelled.columns)
    assert chain.store.read("metrics").where("job = 'nearline' AND status = 'rebased'").count() == 1


def test_the_chained_jobs_learn_better_than_the_stale_model(spark, chain):
    """On the joined stream, the nearline model predicts each batch (before learning it) better than the nightly one."""
    store, config = chain.store, chain.config
    generation = current_generation(store, config.model)
    events = store.read("events").where(F.col("batch_id") > generation.cutoff_batch_id + 1)
    batches = sorted(row.batch_id for row in events.select("batch_id").distinct().collect())
    assert len(batches) >= 2
    # The live model before each batch: the state's version just before the one that applied the batch.
    applied = {
        version: store.read("re_state", version=version).agg(F.max("last_batch_id")).first()[0]
        for version in range(store.version("re_state") + 1)
    }
    before = {batch: max(v for v, last in applied.items() if last is not None and last < batch) for batch in batches}
    # One scoring pass for all batches: each batch's events and state under entity ids of their own.
    types = config.model.random_effects
    keyed = events
    for random_effect in types:
        column = random_effect.entity_column
        keyed = keyed.withColumn(column, F.concat_ws("|", F.col("batch_id"), F.col(column)))
    live = {
        r.name: reduce(
            DataFrame.unionByName,
            [
                store.read("re_state", version=before[batch])
                .where(F.col("re_type") == r.name)
                .withColumn("entity_id", F.concat_ws("|", F.lit(batch), F.col("entity_id")))
                for batch in batches
            ],
        )
        for r in types
    }
    stale = {r.name: priors_of(store, generation.number, r) for r in types}
    keyed = keyed.withColumn("row_key", F.xxhash64("event_id"))
    scored = with_game_scores(keyed, config, generation.fixed_effect, live, 4).toPandas()
    frozen = with_game_scores(
        events.withColumn("row_key", F.xxhash64("event_id")), config, generation.fixed_effect, stale, 4
    )
    frozen = frozen.toPandas()
    live_auc = metrics.auc(scored.score.to_numpy(), scored.label.to_numpy())
    stale_auc = metrics.auc(frozen.score.to_numpy(), frozen.label.to_numpy())
    print("AUC", live_auc, stale_auc)
    assert live_auc > stale_auc + 0.02, (live_auc, stale_auc)


# Where each killed run dies: after each write of a micro-batch (a death before the first write is one before
# foreachBatch, which Spark redoes by itself), every point on one engine each run. The skip-on-replay logic is
# the job's and both engines' guards pass the same store contract (tests/jobs/test_tables.py). delta-rs dies after
# two appends its replay must skip (output, metrics); Spark's Delta after one (quarantine) and after the pending
# state's overwrite, the batch's last write, which makes its replay skip the whole batch.
KILLS = {
    "delta-rs": ["label_join:after_output@0", "label_join:after_metrics@2"],
    "spark-delta": ["label_join:after_quarantine@1", "label_join:after_state@3"],
}
TABLE_ORDER = {
    "output_table": ["event_id"],
    "quarantine_table": ["batch_id", "payload"],
    "metrics_table": ["batch_id"],
    "pending_table": ["record", "impression_id", "time", "kind"],
}


def test_a_label_join_killed_at_every_write_or_moved_to_a_new_checkpoint_ends_in_the_same_tables(spark, tmp_path):
    """On both engines at once (each a chain of real processes, killed then restarted), against one reference.

    The reference joins the first half of the files under one checkpoint and the rest under a new one, in this
    process: a new checkpoint's batches continue the tables' numbers, so none is mistaken for one joined before.
    """
    spec = stream_spec(events=600, slices=4, slice_minutes=10.0, drift=0.3, seed=23)  # and one trailing slice
    truth = generate_clicks(spec, replace(CLICKS, trailing_slices=1), tmp_path / "stream")

    def settings(name: str, backend: str, impressions=truth.impressions, clicks=truth.clicks, *extra: str) -> Config:
        folder = tmp_path / name
        return joined_config(
            folder, impressions, clicks, f"storage.backend={backend}", "spark.shuffle_partitions=2", *extra
        )

    runs = {}

    def killed_and_restarted(backend: str) -> None:
        path = write_config(tmp_path / backend, settings(backend, backend))
        runs[backend] = [run_job("jobs.label_join", path, crash_at=point) for point in KILLS[backend]]
        runs[backend].append(run_job("jobs.label_join", path))

    # Two chains of processes side by side: most of each run is a JVM starting, on one core.
    chains = [threading.Thread(target=killed_and_restarted, args=(backend,)) for backend in KILLS]
    for thread in chains:
        thread.start()
    halves = [(slice(None, 2), "first"), (slice(2, None), "second")]
    for files, half in halves:
        landing = tmp_path / "landing" / half
        deliver(truth.impression_files[files], landing / "impressions")
        deliver(truth.click_files[files], landing / "clicks")
        checkpoint = f"label_join.checkpoint={tmp_path / 'reference' / f'checkpoint-{half}'}"
        config = settings("reference", "delta-rs", landing / "impressions", landing / "clicks", checkpoint)
        run_label_join(spark, config)
    for thread in chains:
        thread.join()

    reference = config
    expected = open_store(spark, reference.storage)
    numbers = expected.read(reference.label_join.metrics_table).select("batch_id", "run_id").collect()
    assert sorted(row.batch_id for row in numbers) == list(range(5))
    assert len({row.run_id.split("/")[0] for row in numbers}) == 2  # two streams, one sequence
    labelled = expected.read(reference.label_join.output_table).toPandas().set_index("event_id")
    impressions, _ = expected_outcome(spark, truth, rate=0.5)
    emitted = impressions[impressions.emitted].set_index("impression_id")
    assert (labelled.loc[emitted.index].label == emitted.label).all() and len(labelled) == len(emitted)
    for backend, processes in runs.items():
        for point, process in zip(KILLS[backend], processes, strict=False):
            assert process.returncode == CRASH_EXIT_CODE, (backend, point, process.stderr[-3000:])
        assert processes[-1].returncode == 0, (backend, processes[-1].stderr[-3000:])
        crashed = open_store(spark, settings(backend, backend).storage)
        for key, order in TABLE_ORDER.items():
            table = getattr(reference.label_join, key)
            assert same_rows(table_rows(crashed, table, order), table_rows(expected, table, order)), (backend, table)


def test_two_label_join_processes_on_the_same_tables_account_for_every_impression(spark, tmp_path):
    """Two label join processes at once on the same tables, each with its own half of the streams and checkpoint.
    One that took a number the other holds is refused before it writes (ConcurrentWriterError, or
    HalfWrittenBatchError beside a half-written batch) and joins that batch under the next number when started
    again. Every impression ends somewhere, once labelled at most: labelled, quarantined with a reason, or pending."""
    spec = stream_spec(events=600, slices=4, slice_minutes=10.0, drift=0.3, seed=29)
    truth = generate_clicks(spec, replace(CLICKS, trailing_slices=1), tmp_path / "stream")
    paths = {}
    for name, files in (("live", slice(None, 2)), ("backfill", slice(2, None))):
        landing = tmp_path / name
        deliver(truth.impression_files[files], landing / "impressions")
        deliver(truth.click_files[files], landing / "clicks")
        checkpoint = f"label_join.checkpoint={tmp_path / f'{name}-checkpoint'}"
        config = joined_config(tmp_path, landing / "impressions", landing / "clicks", checkpoint)
        paths[name] = write_config(tmp_path / f"{name}-job", config)
    run_side_by_side("jobs.label_join", paths)

    join, store = config.label_join, open_store(spark, config.storage)
    labelled = [row.event_id for row in store.read(join.output_table).select("event_id").collect()]
    assert len(labelled) == len(set(labelled))
    quarantine_rows = store.read(join.quarantine_table).collect()
    payloads = [json.loads(row.payload) for row in quarantine_rows if row.payload.startswith("{")]
    quarantined = {payload.get("impression_id") for payload in payloads if "impression_time" in payload}
    waiting = store.read(join.pending_table).where(F.col("record") == IMPRESSION)
    pending = {row.impression_id for row in waiting.select("impression_id").collect()}
    impressions = set(pd.read_parquet(truth.truth / "impressions.parquet").impression_id)
    assert impressions <= set(labelled) | quarantined | pending
    numbers = sorted(row.batch_id for row in store.read(join.metrics_table).select("batch_id").collect())
    assert numbers == list(range(len(numbers)))
