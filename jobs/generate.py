"""A synthetic stream of training events with a known ground truth: ``python -m jobs.generate``.

The events follow a GAME model (DESIGN.md section 1) whose coefficients are drawn here and written
beside the stream, so that what the jobs learn can be checked against what generated the data::

    margin = intercept + beta . x_global + sum over random-effect types r of theta_{r, entity_r}(t) . x_r
    logistic: label ~ Bernoulli(sigmoid(margin)), written as 0/1;   linear: label = margin + N(0, noise_sd^2)

**Features.** Every bag holds dense N(0, 1) values rounded to 6 decimals. A feature is named by the
first letter of its bag and its term is its position: bag ``global`` holds ``{"name": "g", "term": "0"}``,
``{"name": "g", "term": "1"}``, ..., bag ``member`` holds ``{"name": "m", "term": "0"}``, ... Types that
share a bag read its first ``features`` entries. Coefficients use the same name-terms; an entity's
intercept is lambda_learner's ``("intercept", "intercept")``.

**Truth.** beta ~ N(0, fixed_scale^2); the intercept is solved so that the expected mean label of the
stream's events is ``base_rate`` (the mean of sigmoid(margin) for logistic, of the margin for linear).
An entity's coefficients start N(0, entity_scale^2) and walk: each later slice adds N(0, drift^2) to each.

**Entities.** Ids are ``<entity_column without "_id">-<zero-padded number>``, e.g. ``member-000017``.
The first slice introduces the initial pool of ``entities`` ids, each once (a pool larger than the
slice is cut to its event count), the slice's other events going by popularity. In every later
slice each event, independently per type, belongs with probability ``new_entity_rate`` to a new
entity (a fresh id beyond the pool with its own truth, one per such event) and otherwise to an entity
seen in an earlier slice, drawn by a Pareto popularity every entity has: a few entities recur a lot,
and every one stays reachable. Events are ``e<zero-padded index>``, all of weight 1.0.

**Bad events.** Every line but the first of each file (kept valid, so that a duplicate always repeats
an earlier valid event of its own file) is broken with probability ``bad_event_rate``, in exactly one
way, dealt round robin over a shuffled order of the kinds of docs/events.md "Rejections":
malformed_payload (the line cut in half), missing_event_id, duplicate_event_id, bad_event_time
(missing, or "not-a-time"), missing_label, label_out_of_domain (7 for logistic, NaN for linear),
bad_weight (negative), missing_entity_id (one type's id), bad_feature (a NaN value or a feature without
a name). Parquet holds neither a malformed line nor a time that is not a timestamp: there the kind
malformed_payload is skipped and a bad event time is always missing (null).

**Output.** Every file appears at once: it is written under a dot-name in its folder, then renamed
(file sources skip dot-files)::

    out_dir/landing/part-00000.json, ...   one file of JSON lines (or parquet) per slice, names in time order
    out_dir/truth/fixed_effect.json        task, feature bag, intercept, coefficients as name/term/value
    out_dir/truth/entities.parquet         re_type, entity_id, slice, name, term, value: every entity's
                                           coefficients at every slice from its first event to the last slice
    out_dir/truth/bad_events.jsonl         file, line (0-based), kind, reason (as quarantined), event_id (or null)
    out_dir/truth/stream.json              the spec, the kinds dealt, entities per type, and per slice its
                                           file, time window, events, bad events, new-entity events per type

Event times rise strictly (microseconds, ISO-8601 with a Z) within and across files. The same spec and
seed give byte-identical files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lambda_learner.representation import INTERCEPT

KINDS = (
    "malformed_payload",
    "missing_event_id",
    "duplicate_event_id",
    "bad_event_time",
    "missing_label",
    "label_out_of_domain",
    "bad_weight",
    "missing_entity_id",
    "bad_feature",
)
TASKS = ("logistic", "linear")
FORMATS = ("json", "parquet")
WEIGHT = 1.0
DECIMALS = 6
# Pareto shape of entity popularity: a heavy tail (a few entities get many events) with a finite mean.
POPULARITY_TAIL = 1.5
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
EVENT_FIELDS = ("event_id", "event_time", "label", "weight", "features")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROS_PER_MINUTE = 60_000_000
DEFAULT_RANDOM_EFFECTS = (("per_member", "member_id", "member", 2000), ("per_item", "item_id", "item", 500))
DEFAULT_ENTITIES = 1000
FEATURE = pa.struct([("name", pa.string()), ("term", pa.string()), ("value", pa.float64())])
ENTITIES_SCHEMA = pa.schema(
    [
        ("re_type", pa.string()),
        ("entity_id", pa.string()),
        ("slice", pa.int32()),
        ("name", pa.string()),
        ("term", pa.string()),
        ("value", pa.float64()),
    ]
)


@dataclass(frozen=True)
class RandomEffectSpec:
    """One random-effect type: ``entities`` initial entities, each with an intercept and ``features`` coefficients."""

    name: str
    entity_column: str
    feature_bag: str
    entities: int
    features: int

    def __post_init__(self) -> None:
        for field_name in ("name", "entity_column", "feature_bag"):
            _require_name(f"random effect {field_name}", getattr(self, field_name))
        if self.entity_column in EVENT_FIELDS:
            raise ValueError(f"random effect entity_column must not be an event field; got {self.entity_column!r}")
        _require(f"random effect {self.name} entities", self.entities, 1)
        _require(f"random effect {self.name} features", self.features, 0)


@dataclass(frozen=True)
class StreamSpec:
    """What to generate; every count, rate and scale is checked on construction."""

    random_effects: tuple[RandomEffectSpec, ...]
    events: int
    slices: int
    global_features: int = 10
    global_bag: str = "global"
    task: str = "logistic"
    base_rate: float = 0.1
    fixed_scale: float = 0.5
    entity_scale: float = 0.7
    drift: float = 0.1
    new_entity_rate: float = 0.05
    bad_event_rate: float = 0.0
    noise_sd: float = 0.5
    slice_minutes: float = 60.0
    start: str = "2026-11-01T00:00:00Z"
    format: str = "json"
    seed: int = 7

    def __post_init__(self) -> None:
        object.__setattr__(self, "random_effects", tuple(self.random_effects))
        for index, random_effect in enumerate(self.random_effects):
            if not isinstance(random_effect, RandomEffectSpec):
                raise ValueError(f"random_effects[{index}] must be a RandomEffectSpec; got {random_effect!r}")
        for attribute in ("name", "entity_column"):
            values = [getattr(random_effect, attribute) for random_effect in self.random_effects]
            if len(set(values)) < len(values):
                raise ValueError(f"random_effects {attribute} must be unique; got {values}")
        _require_name("global_bag", self.global_bag)
        _require("slices", self.slices, 1)
        _require("events", self.events, self.slices)
        _require("global_features", self.global_features, 0)
        _require("seed", self.seed, 0)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        for rate in ("new_entity_rate", "bad_event_rate"):
            if not 0.0 <= getattr(self, rate) <= 1.0:
                raise ValueError(f"{rate} must be in [0, 1]; got {getattr(self, rate)!r}")
        if self.task == "logistic" and not 0.0 < self.base_rate < 1.0:
            raise ValueError(f"base_rate must be in (0, 1) for logistic; got {self.base_rate!r}")
        if not math.isfinite(self.base_rate):
            raise ValueError(f"base_rate must be finite; got {self.base_rate!r}")
        for scale in ("fixed_scale", "entity_scale", "drift", "noise_sd"):
            if not 0.0 <= getattr(self, scale) < math.inf:
                raise ValueError(f"{scale} must be finite and >= 0; got {getattr(self, scale)!r}")
        try:
            _epoch_micros(self.start)
        except (TypeError, ValueError):
            raise ValueError(f"start must be an ISO-8601 time; got {self.start!r}") from None
        # Two microseconds per event at least, so that event times rise strictly.
        if not self.slice_minutes * MICROS_PER_MINUTE >= 2 * math.ceil(self.events / self.slices):
            raise ValueError(
                f"slice_minutes must leave at least 2 microseconds per event; got {self.slice_minutes!r} "
                f"for {math.ceil(self.events / self.slices)} events per slice"
            )

    @property
    def bags(self) -> dict[str, int]:
        """Every feature bag and its width, the fixed effect's first."""
        widths = {self.global_bag: self.global_features}
        for random_effect in self.random_effects:
            widths[random_effect.feature_bag] = max(widths.get(random_effect.feature_bag, 0), random_effect.features)
        return widths

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of bad event this spec can produce."""
        impossible = set()
        if self.format == "parquet":
            impossible.add("malformed_payload")
        if not self.random_effects:
            impossible.add("missing_entity_id")
        if not any(self.bags.values()):
            impossible.add("bad_feature")
        return tuple(kind for kind in KINDS if kind not in impossible)


@dataclass(frozen=True)
class GroundTruth:
    """Where a generated stream and its truth are, with its counts."""

    landing: Path
    truth: Path
    files: tuple[Path, ...]
    events: int
    bad_events: int
    new_entity_events: dict[str, int]
    entities: dict[str, int]

    def summary(self) -> dict[str, Any]:
        return {
            "landing": str(self.landing),
            "truth": str(self.truth),
            "files": len(self.files),
            "events": self.events,
            "bad_events": self.bad_events,
            "new_entity_events": self.new_entity_events,
            "entities": self.entities,
        }


def _require(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be a whole number >= {least}; got {value!r}")


def _require_name(name: str, value: Any) -> None:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ValueError(f"{name} must be a letter then letters, digits or _; got {value!r}")


def _strings(options: Sequence[str], indices: np.ndarray) -> pa.Array:
    """options[indices] as an arrow string array, without a Python object per row."""
    return pc.take(pa.array(options, type=pa.string()), indices)


def _epoch_micros(text: str) -> int:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // timedelta(microseconds=1)


def _iso(micros: np.ndarray) -> list[str]:
    return [text + "Z" for text in np.datetime_as_string(micros.astype("datetime64[us]"), unit="us").tolist()]


def _sigmoid(margin: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * margin))


class _Population:
    """One random-effect type's entities: which ones each slice's events belong to, and their true coefficients."""

    def __init__(self, spec: RandomEffectSpec, stream: StreamSpec, sizes: np.ndarray, seed: np.random.SeedSequence):
        self.spec = spec
        self.drift = stream.drift
        self.rng = np.random.default_rng(seed)
        # Slice 0 introduces the initial pool; from slice 1 on, an event's entity is new with this probability.
        self.is_new = [np.zeros(sizes[0], dtype=bool)]
        self.is_new += [self.rng.random(n) < stream.new_entity_rate for n in sizes[1:]]
        total = spec.entities + sum(int(flags.sum()) for flags in self.is_new)
        self.popularity = self.rng.pareto(POPULARITY_TAIL, total) + 1.0
        self.theta = self.rng.normal(0.0, stream.entity_scale, (total, spec.features + 1))
        self.seen = np.empty(0, dtype=np.int64)
        self.next_fresh = spec.entities
        width = max(6, len(str(spec.entities + stream.events)))
        prefix = spec.entity_column.removesuffix("_id")
        self.ids = pa.array([f"{prefix}-{number:0{width}d}" for number in range(total)])
        self.snapshots: list[tuple[np.ndarray, np.ndarray]] = []

    def step(self, slice_index: int) -> np.ndarray:
        """The entity of each event of the slice; moves every entity seen before it one step of its walk."""
        new = self.is_new[slice_index]
        if slice_index == 0:
            pool = np.arange(self.spec.entities)
            once = self.rng.permutation(pool)[: len(new)]
            chosen = self.rng.permutation(np.concatenate([once, self._popular(pool, len(new) - len(once))]))
        else:
            if self.drift > 0:
                self.theta[self.seen] += self.rng.normal(0.0, self.drift, (len(self.seen), self.theta.shape[1]))
            fresh = int(new.sum())
            chosen = np.empty(len(new), dtype=np.int64)
            chosen[new] = np.arange(self.next_fresh, self.next_fresh + fresh)
            chosen[~new] = self._popular(self.seen, len(new) - fresh)
            self.next_fresh += fresh
        self.seen = np.union1d(self.seen, chosen)
        self.snapshots.append((self.seen, self.theta[self.seen]))
        return chosen

    def score(self, chosen: np.ndarray, features: np.ndarray) -> np.ndarray:
        """theta . x (intercept included) of each event, with the coefficients as they are now."""
        theta = self.theta[chosen]
        return theta[:, 0] + np.einsum("ij,ij->i", theta[:, 1:], features[:, : self.spec.features])

    def _popular(self, candidates: np.ndarray, count: int) -> np.ndarray:
        """``count`` draws from ``candidates``, each with probability proportional to its popularity."""
        cumulative = np.cumsum(self.popularity[candidates])
        picks = np.searchsorted(cumulative, self.rng.random(count) * cumulative[-1], side="right")
        return candidates[np.minimum(picks, len(candidates) - 1)]


@dataclass
class _Stream:
    """Every clean event, column by column, and the truth behind them."""

    spec: StreamSpec
    bounds: np.ndarray  # slice s holds events bounds[s]:bounds[s + 1]
    times: np.ndarray  # microseconds since the epoch
    entities: list[np.ndarray]  # per random-effect type, each event's entity number
    features: dict[str, np.ndarray]  # per bag, (events, width)
    populations: list[_Population]
    beta: np.ndarray
    intercept: float
    labels: np.ndarray

    def event_ids(self, start: int, stop: int) -> list[str]:
        width = max(8, len(str(self.spec.events - 1)))
        return [f"e{index:0{width}d}" for index in range(start, stop)]

    def entity_ids(self, type_index: int, start: int, stop: int) -> pa.Array:
        return pc.take(self.populations[type_index].ids, self.entities[type_index][start:stop])

    def event(self, index: int) -> dict[str, Any]:
        """One clean event as its JSON object."""
        event = {
            "event_id": self.event_ids(index, index + 1)[0],
            "event_time": _iso(self.times[index : index + 1])[0],
            "label": self.labels[index].item(),
            "weight": WEIGHT,
        }
        for population, chosen in zip(self.populations, self.entities, strict=True):
            event[population.spec.entity_column] = population.ids[chosen[index]].as_py()
        event["features"] = {
            bag: [{"name": bag[0], "term": str(j), "value": value} for j, value in enumerate(values[index].tolist())]
            for bag, values in self.features.items()
        }
        return event


def _simulate(spec: StreamSpec, seeds: Sequence[np.random.SeedSequence]) -> _Stream:
    """The clean stream: entities, features, times, truth and labels (one seed each, a seed per type)."""
    truth_seed, features_seed, labels_seed, *population_seeds = seeds
    sizes = np.full(spec.slices, spec.events // spec.slices)
    sizes[: spec.events % spec.slices] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])

    features_rng = np.random.default_rng(features_seed)
    features = {
        bag: np.round(features_rng.standard_normal((spec.events, width)), DECIMALS) for bag, width in spec.bags.items()
    }
    # Evenly spread with jitter; at >= 2 microseconds per event, the floors rise strictly.
    slice_micros = round(spec.slice_minutes * MICROS_PER_MINUTE)
    slice_of_event = np.repeat(np.arange(spec.slices), sizes)
    position = np.arange(spec.events) - bounds[slice_of_event] + 0.5 * features_rng.random(spec.events)
    times = (
        _epoch_micros(spec.start)
        + slice_of_event * slice_micros
        + np.floor(position * slice_micros / sizes[slice_of_event]).astype(np.int64)
    )

    beta = np.random.default_rng(truth_seed).normal(0.0, spec.fixed_scale, spec.global_features)
    margin = features[spec.global_bag][:, : spec.global_features] @ beta
    populations = [
        _Population(random_effect, spec, sizes, seed)
        for random_effect, seed in zip(spec.random_effects, population_seeds, strict=True)
    ]
    entities = [np.empty(spec.events, dtype=np.int64) for _ in populations]
    for slice_index in range(spec.slices):
        rows = slice(bounds[slice_index], bounds[slice_index + 1])
        for population, chosen in zip(populations, entities, strict=True):
            chosen[rows] = population.step(slice_index)
            margin[rows] += population.score(chosen[rows], features[population.spec.feature_bag][rows])

    labels_rng = np.random.default_rng(labels_seed)
    if spec.task == "logistic":
        intercept = _logistic_intercept(margin, spec.base_rate)
        labels = (labels_rng.random(spec.events) < _sigmoid(margin + intercept)).astype(np.int64)
    else:
        intercept = spec.base_rate - float(margin.mean())
        labels = margin + intercept + labels_rng.normal(0.0, spec.noise_sd, spec.events)
    return _Stream(spec, bounds, times, entities, features, populations, beta, intercept, labels)


def _logistic_intercept(margin: np.ndarray, base_rate: float) -> float:
    """The b with mean(sigmoid(b + margin)) = base_rate, by bisection (the mean rises with b)."""
    center = math.log(base_rate / (1.0 - base_rate))
    spread = float(np.abs(margin).max()) + 1.0
    low, high = center - spread, center + spread
    while high - low > 1e-10:
        middle = 0.5 * (low + high)
        if _sigmoid(middle + margin).mean() < base_rate:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


@dataclass(frozen=True)
class _BadEvent:
    """How one event is broken."""

    index: int
    kind: str
    event_id: str | None
    variant: bool  # bad_event_time: "not-a-time" (else missing); bad_feature: NaN value (else no name)
    entity_column: str
    bag: str
    feature: int

    @property
    def reason(self) -> str:
        return f"{self.kind}:{self.entity_column}" if self.kind == "missing_entity_id" else self.kind


def _bad_events(stream: _Stream, seed: np.random.SeedSequence) -> list[list[_BadEvent]]:
    """The bad events of each slice, in line order."""
    spec = stream.spec
    rng = np.random.default_rng(seed)
    candidates = np.ones(spec.events, dtype=bool)
    candidates[stream.bounds[:-1]] = False
    broken = np.flatnonzero(candidates & (rng.random(spec.events) < spec.bad_event_rate))
    kinds = spec.kinds
    kind_of = np.empty(len(broken), dtype=np.int64)
    kind_of[rng.permutation(len(broken))] = np.arange(len(broken)) % len(kinds)

    # A duplicate repeats a valid event drawn from the earlier lines of its file.
    valid = np.flatnonzero(~np.isin(np.arange(spec.events), broken))
    file_start = stream.bounds[np.searchsorted(stream.bounds, broken, side="right") - 1]
    low, high = np.searchsorted(valid, file_start), np.searchsorted(valid, broken)
    original = valid[low + np.floor(rng.random(len(broken)) * (high - low)).astype(np.int64)]

    variants = rng.random(len(broken)) < 0.5
    columns = [random_effect.entity_column for random_effect in spec.random_effects] or [""]
    column_of = rng.integers(len(columns), size=len(broken))
    non_empty = [bag for bag, width in spec.bags.items() if width] or [""]
    bag_of = rng.integers(len(non_empty), size=len(broken))
    feature_draw = rng.random(len(broken))

    bad = []
    for position, index in enumerate(broken.tolist()):
        kind = kinds[kind_of[position]]
        bag = non_empty[bag_of[position]]
        event_id = None if kind == "missing_event_id" else stream.event_ids(index, index + 1)[0]
        if kind == "duplicate_event_id":
            event_id = stream.event_ids(original[position], original[position] + 1)[0]
        bad.append(
            _BadEvent(
                index=index,
                kind=kind,
                event_id=event_id,
                variant=bool(variants[position]) and not (kind == "bad_event_time" and spec.format == "parquet"),
                entity_column=columns[column_of[position]],
                bag=bag,
                feature=int(feature_draw[position] * spec.bags.get(bag, 0)),
            )
        )
    cuts = np.searchsorted(broken, stream.bounds).tolist()
    return [bad[low:high] for low, high in itertools.pairwise(cuts)]


def _broken(event: dict[str, Any], bad: _BadEvent, task: str) -> dict[str, Any] | str:
    """The event broken as ``bad`` says: a changed object, or for malformed_payload the cut text."""
    match bad.kind:
        case "malformed_payload":
            text = json.dumps(event)
            return text[: len(text) // 2]
        case "missing_event_id":
            del event["event_id"]
        case "duplicate_event_id":
            event["event_id"] = bad.event_id
        case "bad_event_time" if bad.variant:
            event["event_time"] = "not-a-time"
        case "bad_event_time":
            del event["event_time"]
        case "missing_label":
            del event["label"]
        case "label_out_of_domain":
            event["label"] = 7 if task == "logistic" else math.nan
        case "bad_weight":
            event["weight"] = -WEIGHT
        case "missing_entity_id":
            del event[bad.entity_column]
        case "bad_feature" if bad.variant:
            event["features"][bad.bag][bad.feature]["value"] = math.nan
        case "bad_feature":
            del event["features"][bad.bag][bad.feature]["name"]
    return event


def _line_template(spec: StreamSpec) -> str:
    """A %-format of one clean event's line, byte for byte what json.dumps writes for its object."""
    fields = ['"event_id": "%s"', '"event_time": "%s"', '"label": %r', f'"weight": {WEIGHT!r}']
    fields += [f'"{random_effect.entity_column}": "%s"' for random_effect in spec.random_effects]
    bags = [
        f'"{bag}": [' + ", ".join(f'{{"name": "{bag[0]}", "term": "{j}", "value": %r}}' for j in range(width)) + "]"
        for bag, width in spec.bags.items()
    ]
    return "{" + ", ".join(fields) + ', "features": {' + ", ".join(bags) + "}}"


