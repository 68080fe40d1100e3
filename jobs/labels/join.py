"""One micro-batch of the label join: the state before it and its arrivals in, its results out (docs/label_join.md).

A pure function of its inputs (no clock but the wall-clock columns, ties broken by content), so a
micro-batch replayed after a crash computes exactly what its first attempt did.

Times are compared in microseconds. With W the attribution window, L the allowed lateness and B the
orphan lookback:

- each stream has its own watermark, its latest accepted event time less L, never moving back; a time
  beyond the ingestion clock's bounds (``events.max_future_minutes``, ``events.max_age_days``) is quarantined
  and moves nothing, so one record dated 2099 cannot close every window;
- an impression arriving behind the impressions' watermark is late; one repeating a known id a duplicate;
- a click labels its pending impression when ``impression_time <= click_time <= impression_time + W``;
  the first such click (by time, then the order of ``label_join.feedback``) wins, once;
- an impression still pending when the clicks' watermark passes ``impression_time + W`` is a negative
  (kept with probability r, by a hash of its id, and then weighted 1/r);
- a click whose impression is unknown waits until the impressions' watermark passes its time, then
  is an orphan; a labelled impression is remembered until the clicks' watermark passes its time + B.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from jobs.labels.schemas import (
    ALREADY_LABELLED,
    BAD_CLICK_TIME,
    BAD_IMPRESSION_TIME,
    CLICK,
    CLICK_AFTER_WINDOW,
    CLICK_BEFORE_IMPRESSION,
    DUPLICATE_CLICK,
    DUPLICATE_IMPRESSION,
    IMPRESSION,
    LATE_CLICK,
    LATE_IMPRESSION,
    MALFORMED_CLICK,
    MALFORMED_IMPRESSION,
    ORPHAN_CLICK,
    REASONS,
    UNKNOWN_FEEDBACK,
    WATERMARKS,
    labelled_schema,
    payload_fields,
    pending_schema,
)
from jobs.runtime.settings import Config, LabelJoinConfig
from jobs.storage.schemas import QUARANTINE

MICROS_PER_MINUTE = 60_000_000
SAMPLING_SALT = "lambda-learner-negative-sampling"
SAMPLING_RESOLUTION = 1 << 30
# What every row of an impression id learns of its impression.
IMPRESSION_FACTS = (("time", "_impression_time"), ("label", "_impression_label"), ("kind", "_labelled_by"))


@dataclass(frozen=True)
class Joined:
    """A micro-batch's results: labelled events and quarantine rows to append, the state that replaces the old
    one (each a projection of one materialised frame, independent of the tables), and the batch's figures."""

    labelled: DataFrame
    quarantined: DataFrame
    state: DataFrame
    values: dict[str, float]


@dataclass(frozen=True)
class Watermarks:
    """Both streams' watermarks in microseconds since the epoch; None before the stream's first event."""

    impressions: int | None
    clicks: int | None

    def advanced(self, latest_impression: int | None, latest_click: int | None, lateness: int) -> Watermarks:
        def moved(mark: int | None, latest: int | None) -> int | None:
            if latest is None:
                return mark
            return latest - lateness if mark is None else max(mark, latest - lateness)

        return Watermarks(moved(self.impressions, latest_impression), moved(self.clicks, latest_click))


def sample_fraction(impression_id: Column) -> Column:
    """A number in [0, 1) that depends on the impression id alone: the negative sampler's draw."""
    hashed = F.xxhash64(F.lit(SAMPLING_SALT), impression_id)
    return F.pmod(hashed, F.lit(SAMPLING_RESOLUTION)) / F.lit(float(SAMPLING_RESOLUTION))


def keeps_negative(impression_id: Column, rate: float) -> Column:
    """Whether a negative of this impression is kept at sampling rate ``rate`` (as the join decides)."""
    return F.lit(True) if rate >= 1.0 else sample_fraction(impression_id) < F.lit(rate)


