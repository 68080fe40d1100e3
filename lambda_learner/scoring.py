"""Scores, probabilities and Thompson sampling.

Thompson sampling draws coefficients from ``N(mean, variance)`` with the stored
per-coefficient variances (``1 / precision diagonal``), not the precision itself.
"""

from __future__ import annotations

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


def sampled_scores(
    features: sparse.sparray | sparse.spmatrix | np.ndarray,
    offsets: np.ndarray,
    row_entity: np.ndarray,
    means: np.ndarray,
    variances: np.ndarray,
    *,
    draw_group: np.ndarray | None = None,
    seed: int | np.random.Generator | None = None,
) -> np.ndarray:
    """Thompson-sampled scores of rows belonging to many entities.

    ``means`` and ``variances`` are ``(entities, D)`` in the columns of ``features``
    ``(N, D)``; row i belongs to entity ``row_entity[i]``. Rows with the same
    ``draw_group`` (for instance one request's candidates) share one draw of each
    entity's coefficients; without it every row gets its own draw.
    """
    features = sparse.csr_array(features)
    row_entity = np.asarray(row_entity)
    num_rows = features.shape[0]
    draw_group = np.arange(num_rows) if draw_group is None else np.asarray(draw_group)
    # One draw per (group, entity): rows sharing both share their coefficients.
    _, draw_of_row = np.unique(np.stack([draw_group, row_entity]), axis=1, return_inverse=True)
    draw_of_row = draw_of_row.reshape(-1)
    entity_of_draw = np.zeros(draw_of_row.max(initial=-1) + 1, dtype=np.int64)
    entity_of_draw[draw_of_row] = row_entity
    coefficients = thompson_sample(means[entity_of_draw], variances[entity_of_draw], seed=seed)
    rows = np.repeat(np.arange(num_rows), np.diff(features.indptr))
    products = features.data * coefficients[draw_of_row[rows], features.indices]
    return np.bincount(rows, weights=products, minlength=num_rows) + np.asarray(offsets, dtype=np.float64)