def _json_lines(stream: _Stream, start: int, stop: int, bad: list[_BadEvent]) -> str:
    spec = stream.spec
    template = _line_template(spec)
    columns = [stream.event_ids(start, stop), _iso(stream.times[start:stop]), stream.labels[start:stop].tolist()]
    columns += [stream.entity_ids(t, start, stop).to_pylist() for t in range(len(spec.random_effects))]
    values = np.hstack([stream.features[bag][start:stop] for bag in spec.bags]).tolist()
    lines = [template % (*head, *row) for head, row in zip(zip(*columns, strict=True), values, strict=True)]
    for event in bad:
        broken = _broken(stream.event(event.index), event, spec.task)
        lines[event.index - start] = broken if isinstance(broken, str) else json.dumps(broken)
    return "".join(line + "\n" for line in lines)


def _arrow_schema(spec: StreamSpec) -> pa.Schema:
    fields = [
        ("event_id", pa.string()),
        ("event_time", pa.timestamp("us", tz="UTC")),
        ("label", pa.float64()),
        ("weight", pa.float64()),
    ]
    fields += [(random_effect.entity_column, pa.string()) for random_effect in spec.random_effects]
    fields.append(("features", pa.map_(pa.string(), pa.list_(FEATURE))))
    return pa.schema(fields)


