"""Damped Newton solver for many small convex problems at once.

Every problem (one entity) minimises

    f(theta) = sum_i w_i loss(x_i.theta + o_i, y_i) + 1/2 theta' A theta - b' theta + c

where the quadratic part carries the L2 penalty and the Gaussian prior (see
:class:`QuadraticPenalty`). Arrays carry a leading entity axis: coefficients are
``(E, D)``, per-row arrays ``(E, R)`` and features one zero-padded block
``(E, R, D)`` (padding rows have zero weight). The per-entity trainers run this
with E = 1, the batched solver with thousands of entities, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from lambda_learner.losses import Loss

DEFAULT_TOLERANCE = 1e-10
DEFAULT_MAX_ITERATIONS = 100
_ARMIJO = 1e-4
_MAX_HALVINGS = 50
# Objective differences below this (relative) are rounding, not progress.
_ROUNDING = 1e-13
# After a full step with a squared Newton decrement below this, the Hessian has
# moved by a few percent at most and the next step may reuse its factorisation.
_LOCAL_DECREMENT = 1e-3
# Shrink the working set once this fraction of it has finished.
_COMPACT_BELOW = 0.5
# Largest coefficient count solved by vectorised substitution; above, LAPACK per matrix.
_SUBSTITUTION_LIMIT = 48


@dataclass(frozen=True)
class QuadraticPenalty:
    """``1/2 theta' A theta - b' theta + c`` per entity; ``A`` diagonal ``(E, D)`` or full ``(E, D, D)``."""

    curvature: np.ndarray
    linear: np.ndarray
    constant: np.ndarray

    @classmethod
    def from_prior(
        cls, prior_mean: np.ndarray, prior_precision: np.ndarray, penalty: float, delta: float
    ) -> QuadraticPenalty:
        """``(1 - delta) lambda/2 |theta|^2 + delta/2 (theta - mean)' H0 (theta - mean)``."""
        if prior_precision.ndim == prior_mean.ndim:
            curvature = (1.0 - delta) * penalty + delta * prior_precision
            pulled = delta * prior_precision * prior_mean
        else:
            eye = np.eye(prior_mean.shape[-1])
            curvature = (1.0 - delta) * penalty * eye + delta * prior_precision
            pulled = delta * np.einsum("edf,ef->ed", prior_precision, prior_mean)
        constant = 0.5 * np.einsum("ed,ed->e", pulled, prior_mean)
        return cls(curvature, pulled, constant)

    @property
    def is_diagonal(self) -> bool:
        return self.curvature.ndim == 2

    def diagonal(self) -> np.ndarray:
        return self.curvature if self.is_diagonal else np.einsum("edd->ed", self.curvature)

    def times(self, theta: np.ndarray) -> np.ndarray:
        if self.is_diagonal:
            return self.curvature * theta
        return np.einsum("edf,ef->ed", self.curvature, theta)

    def value(self, theta: np.ndarray) -> np.ndarray:
        return np.einsum("ed,ed->e", 0.5 * self.times(theta) - self.linear, theta) + self.constant

    def gradient(self, theta: np.ndarray) -> np.ndarray:
        return self.times(theta) - self.linear

    def take(self, index: np.ndarray) -> QuadraticPenalty:
        return QuadraticPenalty(self.curvature[index], self.linear[index], self.constant[index])


@dataclass(frozen=True)
class Rows:
    """Per-row arrays ``(E, R)``: labels as the loss wants them, weights, offsets."""

    labels: np.ndarray
    weights: np.ndarray
    offsets: np.ndarray

    def take(self, index: np.ndarray) -> Rows:
        return Rows(self.labels[index], self.weights[index], self.offsets[index])