def join_batch(arrivals: DataFrame, state: DataFrame, config: Config, batch_id: int, ingested: datetime) -> Joined:
    """The micro-batch ``batch_id``: its arrivals (materialised) against the state before it.

    ``ingested`` is when the batch was first ingested (the same for its replay): arrival times are bounded by it.

    Everything about one impression id (its impression, known or arriving, and its clicks, waiting or
    arriving) meets in one partition, where window functions decide every row's fate in one pass.
    Expressions are SQL text: a plan built a column at a time costs a round trip to the JVM per call.
    """
    join, model = config.label_join, config.model
    window = round(join.attribution_window_minutes * MICROS_PER_MINUTE)
    lateness = round(join.allowed_lateness_minutes * MICROS_PER_MINUTE)
    lookback = round(join.orphan_lookback_minutes * MICROS_PER_MINUTE)
    arrivals = arrivals.selectExpr("*", f"{_unacceptable(config, ingested)} AS _unacceptable")
    # The watermarks before the batch and the batch's latest accepted times, in one job.
    latest = arrivals.selectExpr(
        f"max(CASE WHEN stream = '{IMPRESSION}' AND _unacceptable IS NULL THEN unix_micros(time) END) AS impression",
        f"max(CASE WHEN stream = '{CLICK}' AND _unacceptable IS NULL THEN unix_micros(time) END) AS click",
    )
    recorded = state.where(f"record = '{WATERMARKS}'").selectExpr(
        "unix_micros(impressions_watermark) AS impressions_mark", "unix_micros(clicks_watermark) AS clicks_mark"
    )
    times = latest.join(recorded, F.lit(True), "left").first()
    before = Watermarks(times.impressions_mark, times.clicks_mark)
    after = before.advanced(times.impression, times.click, lateness)

    # One shuffle by impression id serves every window (each partitions by the id alone).
    rows = _rows(arrivals, state, config, batch_id, before).repartition("impression_id")
    classified = _classify(rows, join, after, window, lookback, batch_id).localCheckpoint(eager=True)

    payloads = {field.name: _name(field.name) for field in payload_fields(model)}
    labelled = classified.where("_emitted").selectExpr(
        *_typed(
            labelled_schema(model),
            event_id="impression_id",
            event_time="time",
            label="_label",
            weight="_weight",
            feedback="_feedback",
            feedback_time="_feedback_time",
            label_batch_id=str(batch_id),
            labelled_at="current_timestamp()",
            **payloads,
        )
    )
    quarantined = classified.where("reason IS NOT NULL").selectExpr(
        *_typed(
            QUARANTINE, batch_id=str(batch_id), payload="payload", reason="reason", quarantined_at="current_timestamp()"
        )
    )
    kept = classified.where("_kept").selectExpr(
        *_typed(
            pending_schema(model),
            record="record",
            impression_id="impression_id",
            time="time",
            kind="_kind",
            label="_label",
            arrived_batch_id="arrived_batch_id",
            labelled_batch_id="_labelled_batch_id",
            payload=f"CASE WHEN record = '{CLICK}' THEN payload END",
            # A labelled impression keeps what a late or duplicate click is judged by, not its features.
            **{field: f"CASE WHEN _label IS NULL THEN {column} END" for field, column in payloads.items()},
        )
    )
    marks = arrivals.sparkSession.range(1).selectExpr(
        *_typed(
            pending_schema(model),
            record=f"'{WATERMARKS}'",
            impressions_watermark=_timestamp(after.impressions),
            clicks_watermark=_timestamp(after.clicks),
        )
    )
    values = _figures(classified, after, join.negative_sampling_rate)
    return Joined(labelled, quarantined, kept.unionByName(marks), values)


def _rows(arrivals: DataFrame, state: DataFrame, config: Config, batch_id: int, before: Watermarks) -> DataFrame:
    """The state's impressions and waiting clicks and the batch's arrivals as rows of one shape.

    ``origin`` is ``state`` or ``batch``; ``reason0`` is why an arriving row cannot take part at all
    (malformed, late, of an unknown kind), null for the others.
    """
    payloads = [_name(field.name) for field in payload_fields(config.model)]
    known = state.where(f"record <> '{WATERMARKS}'").selectExpr(
        "'state' AS origin",
        "record",
        "impression_id",
        "time",
        "kind",
        "label",
        "arrived_batch_id",
        "labelled_batch_id",
        "payload",
        *payloads,
        "CAST(NULL AS STRING) AS reason0",
    )
    reason0 = (
        "CASE WHEN _unacceptable IS NOT NULL THEN _unacceptable "
        f"WHEN stream = '{IMPRESSION}' AND {_passed('unix_micros(time)', before.impressions)} THEN '{LATE_IMPRESSION}' "
        "END"
    )
    arriving = arrivals.selectExpr(
        "'batch' AS origin",
        "stream AS record",
        "impression_id",
        "time",
        "kind",
        "CAST(NULL AS DOUBLE) AS label",
        f"CAST({batch_id} AS BIGINT) AS arrived_batch_id",
        "CAST(NULL AS BIGINT) AS labelled_batch_id",
        "payload",
        *payloads,
        f"{reason0} AS reason0",
    )
    return known.unionByName(arriving)