def _parquet_table(stream: _Stream, start: int, stop: int, bad: list[_BadEvent]) -> pa.Table:
    spec = stream.spec
    schema = _arrow_schema(spec)
    count = stop - start
    widths = np.array(list(spec.bags.values()))
    names = [bag[0] for bag, width in spec.bags.items() for _ in range(width)]
    terms = [str(j) for width in widths for j in range(width)]
    columns = np.tile(np.arange(widths.sum()), count)
    values = np.hstack([stream.features[bag][start:stop] for bag in spec.bags]).ravel()
    bag_lists = pa.ListArray.from_arrays(
        np.concatenate([[0], np.cumsum(np.tile(widths, count))]).astype(np.int32),
        pa.StructArray.from_arrays(
            [_strings(names, columns), _strings(terms, columns), pa.array(values)], fields=FEATURE
        ),
    )
    features = pa.MapArray.from_arrays(
        np.arange(0, count * len(widths) + 1, len(widths), dtype=np.int32),
        _strings(list(spec.bags), np.tile(np.arange(len(widths)), count)),
        bag_lists,
        type=schema.field("features").type,
    )
    arrays = [
        pa.array(stream.event_ids(start, stop)),
        pa.array(stream.times[start:stop], type=schema.field("event_time").type),
        pa.array(stream.labels[start:stop].astype(np.float64)),
        pa.array(np.full(count, WEIGHT)),
        *[stream.entity_ids(t, start, stop) for t in range(len(spec.random_effects))],
        features,
    ]
    clean = pa.Table.from_arrays(arrays, schema=schema)
    if not bad:
        return clean
    rows = []
    for event in bad:
        row = _broken(stream.event(event.index), event, spec.task)
        if "event_time" in row:
            row["event_time"] = datetime.fromisoformat(row["event_time"])
        rows.append(row)
    broken_lines = np.array([event.index - start for event in bad])
    kept = np.ones(count, dtype=bool)
    kept[broken_lines] = False
    table = pa.concat_tables([clean.filter(pa.array(kept)), pa.Table.from_pylist(rows, schema=schema)])
    return table.take(np.argsort(np.concatenate([np.flatnonzero(kept), broken_lines]), kind="stable"))


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def _write_text(path: Path, text: str) -> None:
    _write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _entities_table(stream: _Stream) -> pa.Table:
    parts = []
    for population in stream.populations:
        coefficients = [INTERCEPT] + [(population.spec.feature_bag[0], str(j)) for j in range(population.spec.features)]
        entity = np.concatenate([np.repeat(seen, len(coefficients)) for seen, _ in population.snapshots])
        slices = np.concatenate(
            [np.full(theta.size, index, dtype=np.int32) for index, (_, theta) in enumerate(population.snapshots)]
        )
        coefficient = np.tile(np.arange(len(coefficients)), len(entity) // len(coefficients))
        columns = [
            _strings([population.spec.name], np.zeros(len(entity), dtype=np.int64)),
            pc.take(population.ids, entity),
            pa.array(slices),
            _strings([name for name, _ in coefficients], coefficient),
            _strings([term for _, term in coefficients], coefficient),
            pa.array(np.concatenate([theta.ravel() for _, theta in population.snapshots])),
        ]
        parts.append(pa.Table.from_arrays(columns, schema=ENTITIES_SCHEMA))
    return pa.concat_tables(parts) if parts else ENTITIES_SCHEMA.empty_table()


def _write_truth(stream: _Stream, bad: list[list[_BadEvent]], files: list[Path], truth: Path) -> GroundTruth:
    spec = stream.spec
    fixed_effect = {
        "task": spec.task,
        "feature_bag": spec.global_bag,
        "intercept": stream.intercept,
        "coefficients": [
            {"name": spec.global_bag[0], "term": str(j), "value": value} for j, value in enumerate(stream.beta.tolist())
        ],
    }
    _write_text(truth / "fixed_effect.json", json.dumps(fixed_effect, indent=2) + "\n")
    table = _entities_table(stream)
    _write_atomically(truth / "entities.parquet", lambda temporary: pq.write_table(table, temporary))

    records = [
        {
            "file": path.name,
            "line": event.index - first,
            "kind": event.kind,
            "reason": event.reason,
            "event_id": event.event_id,
        }
        for path, first, in_slice in zip(files, stream.bounds[:-1].tolist(), bad, strict=True)
        for event in in_slice
    ]
    _write_text(truth / "bad_events.jsonl", "".join(json.dumps(record) + "\n" for record in records))

    slice_micros = round(spec.slice_minutes * MICROS_PER_MINUTE)
    edges = _iso(_epoch_micros(spec.start) + slice_micros * np.arange(spec.slices + 1))
    slices = [
        {
            "slice": index,
            "file": path.name,
            "start": edges[index],
            "end": edges[index + 1],
            "events": int(stream.bounds[index + 1] - stream.bounds[index]),
            "bad_events": len(bad[index]),
            "new_entity_events": {p.spec.name: int(p.is_new[index].sum()) for p in stream.populations},
        }
        for index, path in enumerate(files)
    ]
    entities = {p.spec.name: len(p.seen) for p in stream.populations}
    new_entity_events = {p.spec.name: sum(int(flags.sum()) for flags in p.is_new) for p in stream.populations}
    summary = {"spec": asdict(spec), "kinds": list(spec.kinds), "entities": entities, "slices": slices}
    _write_text(truth / "stream.json", json.dumps(summary, indent=2) + "\n")
    bad_events = sum(map(len, bad))
    return GroundTruth(files[0].parent, truth, tuple(files), spec.events, bad_events, new_entity_events, entities)


def generate(spec: StreamSpec, out_dir: Path) -> GroundTruth:
    """Write the stream of ``spec`` to ``out_dir/landing`` and its truth to ``out_dir/truth``."""
    landing, truth = Path(out_dir) / "landing", Path(out_dir) / "truth"
    for folder in (landing, truth):
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} is not empty; generate into a fresh folder")
        folder.mkdir(parents=True, exist_ok=True)
    bad_seed, *simulation_seeds = np.random.SeedSequence(spec.seed).spawn(4 + len(spec.random_effects))
    stream = _simulate(spec, simulation_seeds)
    bad = _bad_events(stream, bad_seed)
    files = [landing / f"part-{index:05d}.{spec.format}" for index in range(spec.slices)]
    # The truth first: whoever watches the landing folder can evaluate as soon as files arrive.
    result = _write_truth(stream, bad, files, truth)
    starts, stops = stream.bounds[:-1].tolist(), stream.bounds[1:].tolist()
    for path, start, stop, in_slice in zip(files, starts, stops, bad, strict=True):
        if spec.format == "json":
            _write_text(path, _json_lines(stream, start, stop, in_slice))
        else:
            table = _parquet_table(stream, start, stop, in_slice)
            _write_atomically(path, lambda temporary, table=table: pq.write_table(table, temporary))
    return result


