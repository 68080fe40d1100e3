"""The bandit replay's world: the generator's truth as a simulated user, requests, policies' choices, clicks, regret.

Round by round (each a part of one slice of the generated stream, after the nightly cutoff): every
sampled event of the part becomes a request of its member (the requester) with ``candidates`` items:
the event's own item and others drawn from the slice's items by popularity (how often they occur in
the slice), new items included. Each candidate row gets fresh N(0, 1) features in every bag. Its true
click probability is the generator's model at that slice,

    p = sigmoid(intercept + beta . x_global + sum over types r of theta_{r, entity}(slice) . (1, x_r)),

and whether it would be clicked if shown is fixed up front (u < p, one uniform u per row), so that every
policy faces the same users: a policy shows its top ``k`` of each request, the shown rows are clicked or
not, and they return to the nearline job as labelled events (clicked: 1, shown but not clicked: 0).

Regret is expected clicks lost to the oracle (the top k by true p): the sum of p over the oracle's
rows minus the sum over the shown rows. A member or an item is *new* when it was born after the
nightly cutoff (it has no prior in the generation every policy starts from). Figures come overall,
for the requests of new members and for the requests whose best candidate (by true p) is a new item:
where finding new items pays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from jobs.evaluate.streams import GeneratedStream
from jobs.simulate.spec import DECIMALS, WEIGHT, RandomEffectSpec, StreamSpec
from lambda_learner.representation import INTERCEPT

GREEDY, THOMPSON, INVERTED, RANDOM = "greedy", "thompson", "thompson_inverted", "random"
POLICIES = (GREEDY, THOMPSON, INVERTED, RANDOM)
SEGMENTS = ("all", "new_requester", "new_best_item")


def sigmoid(margin: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * margin))


@dataclass
class World:
    """The generator's truth: its spec, the fixed effect, every entity's coefficients at every slice, births."""

    spec: StreamSpec
    intercept: float
    beta: np.ndarray
    entities: pd.DataFrame  # re_type, entity_id, slice, name, term, value
    born: dict[str, pd.Series]  # per type: entity id -> the slice it was born in
    _theta: dict[tuple[str, int], pd.DataFrame] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, stream: GeneratedStream) -> World:
        spec = stream.spec()
        fixed = json.loads((stream.truth / "fixed_effect.json").read_text())
        beta = np.zeros(spec.global_features)
        for c in fixed["coefficients"]:
            beta[int(c["term"])] = c["value"]
        entities = pd.read_parquet(stream.truth / "entities.parquet")
        born = {name: group.groupby("entity_id")["slice"].min() for name, group in entities.groupby("re_type")}
        return cls(spec, float(fixed["intercept"]), beta, entities, born)

    def random_effect(self, column: str) -> RandomEffectSpec:
        (found,) = [r for r in self.spec.random_effects if r.entity_column == column]
        return found

    def theta(self, re_type: str, slice_index: int, ids: np.ndarray) -> np.ndarray:
        """The true coefficients (intercept first, then the bag's features in order) of ``ids`` at a slice."""
        key = (re_type, slice_index)
        if key not in self._theta:
            rows = self.entities[(self.entities["re_type"] == re_type) & (self.entities["slice"] == slice_index)]
            column = np.where(rows["name"] == INTERCEPT[0], 0, pd.to_numeric(rows["term"], errors="coerce") + 1)
            self._theta[key] = (
                rows.assign(column=column.astype(int)).pivot(index="entity_id", columns="column", values="value")
            ).fillna(0.0)
        return self._theta[key].reindex(ids).fillna(0.0).to_numpy()

    def is_new(self, re_type: str, ids: np.ndarray, cutoff_slice: int) -> np.ndarray:
        """Born at or after ``cutoff_slice`` (the first slice the nightly generation did not see)."""
        return self.born[re_type].reindex(ids).fillna(cutoff_slice).to_numpy() >= cutoff_slice

    def slice_events(self, path: Path) -> pd.DataFrame:
        """The entity ids of a landing file's events (events without every id, bad ones, left out)."""
        columns = [r.entity_column for r in self.spec.random_effects]
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path, columns=columns)
        else:
            rows = []
            for line in path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                rows.append({c: event.get(c) for c in columns} if isinstance(event, dict) else {})
            frame = pd.DataFrame(rows, columns=columns)
        return frame.dropna().astype(str).reset_index(drop=True)