class Design:
    """Products with the entities' feature block ``(E, R, D)``."""

    def __init__(self, features: np.ndarray):
        self.features = features

    def margins(self, theta: np.ndarray) -> np.ndarray:
        return np.matmul(self.features, theta[:, :, None])[:, :, 0]

    def transpose_times(self, row_values: np.ndarray) -> np.ndarray:
        return np.matmul(row_values[:, None, :], self.features)[:, 0, :]

    def gram(self, row_weights: np.ndarray) -> np.ndarray:
        """``X' diag(c) X`` per entity."""
        return np.matmul(self.features.transpose(0, 2, 1), self.features * row_weights[:, :, None])

    def gram_diagonal(self, row_weights: np.ndarray) -> np.ndarray:
        return np.matmul(row_weights[:, None, :], self.features * self.features)[:, 0, :]

    def hessian(self, row_weights: np.ndarray, penalty: QuadraticPenalty) -> np.ndarray:
        """``X' diag(c) X + A`` per entity, as full matrices."""
        matrix = self.gram(row_weights)
        if penalty.is_diagonal:
            np.einsum("edd->ed", matrix)[...] += penalty.curvature
        else:
            matrix += penalty.curvature
        return matrix

    def factorize(self, row_weights: np.ndarray, penalty: QuadraticPenalty) -> Factor:
        """A factorisation of every entity's ``X' diag(c) X + A``, to solve with (more than once)."""
        _, num_rows, num_coefficients = self.features.shape
        if penalty.is_diagonal and num_rows < num_coefficients and (penalty.curvature > 0).all():
            return RowSpaceFactor.build(self.features, row_weights, penalty.curvature)
        return factorize_stack(self.hessian(row_weights, penalty))

    def take(self, index: np.ndarray) -> Design:
        return Design(self.features[index])


class Factor:
    """A factorised stack of symmetric positive definite matrices."""

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """Solutions ``(E, D)``; NaN for an entity whose matrix is not positive definite."""
        raise NotImplementedError

    def take(self, index: np.ndarray) -> Factor:
        raise NotImplementedError


def factorize_stack(matrices: np.ndarray) -> Factor:
    if matrices.shape[-1] <= _SUBSTITUTION_LIMIT:
        return CholeskyFactor(_cholesky_stack(matrices))
    return MatrixFactor(matrices)


@dataclass(frozen=True)
class CholeskyFactor(Factor):
    """Lower Cholesky factors; small systems, solved by substitution vectorised over entities."""

    lower: np.ndarray

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        lower, solution = self.lower, np.array(rhs, dtype=np.float64, copy=True)
        size = solution.shape[1]
        for i in range(size):
            solution[:, i] /= lower[:, i, i]
            solution[:, i + 1 :] -= lower[:, i + 1 :, i] * solution[:, i : i + 1]
        for i in range(size - 1, -1, -1):
            solution[:, i] /= lower[:, i, i]
            solution[:, :i] -= lower[:, i, :i] * solution[:, i : i + 1]
        return solution

    def take(self, index: np.ndarray) -> CholeskyFactor:
        return CholeskyFactor(self.lower[index])


@dataclass(frozen=True)
class MatrixFactor(Factor):
    """Larger systems: the matrices themselves, solved by LAPACK each time."""

    matrices: np.ndarray

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        return _per_matrix(_solve, rhs.shape, self.matrices, rhs)

    def take(self, index: np.ndarray) -> MatrixFactor:
        return MatrixFactor(self.matrices[index])


@dataclass(frozen=True)
class RowSpaceFactor(Factor):
    """``(P + Z'Z)^-1`` by Woodbury with ``Z = sqrt(c) X``, P diagonal: an R x R system when R < D."""

    inverse_curvature: np.ndarray
    scaled_by_inverse: np.ndarray
    inner: Factor

    @classmethod
    def build(cls, features: np.ndarray, row_weights: np.ndarray, curvature: np.ndarray) -> RowSpaceFactor:
        scaled = features * np.sqrt(row_weights)[:, :, None]
        inverse_curvature = 1.0 / curvature
        scaled_by_inverse = scaled * inverse_curvature[:, None, :]
        inner = np.matmul(scaled_by_inverse, scaled.transpose(0, 2, 1))
        np.einsum("err->er", inner)[...] += 1.0
        return cls(inverse_curvature, scaled_by_inverse, factorize_stack(inner))

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        projected = np.matmul(self.scaled_by_inverse, rhs[:, :, None])[:, :, 0]
        correction = self.inner.solve(projected)
        return self.inverse_curvature * rhs - np.matmul(correction[:, None, :], self.scaled_by_inverse)[:, 0, :]

    def take(self, index: np.ndarray) -> RowSpaceFactor:
        return RowSpaceFactor(self.inverse_curvature[index], self.scaled_by_inverse[index], self.inner.take(index))


