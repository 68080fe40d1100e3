import json
import math
import time
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.runtime.config import load_config
from jobs.runtime.settings import EventsConfig
from jobs.storage.parsing import classify_events, parse_events
from jobs.storage.schemas import QUARANTINE, events_schema

RULES = EventsConfig(max_future_minutes=60, max_age_days=365, max_abs_feature_value=1e6, max_features_per_bag=50)
# When the batch was ingested: event times are judged against it.
INGESTED = datetime(2026, 11, 2, tzinfo=UTC)


def event(**overrides) -> dict:
    """A valid raw event of the base configuration (per_member and per_item random effects)."""
    base = {
        "event_id": "e1",
        "event_time": "2026-11-01T08:00:03Z",
        "label": 1,
        "weight": 2.0,
        "member_id": "m1",
        "item_id": "i1",
        "features": {
            "global": [{"name": "g", "term": "0", "value": 0.5}],
            "member": [{"name": "m", "term": "0", "value": -1.0}],
            "item": [{"name": "i", "value": 3.0}],
        },
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not ...}


def lines_frame(spark, lines: list[str]):
    return spark.createDataFrame([(line,) for line in lines], "value string")


@pytest.fixture(scope="module")
def model():
    return load_config().model


BAD_EVENTS = [
    ('{"event_id": "x", "label": ', "malformed_payload"),
    ("[1, 2, 3]", "malformed_payload"),
    ("", "malformed_payload"),
    (json.dumps(event(label="yes")), "malformed_payload"),
    (json.dumps(event(event_id=...)), "missing_event_id"),
    (json.dumps(event(event_id="  ")), "missing_event_id"),
    (json.dumps(event(event_time="not-a-time")), "bad_event_time"),
    (json.dumps(event(event_time=...)), "bad_event_time"),
    (json.dumps(event(label=...)), "missing_label"),
    (json.dumps(event(label=7)), "label_out_of_domain"),
    (json.dumps(event(label=0.5)), "label_out_of_domain"),
    (json.dumps(event(weight=-1.0)), "bad_weight"),
    (json.dumps(event(weight=float("inf"))), "bad_weight"),
    # Finite but huge: one event would outweigh everything an entity has learnt, and overflow the hold-out's sums.
    (json.dumps(event(weight=1e300)), "bad_weight:above 1000"),
    (json.dumps(event(weight=1000.5)), "bad_weight:above 1000"),
    (json.dumps(event(member_id=...)), "missing_entity_id:member_id"),
    (json.dumps(event(item_id="")), "missing_entity_id:item_id"),
    (json.dumps(event(features={"member": [{"name": "m", "term": "0", "value": float("nan")}]})), "bad_feature"),
    (json.dumps(event(features={"global": [{"term": "0", "value": 1.0}]})), "bad_feature"),
    # Finite but huge: it would overflow every score it enters.
    (json.dumps(event(features={"member": [{"name": "m", "term": "0", "value": 1e308}]})), "bad_feature"),
    (json.dumps(event(features={"item": [{"name": "i", "value": -2e6}]})), "bad_feature"),
    (
        json.dumps(event(features={"item": [{"name": "i", "term": str(j), "value": 1.0} for j in range(51)]})),
        "too_many_features:item",
    ),
    (json.dumps(event(event_time="2099-01-01T00:00:00Z")), "bad_event_time:after 2026-11-02T01:00:00+00:00"),
    (json.dumps(event(event_time="1970-01-01T00:00:00Z")), "bad_event_time:before 2025-11-02T00:00:00+00:00"),
]


def test_a_mixed_batch_splits_into_exactly_the_good_and_the_bad(spark, model):
    good = [json.dumps(event(event_id=f"g{i}")) for i in range(5)]
    lines = good + [line for line, _ in BAD_EVENTS]
    parsed = parse_events(lines_frame(spark, lines), model, 0, RULES, INGESTED)
    assert sorted(row.event_id for row in parsed.valid.collect()) == [f"g{i}" for i in range(5)]
    assert sorted((row.payload, row.reason) for row in parsed.rejected.collect()) == sorted(BAD_EVENTS)
    assert [(f.name, f.dataType) for f in parsed.rejected.schema] == [(f.name, f.dataType) for f in QUARANTINE]
    assert {row.batch_id for row in parsed.rejected.collect()} == {0}


def test_each_batch_is_judged_by_its_own_ingestion_time_and_number(spark, model):
    """The rules are built once per Spark (a batch's bounds and number are its own columns): three batches of one
    session, three ingestion times, three outcomes (too late, valid, too old)."""
    line = json.dumps(event(event_time="2026-11-02T12:00:00Z"))
    late = parse_events(lines_frame(spark, [line]), model, 3, RULES, INGESTED)
    (rejected,) = late.rejected.collect()
    assert (rejected.batch_id, rejected.reason) == (3, "bad_event_time:after 2026-11-02T01:00:00+00:00")
    later = datetime(2026, 11, 2, 12, tzinfo=UTC)
    (valid,) = parse_events(lines_frame(spark, [line]), model, 4, RULES, later).valid.collect()
    assert valid.batch_id == 4
    (rejected,) = parse_events(
        lines_frame(spark, [line]), model, 5, RULES, datetime(2027, 12, 1, tzinfo=UTC)
    ).rejected.collect()
    assert (rejected.batch_id, rejected.reason) == (5, "bad_event_time:before 2026-12-01T00:00:00+00:00")


