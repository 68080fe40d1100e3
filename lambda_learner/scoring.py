"""Scores, probabilities and Thompson sampling.

Thompson sampling draws coefficients from ``N(mean, variance)`` with the stored
per-coefficient variances (``1 / precision diagonal``), not the precision itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.special import expit

from lambda_learner.representation import IndexedDataset, IndexedModel


def score_linear_model(
    model: IndexedModel,
    test_data: IndexedDataset,
    exploration_threshold: float = 0.0,
    seed: int | np.random.Generator | None = None,
) -> np.ndarray:
    """``X theta + offset`` per row; with ``exploration_threshold`` t > 0, one draw of
    ``theta ~ N(mean, t * variance)`` scores every row (a Thompson-sampled score)."""
    if exploration_threshold < 0:
        raise ValueError(f"exploration_threshold must be non-negative, got {exploration_threshold}")
    theta = model.theta
    if exploration_threshold > 0:
        variances = model.variances
        if variances is None:
            raise ValueError("Thompson sampling needs the model's variances (a model with a Hessian)")
        theta = thompson_sample(theta, exploration_threshold * variances, seed=seed)
    return test_data.X @ theta + test_data.offsets


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Logistic probabilities of margins."""
    return expit(scores)


def thompson_sample(
    means: np.ndarray,
    variances: np.ndarray,
    *,
    seed: int | np.random.Generator | None = None,
    draws: int | None = None,
) -> np.ndarray:
    """Coefficients drawn from independent ``N(mean, variance)``; ``draws`` adds a leading axis."""
    means = np.asarray(means, dtype=np.float64)
    variances = np.asarray(variances, dtype=np.float64)
    if (variances < 0).any() or not np.isfinite(variances).all():
        raise ValueError("variances must be finite and non-negative")
    rng = np.random.default_rng(seed)
    shape = means.shape if draws is None else (draws, *means.shape)
    return means + np.sqrt(variances) * rng.standard_normal(shape)


@dataclass(frozen=True)
class CoefficientTable:
    """Many entities' coefficients, looked up by (entity, feature) without a dense entity x feature array."""

    width: int
    keys: np.ndarray
    means: np.ndarray
    variances: np.ndarray

    @classmethod
    def from_segments(
        cls, splits: np.ndarray, feature_ids: np.ndarray, means: np.ndarray, variances: np.ndarray, width: int
    ) -> CoefficientTable:
        """Entity e owns ``feature_ids[splits[e]:splits[e + 1]]`` and their means and variances."""
        owners = np.repeat(np.arange(len(splits) - 1), np.diff(splits))
        keys = owners * width + np.asarray(feature_ids, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        return cls(width, keys[order], np.asarray(means, float)[order], np.asarray(variances, float)[order])

    def lookup(self, entities: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Means and variances of the pairs; 0 and 0 where an entity lacks the feature (or is -1: unknown)."""
        wanted = np.asarray(entities, dtype=np.int64) * self.width + np.asarray(features, dtype=np.int64)
        position = np.minimum(np.searchsorted(self.keys, wanted), max(len(self.keys) - 1, 0))
        found = (np.asarray(entities) >= 0) & (len(self.keys) > 0)
        found = found & (self.keys[position] == wanted) if len(self.keys) else found
        means = np.where(found, self.means[position] if len(self.keys) else 0.0, 0.0)
        variances = np.where(found, self.variances[position] if len(self.keys) else 0.0, 0.0)
        return means, variances


def table_scores(
    features: sparse.sparray | sparse.spmatrix,
    offsets: np.ndarray,
    row_entity: np.ndarray,
    table: CoefficientTable,
    *,
    sample: bool = False,
    draw_group: np.ndarray | None = None,
    seed: int | np.random.Generator | None = None,
) -> np.ndarray:
    """Scores of rows belonging to many entities: means, or one Thompson draw per (draw group, entity).

    Row i belongs to entity ``row_entity[i]`` (-1: unknown, it scores its offset alone). With
    ``sample``, rows with the same ``draw_group`` (one request's candidates, say) share one draw of
    each entity's coefficients from ``N(mean, variance)``; without a group every row draws its own.
    """
    features = sparse.csr_array(features)
    num_rows = features.shape[0]
    rows = np.repeat(np.arange(num_rows), np.diff(features.indptr))
    owners = np.asarray(row_entity, dtype=np.int64)[rows]
    means, variances = table.lookup(owners, features.indices)
    coefficients = means
    if sample:
        group = np.arange(num_rows) if draw_group is None else np.asarray(draw_group)
        # One standard normal per (group, entity, feature): rows sharing a group and an entity share a draw.
        _, draw = np.unique(np.stack([group[rows], owners, features.indices]), axis=1, return_inverse=True)
        noise = np.random.default_rng(seed).standard_normal(draw.max(initial=-1) + 1)
        coefficients = means + np.sqrt(variances) * noise[draw.reshape(-1)]
    totals = np.bincount(rows, weights=features.data * coefficients, minlength=num_rows)
    return totals + np.asarray(offsets, dtype=np.float64)