def _cholesky_stack(matrices: np.ndarray) -> np.ndarray:
    """Lower factors; an entity whose matrix is not positive definite gets NaN."""
    return _per_matrix(np.linalg.cholesky, matrices.shape, matrices)


def _solve(matrices: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    return np.linalg.solve(matrices, rhs[..., None])[..., 0]


def _per_matrix(function, shape: tuple[int, ...], *stacks: np.ndarray) -> np.ndarray:
    """``function`` on whole stacks; if LAPACK refuses one matrix, entity by entity with NaN for the refused."""
    try:
        return function(*stacks)
    except np.linalg.LinAlgError:
        result = np.full(shape, np.nan)
        for entity, arguments in enumerate(zip(*stacks, strict=True)):
            with contextlib.suppress(np.linalg.LinAlgError):
                result[entity] = function(*arguments)
        return result


@dataclass(frozen=True)
class Solution:
    """Per entity: the minimiser and how the solve went. ``row_curvature`` is ``w_i loss''`` at the minimiser."""

    theta: np.ndarray
    value: np.ndarray
    initial_value: np.ndarray
    gradient_norm: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    row_curvature: np.ndarray


@dataclass
class _WorkingSet:
    """The entities still being solved (``ids``), their slices of the problem and their state."""

    ids: np.ndarray
    design: Design
    rows: Rows
    penalty: QuadraticPenalty
    theta: np.ndarray
    margins: np.ndarray
    values: np.ndarray
    running: np.ndarray
    # Entities whose last step was a small full Newton step, and that step's factorisation.
    local: np.ndarray
    factor: Factor | None = None

    def compacted(self, *arrays: np.ndarray) -> tuple[_WorkingSet, tuple[np.ndarray, ...]]:
        """Drop finished entities once they are most of the set (copying costs less than carrying them)."""
        if self.running.sum() >= _COMPACT_BELOW * len(self.ids):
            return self, arrays
        keep = np.flatnonzero(self.running)
        work = _WorkingSet(
            self.ids[keep],
            self.design.take(keep),
            self.rows.take(keep),
            self.penalty.take(keep),
            self.theta[keep],
            self.margins[keep],
            self.values[keep],
            self.running[keep],
            self.local[keep],
            None if self.factor is None else self.factor.take(keep),
        )
        return work, tuple(array[keep] for array in arrays)


def minimize(
    loss: Loss,
    design: Design,
    rows: Rows,
    penalty: QuadraticPenalty,
    theta: np.ndarray,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> Solution:
    """Minimise every entity's objective from ``theta`` by Newton steps with a backtracking line search.

    An entity has converged when half its squared Newton decrement (an estimate of
    how far its objective is above the minimum) is at most ``tolerance`` times
    ``max(1, |objective|)``; its final step is then taken in full. After a small full
    step the decrement is first estimated with the previous factorisation (a chord
    step), which saves forming and factorising a new Hessian for the entities it settles.
    """
    if tolerance <= 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    theta = np.array(theta, dtype=np.float64, copy=True)
    num_entities = theta.shape[0]
    iterations = np.zeros(num_entities, dtype=np.int64)
    converged = np.zeros(num_entities, dtype=bool)
    margins = design.margins(theta) + rows.offsets
    initial_value = _objective(loss, rows, penalty, theta, margins)
    work = _WorkingSet(
        ids=np.arange(num_entities),
        design=design,
        rows=rows,
        penalty=penalty,
        theta=theta.copy(),
        margins=margins,
        values=initial_value.copy(),
        running=np.ones(num_entities, dtype=bool),
        local=np.zeros(num_entities, dtype=bool),
    )

    for _ in range(max_iterations):
        first, second = loss.derivatives(work.margins, work.rows.labels)
        gradient = work.design.transpose_times(work.rows.weights * first) + work.penalty.gradient(work.theta)
        threshold = 2.0 * tolerance * np.maximum(1.0, np.abs(work.values))

        if work.factor is not None and (work.local & work.running).any():
            chord = work.factor.solve(-gradient)
            settled = work.local & work.running & (-np.einsum("ed,ed->e", gradient, chord) <= threshold)
            work.theta[settled] += chord[settled]
            iterations[work.ids[settled]] += 1
            converged[work.ids[settled]] = True
            theta[work.ids[settled]] = work.theta[settled]
            work.running &= ~settled
            if not work.running.any():
                break
            work, (gradient, second, threshold) = work.compacted(gradient, second, threshold)

        work.factor = work.design.factorize(work.rows.weights * second, work.penalty)
        step = work.factor.solve(-gradient)
        decrement = -np.einsum("ed,ed->e", gradient, step)
        broken = work.running & ~(np.isfinite(decrement) & np.isfinite(step).all(axis=1))
        done = work.running & ~broken & (decrement <= threshold)

        # Backtracking: halve each entity's step until its objective falls enough (up to rounding).
        pending = work.running & ~broken
        scale = np.ones(len(work.ids))
        slack = _ROUNDING * np.maximum(1.0, np.abs(work.values))
        for _ in range(_MAX_HALVINGS):
            candidate = work.theta + scale[:, None] * step
            candidate_margins = work.design.margins(candidate) + work.rows.offsets
            candidate_values = _objective(loss, work.rows, work.penalty, candidate, candidate_margins)
            accept = pending & (candidate_values <= work.values - _ARMIJO * scale * decrement + slack)
            work.theta[accept] = candidate[accept]
            work.margins[accept] = candidate_margins[accept]
            work.values[accept] = candidate_values[accept]
            pending &= ~accept
            if not pending.any():
                break
            scale[pending] *= 0.5
        stalled = pending & ~done

        moved = work.running & ~broken & ~stalled
        iterations[work.ids[moved]] += 1
        converged[work.ids[done]] = True
        theta[work.ids[moved]] = work.theta[moved]
        work.local = moved & (scale == 1.0) & (decrement <= _LOCAL_DECREMENT)
        work.running &= ~(done | broken | stalled)
        if not work.running.any():
            break
        work, _ = work.compacted()

    margins = design.margins(theta) + rows.offsets
    first, second = loss.derivatives(margins, rows.labels)
    gradient = design.transpose_times(rows.weights * first) + penalty.gradient(theta)
    value = _objective(loss, rows, penalty, theta, margins)
    gradient_norm = np.abs(gradient).max(axis=1, initial=0.0)
    converged &= np.isfinite(value) & np.isfinite(theta).all(axis=1)
    return Solution(theta, value, initial_value, gradient_norm, iterations, converged, rows.weights * second)


def objective_value(loss: Loss, design: Design, rows: Rows, penalty: QuadraticPenalty, theta: np.ndarray) -> np.ndarray:
    """The objective per entity at ``theta``."""
    return _objective(loss, rows, penalty, theta, design.margins(theta) + rows.offsets)


def objective_gradient(
    loss: Loss, design: Design, rows: Rows, penalty: QuadraticPenalty, theta: np.ndarray
) -> np.ndarray:
    """The objective's gradient per entity at ``theta``."""
    first, _ = loss.derivatives(design.margins(theta) + rows.offsets, rows.labels)
    return design.transpose_times(rows.weights * first) + penalty.gradient(theta)


def _objective(loss: Loss, rows: Rows, penalty: QuadraticPenalty, theta: np.ndarray, margins: np.ndarray) -> np.ndarray:
    data_term = np.einsum("er,er->e", rows.weights, loss.value(margins, rows.labels))
    return data_term + penalty.value(theta)