@dataclass
class Round:
    """One round's requests: a row per candidate, with its features, true click probability and click draw."""

    number: int
    slice: int
    time: datetime
    rows: pd.DataFrame  # request_id, entity columns, p, u, new_requester, new_item, new_best_item
    features: dict[str, np.ndarray]  # per bag, (rows, width)

    def request_lines(self, world: World) -> list[str]:
        """The candidate rows as request rows for the scoring job (JSON lines)."""
        return [json.dumps(row) for row in self._records(world, np.arange(len(self.rows)))]

    def feedback_lines(self, world: World, shown: np.ndarray, policy: str) -> list[str]:
        """The shown rows as training events: clicked 1, shown but not clicked 0."""
        lines = []
        for index, record in zip(shown, self._records(world, shown), strict=True):
            row = self.rows.iloc[index]
            event = {
                "event_id": f"{policy}-{row.request_id}-{index}",
                "event_time": (self.time + timedelta(microseconds=int(index))).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "label": int(row.u < row.p),
                "weight": WEIGHT,
            }
            event |= {key: value for key, value in record.items() if key != "request_id"}
            lines.append(json.dumps(event))
        return lines

    def _records(self, world: World, indices: np.ndarray) -> list[dict[str, Any]]:
        columns = [r.entity_column for r in world.spec.random_effects]
        records = []
        for index in indices:
            row = self.rows.iloc[index]
            record = {"request_id": row.request_id} | {c: row[c] for c in columns}
            record["features"] = {
                bag: [
                    {"name": bag[0], "term": str(j), "value": float(value)}
                    for j, value in enumerate(values[index].tolist())
                ]
                for bag, values in self.features.items()
            }
            records.append(record)
        return records


def make_round(
    world: World,
    events: pd.DataFrame,
    *,
    number: int,
    slice_index: int,
    time: datetime,
    cutoff_slice: int,
    requests: int,
    candidates: int,
    requester: str,
    candidate: str,
    rng: np.random.Generator,
) -> Round:
    """``requests`` requests from ``events`` (part of slice ``slice_index``, at ``time``), ``candidates`` items each."""
    spec = world.spec
    chosen = np.sort(rng.choice(len(events), size=min(requests, len(events)), replace=False))
    pool, counts = np.unique(events[candidate].to_numpy(), return_counts=True)
    rows = []
    for position, event_index in enumerate(chosen):
        event = events.iloc[event_index]
        own = event[candidate]
        others = pool != own
        take = min(candidates - 1, int(others.sum()))
        weights = counts[others] / counts[others].sum()
        items = [own, *rng.choice(pool[others], size=take, replace=False, p=weights).tolist()]
        request_id = f"r{number:04d}-{position:05d}"
        for item in items:
            rows.append({"request_id": request_id, **event.to_dict(), candidate: item})
    frame = pd.DataFrame(rows)
    widths = spec.bags
    features = {
        bag: np.round(rng.standard_normal((len(frame), width)), DECIMALS) for bag, width in widths.items() if width
    }
    margin = world.intercept + (
        features[spec.global_bag][:, : spec.global_features] @ world.beta if spec.global_features else 0.0
    )
    for r in spec.random_effects:
        theta = world.theta(r.name, slice_index, frame[r.entity_column].to_numpy())
        x = features[r.feature_bag][:, : r.features] if r.features else np.zeros((len(frame), 0))
        margin = margin + theta[:, 0] + np.einsum("ij,ij->i", theta[:, 1 : 1 + r.features], x)
    frame["p"] = sigmoid(margin)
    frame["u"] = rng.random(len(frame))
    frame["new_requester"] = world.is_new(
        world.random_effect(requester).name, frame[requester].to_numpy(), cutoff_slice
    )
    new_item = world.is_new(world.random_effect(candidate).name, frame[candidate].to_numpy(), cutoff_slice)
    frame["new_item"] = new_item
    best = frame.loc[frame.groupby("request_id")["p"].idxmax(), ["request_id", "new_item"]].set_index("request_id")
    frame["new_best_item"] = frame["request_id"].map(best["new_item"]).astype(bool)
    return Round(number, slice_index, time, frame, features)


