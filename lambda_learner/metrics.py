"""Evaluation metrics, weighted where weights are given. Labels count as positive when > 0."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.special import expit


def auc(y_scores: np.ndarray, y_targets: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve (ties count one half); NaN when a class is absent."""
    scores, positive, weights = _prepare(y_scores, y_targets, weights)
    return float(_grouped_auc(scores, positive, weights, np.zeros(len(scores), dtype=np.int64), 1)[0])


def per_entity_auc(
    y_scores: np.ndarray, y_targets: np.ndarray, entity_ids: np.ndarray, weights: np.ndarray | None = None
) -> tuple[float, int]:
    """Unweighted mean over entities of each entity's AUC, and how many entities counted.

    Entities whose rows hold only one class have no AUC and are dropped.
    """
    _, values = auc_by_entity(y_scores, y_targets, entity_ids, weights)
    return (float(values.mean()) if len(values) else float("nan")), len(values)


def auc_by_entity(
    y_scores: np.ndarray, y_targets: np.ndarray, entity_ids: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each entity's AUC (the entities whose rows hold both classes), as (entity ids, AUCs)."""
    scores, positive, weights = _prepare(y_scores, y_targets, weights)
    entities, entity = np.unique(np.asarray(entity_ids), return_inverse=True)
    entity = entity.reshape(-1)
    values = _grouped_auc(scores, positive, weights, entity, len(entities))
    defined = ~np.isnan(values)
    return entities[defined], values[defined]


def log_loss(
    y_scores: np.ndarray, y_targets: np.ndarray, weights: np.ndarray | None = None, *, from_margins: bool = True
) -> float:
    """Mean negative log-likelihood; scores are margins (``from_margins``) or probabilities."""
    scores, positive, weights = _prepare(y_scores, y_targets, weights)
    if from_margins:
        signed = np.where(positive, scores, -scores)
        losses = np.maximum(-signed, 0.0) + np.log1p(np.exp(-np.abs(signed)))
    else:
        probability = np.clip(scores, 1e-15, 1 - 1e-15)
        losses = -np.where(positive, np.log(probability), np.log1p(-probability))
    return float(np.average(losses, weights=weights))


def rmse(y_scores: np.ndarray, y_targets: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Root mean squared error."""
    scores = np.asarray(y_scores, dtype=np.float64)
    targets = np.asarray(y_targets, dtype=np.float64)
    return float(np.sqrt(np.average((scores - targets) ** 2, weights=weights)))


def calibration(
    y_scores: np.ndarray, y_targets: np.ndarray, weights: np.ndarray | None = None, *, from_margins: bool = True
) -> float:
    """Observed over expected positives: 1 is calibrated, above 1 under-predicts."""
    scores, positive, weights = _prepare(y_scores, y_targets, weights)
    expected = expit(scores) if from_margins else scores
    return float(np.sum(weights * positive) / np.sum(weights * expected))


METRICS: dict[str, Callable[..., float]] = {
    "auc": auc,
    "rmse": rmse,
    "log_loss": log_loss,
    "calibration": calibration,
}


def evaluate(
    metric_list: Sequence[str], y_scores: np.ndarray, y_targets: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, float]:
    """Several metrics at once, by name (see ``METRICS``); scores are margins."""
    unknown = sorted(set(metric_list) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; available: {sorted(METRICS)}")
    return {name: METRICS[name](y_scores, y_targets, weights) for name in metric_list}


def _prepare(y_scores, y_targets, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = np.asarray(y_scores, dtype=np.float64)
    positive = np.asarray(y_targets, dtype=np.float64) > 0
    weights = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    if not (len(scores) == len(positive) == len(weights)):
        raise ValueError(f"{len(scores)} scores, {len(positive)} targets and {len(weights)} weights")
    return scores, positive, weights


def _grouped_auc(
    scores: np.ndarray, positive: np.ndarray, weights: np.ndarray, group: np.ndarray, num_groups: int
) -> np.ndarray:
    """AUC per group by weighted rank sums: each positive earns the negative weight scored below it."""
    order = np.lexsort((scores, group))
    scores, positive, weights, group = scores[order], positive[order], weights[order], group[order]
    # Tie blocks: runs of equal (group, score).
    starts = np.flatnonzero(np.r_[True, (np.diff(scores) != 0) | (np.diff(group) != 0)])
    block_group = group[starts]
    block_positive = np.add.reduceat(weights * positive, starts) if len(starts) else np.zeros(0)
    block_negative = np.add.reduceat(weights * ~positive, starts) if len(starts) else np.zeros(0)
    # Negative weight strictly below each block, within its group.
    cumulative = np.cumsum(block_negative) - block_negative
    group_start = np.searchsorted(block_group, block_group)
    below = cumulative - cumulative[group_start]
    credit = block_positive * (below + 0.5 * block_negative)
    total_positive = np.bincount(block_group, block_positive, minlength=num_groups)
    total_negative = np.bincount(block_group, block_negative, minlength=num_groups)
    pairs = total_positive * total_negative
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, np.bincount(block_group, credit, minlength=num_groups) / pairs, np.nan)