def _unacceptable(config: Config, ingested: datetime) -> str:
    """SQL: why an arrival cannot take part at all (malformed, a time out of bounds, an unknown kind), else null."""
    events = config.events
    latest = ingested + timedelta(minutes=events.max_future_minutes)
    earliest = ingested - timedelta(days=events.max_age_days)
    unusable = "(malformed OR impression_id IS NULL OR trim(impression_id) = '' OR time IS NULL)"
    kinds = ", ".join(_text(kind.name) for kind in config.label_join.feedback)
    cases = []
    for stream, malformed, bad_time in (
        (IMPRESSION, MALFORMED_IMPRESSION, BAD_IMPRESSION_TIME),
        (CLICK, MALFORMED_CLICK, BAD_CLICK_TIME),
    ):
        cases += [
            f"WHEN stream = '{stream}' AND {unusable} THEN '{malformed}'",
            f"WHEN stream = '{stream}' AND unix_micros(time) > {_micros(latest)}L "
            f"THEN '{bad_time}:after {latest.isoformat()}'",
            f"WHEN stream = '{stream}' AND unix_micros(time) < {_micros(earliest)}L "
            f"THEN '{bad_time}:before {earliest.isoformat()}'",
        ]
    return f"CASE {' '.join(cases)} WHEN stream = '{CLICK}' AND NOT kind IN ({kinds}) THEN '{UNKNOWN_FEEDBACK}' END"


def _micros(moment: datetime) -> int:
    return round(moment.timestamp() * 1_000_000)


def _classify(
    rows: DataFrame, join: LabelJoinConfig, after: Watermarks, window: int, lookback: int, batch_id: int
) -> DataFrame:
    """Every row with its fate: ``reason`` (quarantined), ``_emitted`` (a labelled event), ``_kept`` (in the state).

    Two orders of the rows of each impression id; the first row of each holds the answer: the id's
    impression (the known one, else the first to arrive; any other is a duplicate), and the click that
    labels it (the first eligible one; the others repeat it or come after it).
    """
    live = "reason0 IS NULL"
    is_impression = f"({live} AND record = '{IMPRESSION}')"
    is_click = f"({live} AND record = '{CLICK}')"
    content = "xxhash64(payload), payload"
    frame = "ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW"
    impressions = (
        f"OVER (PARTITION BY impression_id ORDER BY NOT {is_impression}, origin <> 'state', time, {content} {frame})"
    )
    rows = rows.selectExpr(
        "*",
        f"row_number() {impressions} = 1 AS _first",
        *[
            f"first(CASE WHEN {is_impression} THEN {column} END) {impressions} AS {alias}"
            for column, alias in IMPRESSION_FACTS
        ],
    )
    found = "_impression_time IS NOT NULL"
    labelled = "_impression_label IS NOT NULL"
    by_feedback = f"({labelled} AND _labelled_by IS NOT NULL)"
    click_reason = (
        f"CASE WHEN {is_click} AND {found} THEN CASE "
        f"WHEN time < _impression_time THEN '{CLICK_BEFORE_IMPRESSION}' "
        f"WHEN unix_micros(time) > unix_micros(_impression_time) + {window}L THEN '{CLICK_AFTER_WINDOW}' "
        f"WHEN {by_feedback} AND kind = _labelled_by THEN '{DUPLICATE_CLICK}' "
        f"WHEN {by_feedback} THEN '{ALREADY_LABELLED}' "
        f"WHEN {labelled} THEN '{LATE_CLICK}' END END"
    )
    rows = rows.selectExpr("*", f"{click_reason} AS _click_reason").selectExpr(
        "*", f"{is_click} AND {found} AND _click_reason IS NULL AS _eligible"
    )
    clicks = (
        f"OVER (PARTITION BY impression_id ORDER BY NOT _eligible, time, {_priority(join)}, arrived_batch_id, "
        f"{content} {frame})"
    )
    rows = rows.selectExpr(
        "*",
        f"row_number() {clicks} AS _click_rank",
        f"first(CASE WHEN _eligible THEN kind END) {clicks} AS _feedback",
        f"first(CASE WHEN _eligible THEN time END) {clicks} AS _feedback_time",
    )

    rate = join.negative_sampling_rate
    the_impression = f"({is_impression} AND _first)"
    pending = f"({the_impression} AND label IS NULL)"
    positive = f"({pending} AND _feedback IS NOT NULL)"
    closed = f"({pending} AND _feedback IS NULL AND {_passed(f'unix_micros(time) + {window}L', after.clicks)})"
    new_label = (
        f"CASE WHEN {positive} THEN {_by_kind(join, 'label', '_feedback')} WHEN {closed} THEN 0.0D ELSE label END"
    )
    # A click without its impression waits until the impressions' watermark passes it, then is an orphan.
    unmatched = f"({is_click} AND NOT {found})"
    orphan = f"({unmatched} AND {_passed('unix_micros(time)', after.impressions)})"
    reason = (
        f"CASE WHEN NOT {live} THEN reason0 "
        f"WHEN {is_impression} AND NOT _first THEN '{DUPLICATE_IMPRESSION}' "
        "WHEN _click_reason IS NOT NULL THEN _click_reason "
        f"WHEN _eligible AND _click_rank > 1 AND kind = _feedback THEN '{DUPLICATE_CLICK}' "
        f"WHEN _eligible AND _click_rank > 1 THEN '{ALREADY_LABELLED}' "
        f"WHEN {orphan} THEN '{ORPHAN_CLICK}' END"
    )
    forgotten = f"(({new_label}) IS NOT NULL AND {_passed(f'unix_micros(time) + {lookback}L', after.clicks)})"
    return rows.selectExpr(
        "*",
        f"{positive} AS _positive",
        f"{closed} AS _closed",
        f"{new_label} AS _label",
        f"CASE WHEN {positive} THEN _feedback ELSE kind END AS _kind",
        f"CASE WHEN {positive} OR {closed} THEN CAST({batch_id} AS BIGINT) ELSE labelled_batch_id END "
        "AS _labelled_batch_id",
        f"{positive} OR ({closed} AND {_keeps('impression_id', rate)}) AS _emitted",
        f"CASE WHEN {positive} THEN {_by_kind(join, 'weight', '_feedback')} ELSE {_double(1.0 / rate)} END AS _weight",
        f"{reason} AS reason",
        f"({the_impression} AND NOT {forgotten}) OR ({unmatched} AND NOT {orphan}) AS _kept",
    )