def random_choice(round_: Round, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices of ``top_k`` uniformly random candidates per request."""
    order = pd.Series(rng.random(len(round_.rows))).groupby(round_.rows["request_id"].to_numpy()).rank(method="first")
    return np.flatnonzero(order.to_numpy() <= top_k)


def shown_rows(round_: Round, scored: pd.DataFrame, candidate: str) -> np.ndarray:
    """Row indices of the candidates the scoring job ranked into the top k (``scored``: request_id, candidate)."""
    keys = pd.MultiIndex.from_frame(round_.rows[["request_id", candidate]])
    found = keys.get_indexer(pd.MultiIndex.from_frame(scored[["request_id", candidate]]))
    if (found < 0).any():
        raise ValueError("the scoring job returned a candidate that was not asked for")
    return np.sort(found)


def outcome(round_: Round, shown: np.ndarray, top_k: int) -> dict:
    """Clicks and regret of showing ``shown`` (row indices), overall and per segment."""
    rows = round_.rows
    is_shown = np.zeros(len(rows), dtype=bool)
    is_shown[shown] = True
    clicked = is_shown & (rows["u"].to_numpy() < rows["p"].to_numpy())
    frame = pd.DataFrame(
        {
            "request_id": rows["request_id"],
            "p": rows["p"],
            "shown_p": np.where(is_shown, rows["p"], 0.0),
            "clicks": clicked.astype(float),
            "shown": is_shown.astype(float),
            "new_item_shown": (is_shown & rows["new_item"].to_numpy()).astype(float),
            "new_item_clicks": (clicked & rows["new_item"].to_numpy()).astype(float),
        }
    )
    best = frame.sort_values("p", ascending=False).groupby("request_id", sort=False).head(top_k)
    per_request = frame.groupby("request_id").sum(numeric_only=True).drop(columns="p")
    per_request["oracle"] = best.groupby("request_id")["p"].sum()
    per_request["regret"] = per_request["oracle"] - per_request["shown_p"]
    segments = rows.groupby("request_id")[["new_requester", "new_best_item"]].first()
    result = {"round": round_.number, "slice": round_.slice}
    for segment in SEGMENTS:
        part = per_request if segment == "all" else per_request[segments[segment]]
        result[segment] = {
            "requests": len(part),
            "regret": float(part["regret"].sum()),
            "expected_clicks": float(part["shown_p"].sum()),
            "oracle_clicks": float(part["oracle"].sum()),
            "clicks": float(part["clicks"].sum()),
            "shown": float(part["shown"].sum()),
            "new_items_shown": float(part["new_item_shown"].sum()),
            "new_item_clicks": float(part["new_item_clicks"].sum()),
        }
    return result


def totals(rounds: list[dict]) -> dict:
    """Every segment's figures summed over the rounds, with regret and clicks per request and the click rate."""
    summary = {}
    for segment in SEGMENTS:
        keys = rounds[0][segment] if rounds else {}
        total = {key: float(sum(r[segment][key] for r in rounds)) for key in keys}
        requests = total.get("requests", 0.0)
        total["regret_per_request"] = total["regret"] / requests if requests else float("nan")
        total["click_rate"] = total["clicks"] / total["shown"] if total.get("shown") else float("nan")
        summary[segment] = total
    return summary


def inverted_variances(coefficients: Column) -> Column:
    """lambda-learner 0.1.0's mistake: each coefficient's variance v replaced by 1/v (the precision)."""

    def invert(coefficient: Column) -> Column:
        variance = coefficient.getField("variance")
        return coefficient.withField("variance", F.when(variance > 0, F.lit(1.0) / variance).otherwise(variance))

    return F.transform(coefficients, invert)


class InvertedVariances:
    """A read-only view of a table store whose random-effect coefficients carry 1/variance as their variance.

    Scoring through it with Thompson sampling draws from N(mean, precision), as lambda-learner 0.1.0 did.
    """

    TABLES = ("re_state", "re_priors")

    def __init__(self, store):
        self._store = store

    def read(self, name: str, **options) -> DataFrame:
        frame = self._store.read(name, **options)
        if name in self.TABLES:
            frame = frame.withColumn("coefficients", inverted_variances(F.col("coefficients")))
        return frame

    def __getattr__(self, name: str):
        return getattr(self._store, name)