def _parse_entities(text: str) -> dict[str, int]:
    counts = {}
    for item in filter(None, text.split(",")):
        name, separator, count = item.partition("=")
        if not separator or not count.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--entities wants name=count,...; got {item!r}")
        counts[name.strip()] = int(count)
    return counts


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (landing/ and truth/ below it)")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--slices", type=int, default=24, help="one landing file per slice")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--format", choices=FORMATS, default="json")
    parser.add_argument("--drift", type=float, default=0.1, help="sd of each coefficient's step per slice")
    parser.add_argument("--new-entity-rate", type=float, default=0.05)
    parser.add_argument("--bad-event-rate", type=float, default=0.0)
    parser.add_argument("--base-rate", type=float, default=0.1, help="mean label (positive rate for logistic)")
    parser.add_argument("--task", choices=TASKS, help="default: the config's model.task, else logistic")
    parser.add_argument(
        "--entities",
        type=_parse_entities,
        default={},
        help=f"initial entities per type; default per_member=2000,per_item=500, any other type {DEFAULT_ENTITIES}",
    )
    parser.add_argument("--entity-features", type=int, default=5, help="features per random-effect type")
    parser.add_argument("--global-features", type=int, default=10)
    parser.add_argument("--slice-minutes", type=float, default=60.0)
    parser.add_argument("--start", default="2026-11-01T00:00:00Z")
    parser.add_argument("--config", type=Path, help="take the random-effect types, bags and task from this YAML")
    return parser.parse_args(argv)


