"""Bad events: which lines of the stream are broken, and how (one way each, as docs/events.md lists them)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.simulate.population import SimulatedStream
from jobs.simulate.spec import WEIGHT


@dataclass(frozen=True)
class BadEvent:
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


def deal_bad_events(stream: SimulatedStream, seed: np.random.SeedSequence) -> list[list[BadEvent]]:
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
            BadEvent(
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


def broken_event(event: dict[str, Any], bad: BadEvent, task: str) -> dict[str, Any] | str:
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
