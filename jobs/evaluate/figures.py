"""The figures of scored events: AUC, log loss and per-entity AUC (RMSE for a linear model)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from jobs.runtime.settings import Config
from lambda_learner import metrics

KEYS = ("auc", "log_loss", "per_entity_auc", "rmse")


def figures(
    config: Config, scores: pd.DataFrame, entity_columns: list[str], known: dict[str, set[str]] | None = None
) -> dict:
    """AUC and log loss of ``scores`` (label, weight, score) and the mean AUC of its entities.

    Per-entity AUC is the unweighted mean over the entities (of the types in ``entity_columns``, each
    entity of each type once) whose events hold both labels; with ``known`` (entity column -> ids), over
    the entities outside it only.
    """
    labels, weights, values = scores["label"].to_numpy(), scores["weight"].to_numpy(), scores["score"].to_numpy()
    if config.model.task == "linear":
        return {"rmse": metrics.rmse(values, labels, weights) if len(scores) else float("nan"), "events": len(scores)}
    if not len(scores):
        nan = float("nan")
        return {"auc": nan, "log_loss": nan, "per_entity_auc": nan, "entities_with_auc": 0, "events": 0}
    per_entity = metrics.per_entity_auc(*_by_entity(scores, entity_columns, known))
    return {
        "auc": metrics.auc(values, labels, weights),
        "log_loss": metrics.log_loss(values, labels, weights),
        "per_entity_auc": per_entity[0],
        "entities_with_auc": per_entity[1],
        "events": len(scores),
    }


def entity_aucs(config: Config, scores: pd.DataFrame, entity_columns: list[str]) -> np.ndarray:
    """Each entity's AUC over all its scored events (the entities holding both labels)."""
    if config.model.task == "linear" or not len(scores):
        return np.zeros(0)
    return metrics.auc_by_entity(*_by_entity(scores, entity_columns))[1]


def _by_entity(
    scores: pd.DataFrame, entity_columns: list[str], known: dict[str, set[str]] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, labels, entity keys): each type's rows (given ``known``, its new entities' only), keyed by type."""
    parts = []
    for column in entity_columns:
        rows = scores if known is None else scores[~scores[column].isin(known[column])]
        keys = (column + ":" + rows[column].astype(str)).to_numpy(dtype=object)
        parts.append((rows["score"].to_numpy(), rows["label"].to_numpy(), keys))
    return tuple(np.concatenate([part[k] for part in parts]) for k in range(3))


def means(records: list[dict]) -> dict:
    """The mean of every figure over ``records`` (NaN ones left out)."""
    keys = [key for key in KEYS if records and key in records[0]]
    return {key: float(np.nanmean([r[key] for r in records])) for key in keys}


def cold_start(scores: pd.DataFrame, known: dict[str, set[str]]) -> np.ndarray:
    """Whether each event has an entity (of any type) outside ``known`` (entity column -> known ids)."""
    new = np.zeros(len(scores), dtype=bool)
    for column, ids in known.items():
        new |= ~scores[column].isin(ids).to_numpy()
    return new


def to_json(report: dict) -> str:
    """``report`` as JSON, a NaN figure (no AUC without both labels) as null."""

    def plain(value):
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [plain(item) for item in value]
        if isinstance(value, float | np.floating) and not np.isfinite(value):
            return None
        if isinstance(value, np.generic):
            return value.item()
        return value

    return json.dumps(plain(report), indent=2, allow_nan=False)