def _spec_from_arguments(arguments: argparse.Namespace) -> StreamSpec:
    """The spec the command line asks for."""
    task, global_bag = arguments.task, "global"
    if arguments.config is None:
        types = [(name, column, bag) for name, column, bag, _ in DEFAULT_RANDOM_EFFECTS]
    else:
        from jobs.config import load_config

        model = load_config(arguments.config).model
        if model.fixed_effect.source != "train":
            raise ValueError("model.fixed_effect.source score_column is not supported: events carry no score")
        types = [(r.name, r.entity_column, r.feature_bag) for r in model.random_effects]
        task, global_bag = task or model.task, model.fixed_effect.feature_bag
    unknown = set(arguments.entities) - {name for name, _, _ in types}
    if unknown:
        raise ValueError(f"--entities names unknown random-effect types: {', '.join(sorted(unknown))}")
    counts = {name: count for name, _, _, count in DEFAULT_RANDOM_EFFECTS} | arguments.entities
    return StreamSpec(
        random_effects=tuple(
            RandomEffectSpec(name, column, bag, counts.get(name, DEFAULT_ENTITIES), arguments.entity_features)
            for name, column, bag in types
        ),
        events=arguments.events,
        slices=arguments.slices,
        global_features=arguments.global_features,
        global_bag=global_bag,
        task=task or "logistic",
        base_rate=arguments.base_rate,
        drift=arguments.drift,
        new_entity_rate=arguments.new_entity_rate,
        bad_event_rate=arguments.bad_event_rate,
        slice_minutes=arguments.slice_minutes,
        start=arguments.start,
        format=arguments.format,
        seed=arguments.seed,
    )


def main(argv: Sequence[str] | None = None) -> None:
    arguments = _arguments(argv)
    began = time.perf_counter()
    try:
        spec = _spec_from_arguments(arguments)
        result = generate(spec, arguments.out)
    except (ValueError, FileExistsError) as error:
        raise SystemExit(f"generate: {error}") from None
    print(json.dumps(result.summary() | {"seconds": round(time.perf_counter() - began, 3)}))


if __name__ == "__main__":
    main()
