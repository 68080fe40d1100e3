"""The clean stream: entities and their drifting coefficients, features, event times and labels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.simulate.spec import (
    DECIMALS,
    MICROS_PER_MINUTE,
    POPULARITY_TAIL,
    WEIGHT,
    RandomEffectSpec,
    StreamSpec,
    epoch_micros,
)


def take_strings(options: Sequence[str], indices: np.ndarray) -> pa.Array:
    """options[indices] as an arrow string array, without a Python object per row."""
    return pc.take(pa.array(options, type=pa.string()), indices)


def iso_times(micros: np.ndarray) -> list[str]:
    return [text + "Z" for text in np.datetime_as_string(micros.astype("datetime64[us]"), unit="us").tolist()]


def sigmoid(margin: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * margin))


class Population:
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
class SimulatedStream:
    """Every clean event, column by column, and the truth behind them."""

    spec: StreamSpec
    bounds: np.ndarray  # slice s holds events bounds[s]:bounds[s + 1]
    times: np.ndarray  # microseconds since the epoch
    entities: list[np.ndarray]  # per random-effect type, each event's entity number
    features: dict[str, np.ndarray]  # per bag, (events, width)
    populations: list[Population]
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
            "event_time": iso_times(self.times[index : index + 1])[0],
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


def simulate(spec: StreamSpec, seeds: Sequence[np.random.SeedSequence]) -> SimulatedStream:
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
        epoch_micros(spec.start)
        + slice_of_event * slice_micros
        + np.floor(position * slice_micros / sizes[slice_of_event]).astype(np.int64)
    )

    beta = np.random.default_rng(truth_seed).normal(0.0, spec.fixed_scale, spec.global_features)
    margin = features[spec.global_bag][:, : spec.global_features] @ beta
    populations = [
        Population(random_effect, spec, sizes, seed)
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
        intercept = logistic_intercept(margin, spec.base_rate)
        labels = (labels_rng.random(spec.events) < sigmoid(margin + intercept)).astype(np.int64)
    else:
        intercept = spec.base_rate - float(margin.mean())
        labels = margin + intercept + labels_rng.normal(0.0, spec.noise_sd, spec.events)
    return SimulatedStream(spec, bounds, times, entities, features, populations, beta, intercept, labels)


def logistic_intercept(margin: np.ndarray, base_rate: float) -> float:
    """The b with mean(sigmoid(b + margin)) = base_rate, by bisection (the mean rises with b)."""
    center = math.log(base_rate / (1.0 - base_rate))
    spread = float(np.abs(margin).max()) + 1.0
    low, high = center - spread, center + spread
    while high - low > 1e-10:
        middle = 0.5 * (low + high)
        if sigmoid(middle + margin).mean() < base_rate:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)
