"""What to simulate: the stream's spec (checked on construction), its constants, and where the result landed.

The module docstring of ``jobs.generate`` describes the stream: its truth, entities, bad events and files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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
            require_name(f"random effect {field_name}", getattr(self, field_name))
        if self.entity_column in EVENT_FIELDS:
            raise ValueError(f"random effect entity_column must not be an event field; got {self.entity_column!r}")
        require(f"random effect {self.name} entities", self.entities, 1)
        require(f"random effect {self.name} features", self.features, 0)


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
        require_name("global_bag", self.global_bag)
        require("slices", self.slices, 1)
        require("events", self.events, self.slices)
        require("global_features", self.global_features, 0)
        require("seed", self.seed, 0)
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
            epoch_micros(self.start)
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


def require(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be a whole number >= {least}; got {value!r}")


def require_name(name: str, value: Any) -> None:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ValueError(f"{name} must be a letter then letters, digits or _; got {value!r}")


def epoch_micros(text: str) -> int:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // timedelta(microseconds=1)