def test_valid_events_round_trip(spark, model):
    parsed = parse_events(lines_frame(spark, [json.dumps(event(label=-1, weight=...))]), model, 12, RULES, INGESTED)
    (row,) = parsed.valid.collect()
    assert [(f.name, f.dataType) for f in parsed.valid.schema] == [(f.name, f.dataType) for f in events_schema(model)]
    assert row.event_id == "e1"
    # PySpark hands timestamps over naive, in the OS time zone: read as such, it is the event's instant.
    assert row.event_time.astimezone(UTC) == datetime(2026, 11, 1, 8, 0, 3, tzinfo=UTC)
    assert row.label == 0.0  # -1 is stored as the negative class 0
    assert row.weight == 1.0  # default weight
    assert (row.member_id, row.item_id, row.batch_id) == ("m1", "i1", 12)
    assert [tuple(f) for f in row.features_global] == [("g", "0", 0.5)]
    assert [tuple(f) for f in row.features_member] == [("m", "0", -1.0)]
    assert [tuple(f) for f in row.features_item] == [("i", "", 3.0)]  # a missing term is the empty term


def test_a_missing_bag_is_an_empty_bag(spark, model):
    parsed = parse_events(lines_frame(spark, [json.dumps(event(features={"global": []}))]), model, 0, RULES, INGESTED)
    (row,) = parsed.valid.collect()
    assert row.features_global == [] and row.features_member == [] and row.features_item == []


def test_duplicates_within_a_batch_keep_the_earliest(spark, model):
    lines = [
        json.dumps(event(event_id="d", event_time="2026-11-01T08:00:05Z")),
        json.dumps(event(event_id="d", event_time="2026-11-01T08:00:01Z", label=0)),
        json.dumps(event(event_id="d", label=9)),  # invalid for its own reason, not a duplicate
    ]
    parsed = parse_events(lines_frame(spark, lines), model, 0, RULES, INGESTED)
    (kept,) = parsed.valid.collect()
    assert kept.label == 0.0
    assert sorted(row.reason for row in parsed.rejected.collect()) == ["duplicate_event_id", "label_out_of_domain"]


def test_linear_task_takes_real_labels(spark):
    model = load_config(overrides=["model.task=linear"]).model
    lines = [
        json.dumps(event(label=2.75)),
        json.dumps(event(event_id="nan", label=float("nan"))),
        json.dumps(event(event_id="huge", label=-1e200)),
    ]
    parsed = parse_events(lines_frame(spark, lines), model, 0, RULES, INGESTED)
    assert [row.label for row in parsed.valid.collect()] == [2.75]
    assert sorted(row.reason for row in parsed.rejected.collect()) == [
        "label_out_of_domain",
        "label_out_of_domain:beyond 1e+06",
    ]


def test_score_column_source_requires_a_finite_score(spark):
    model = load_config(overrides=["model.fixed_effect.source=score_column"]).model
    lines = [
        json.dumps(event(fixed_effect_score=-1.5)),
        json.dumps(event(event_id="none")),
        json.dumps(event(event_id="inf", fixed_effect_score=math.inf)),
        json.dumps(event(event_id="huge", fixed_effect_score=1e300)),
    ]
    parsed = parse_events(lines_frame(spark, lines), model, 0, RULES, INGESTED)
    assert [row.fixed_effect_score for row in parsed.valid.collect()] == [-1.5]
    reasons = sorted(row.reason for row in parsed.rejected.collect())
    assert reasons == ["bad_score", "missing_score", "missing_score"]


def test_typed_input_from_parquet_follows_the_same_rules(spark, model, tmp_path):
    feature = pa.struct([("name", pa.string()), ("term", pa.string()), ("value", pa.float64())])
    schema = pa.schema(
        [
            ("event_id", pa.string()),
            ("event_time", pa.timestamp("us", tz="UTC")),
            ("label", pa.float64()),
            ("member_id", pa.string()),
            ("item_id", pa.string()),
            ("features", pa.map_(pa.string(), pa.list_(feature))),
        ]
    )
    when = datetime(2026, 11, 1, 8, tzinfo=UTC)
    bags = [("member", [{"name": "m", "term": "0", "value": 1.0}])]
    rows = {
        "event_id": ["p1", "p2", None],
        "event_time": [when, when, when],
        "label": [1.0, 3.0, 0.0],
        "member_id": ["m1", "m2", "m3"],
        "item_id": ["i1", "i2", "i3"],
        "features": [bags, bags, bags],
    }
    pq.write_table(pa.table(rows, schema=schema), tmp_path / "events.parquet")
    parsed = parse_events(spark.read.parquet(str(tmp_path)), model, 4, RULES, INGESTED)
    (valid,) = parsed.valid.collect()
    assert (valid.event_id, valid.weight) == ("p1", 1.0)
    assert valid.event_time.astimezone(UTC) == datetime(2026, 11, 1, 8, tzinfo=UTC)
    assert [tuple(f) for f in valid.features_member] == [("m", "0", 1.0)]
    reasons = sorted(row.reason for row in parsed.rejected.collect())
    assert reasons == ["label_out_of_domain", "missing_event_id"]
    assert all(json.loads(row.payload)["item_id"] in {"i2", "i3"} for row in parsed.rejected.collect())


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/Los_Angeles"])
def test_the_earliest_valid_event_time_is_in_utc_whatever_the_drivers_time_zone(spark, model, zone, monkeypatch):
    """It bounds the duplicate check's lookback by date: a naive local time would shift that date."""
    lines = [
        json.dumps(event(event_id="late", event_time="2026-11-01T23:30:00Z")),
        json.dumps(event(event_id="early", event_time="2026-11-01T00:30:00Z")),
        json.dumps(event(event_id="bad", event_time="2026-10-01T00:00:00Z", label=7)),
    ]
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        classified = classify_events(lines_frame(spark, lines), model, RULES, INGESTED)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert classified.earliest_valid == datetime(2026, 11, 1, 0, 30, tzinfo=UTC)