def _figures(classified: DataFrame, after: Watermarks, rate: float) -> dict[str, float]:
    """The batch's counts (docs/label_join.md, "Metrics")."""
    kept_impression = f"_kept AND record = '{IMPRESSION}'"
    figures = {
        "impressions_in": f"origin = 'batch' AND record = '{IMPRESSION}'",
        "clicks_in": f"origin = 'batch' AND record = '{CLICK}'",
        "labelled": "_emitted",
        "positives": "_positive AND _label > 0",
        "feedback_negatives": "_positive AND _label <= 0",
        "negatives": "_closed AND _emitted",
        "negatives_sampled_out": "_closed AND NOT _emitted",
        "quarantined": "reason IS NOT NULL",
        **{f"quarantined.{reason}": f"(reason = '{reason}' OR reason LIKE '{reason}:%')" for reason in REASONS},
        "pending_impressions": f"{kept_impression} AND _label IS NULL",
        "remembered_impressions": f"{kept_impression} AND _label IS NOT NULL",
        "waiting_clicks": f"_kept AND record = '{CLICK}'",
    }
    row = classified.selectExpr(
        *[f"count(CASE WHEN {test} THEN 1 END) AS `{name}`" for name, test in figures.items()]
    ).first()
    values = {name: float(row[name]) for name in figures}
    values["negative_sampling_rate"] = rate
    for name, mark in (("impressions", after.impressions), ("clicks", after.clicks)):
        if mark is not None:
            values[f"watermark.{name}"] = mark / 1e6
    return values


def _typed(schema: StructType, **given: str) -> list[str]:
    """SQL for ``schema``'s columns in order: the expressions ``given``, null for the others, cast to the type."""
    return [
        f"CAST({given.get(field.name, 'NULL')} AS {field.dataType.simpleString()}) AS {_name(field.name)}"
        for field in schema.fields
    ]


def _priority(join: LabelJoinConfig) -> str:
    """A kind's position in ``label_join.feedback``: the earlier wins a tie in time."""
    return _by_kind_value("kind", {kind.name: float(index) for index, kind in enumerate(join.feedback)})


def _by_kind(join: LabelJoinConfig, attribute: str, kind: str) -> str:
    return _by_kind_value(kind, {k.name: float(getattr(k, attribute)) for k in join.feedback})


def _by_kind_value(kind: str, values: dict[str, float]) -> str:
    entries = ", ".join(f"{_text(name)}, {_double(value)}" for name, value in values.items())
    return f"element_at(map({entries}), {kind})"


def _keeps(impression_id: str, rate: float) -> str:
    if rate >= 1.0:
        return "true"
    hashed = f"pmod(xxhash64({_text(SAMPLING_SALT)}, {impression_id}), {SAMPLING_RESOLUTION}L)"
    return f"({hashed} / {float(SAMPLING_RESOLUTION)!r}D < {_double(rate)})"


def _timestamp(micros: int | None) -> str:
    return "NULL" if micros is None else f"timestamp_micros({micros}L)"


def _passed(micros: str, mark: int | None) -> str:
    """Whether the watermark ``mark`` has passed ``micros`` (nothing is behind it before the first event)."""
    return "false" if mark is None else f"({micros} < {mark}L)"


def _double(value: float) -> str:
    return f"CAST('{value!r}' AS DOUBLE)"


def _text(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _name(name: str) -> str:
    """A quoted SQL identifier."""
    return "`" + name.replace("`", "``") + "`"
