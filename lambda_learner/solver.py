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
# Steps taken before the first Newton step (not for the square loss, whose Newton step is exact):
# the gradient scaled by the Hessian's diagonal, of the length that minimises the quadratic model
# along it. They cost a line search each, no Hessian to form and factorise, and from the prior mean
# they cover most of the way to the optimum: the Newton steps then need one factorisation fewer.
_DIAGONAL_STEPS = 2


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
        # X scaled by row weights (for every Hessian) and X squared (for every Hessian diagonal):
        # made once per design, not once per step.
        self._scaled: np.ndarray | None = None
        self._squares: np.ndarray | None = None

    def margins(self, theta: np.ndarray) -> np.ndarray:
        return np.matmul(self.features, theta[:, :, None])[:, :, 0]

    def transpose_times(self, row_values: np.ndarray) -> np.ndarray:
        return np.matmul(row_values[:, None, :], self.features)[:, 0, :]

    def gram(self, row_weights: np.ndarray) -> np.ndarray:
        """``X' diag(c) X`` per entity."""
        return np.matmul(self.features.transpose(0, 2, 1), self._weighted(row_weights))

    def gram_diagonal(self, row_weights: np.ndarray) -> np.ndarray:
        if self._squares is None:
            self._squares = np.square(self.features)
        return np.matmul(row_weights[:, None, :], self._squares)[:, 0, :]

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

    def _weighted(self, row_weights: np.ndarray) -> np.ndarray:
        return np.multiply(self.features, row_weights[:, :, None], out=self._scratch())

    def _scratch(self) -> np.ndarray:
        if self._scaled is None:
            self._scaled = np.empty_like(self.features)
        return self._scaled


class Factor:
    """A factorised stack of symmetric positive definite matrices."""

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """Solutions ``(E, D)``; NaN for an entity whose matrix is not positive definite."""
        raise NotImplementedError

    def take(self, index: np.ndarray) -> Factor:
        raise NotImplementedError


def factorize_stack(matrices: np.ndarray) -> Factor:
    if matrices.shape[-1] <= _SUBSTITUTION_LIMIT:
        return CholeskyFactor.of(matrices)
    return MatrixFactor(matrices)


@dataclass(frozen=True)
class CholeskyFactor(Factor):
    """``H = L P L'``: unit lower ``L`` and diagonal ``P`` from the Cholesky factors; small systems,
    solved by substitution vectorised over entities.

    Entity-last, ``unit`` is ``(D, D, E)`` and ``inverse_pivots`` ``(D, E)``: a substitution step is
    then one multiply and one subtract on contiguous rows.
    """

    unit: np.ndarray
    inverse_pivots: np.ndarray

    @classmethod
    def of(cls, matrices: np.ndarray) -> CholeskyFactor:
        # Entity-last first, then scaled to unit diagonal: scaling the contiguous copy is the cheaper order.
        unit = np.ascontiguousarray(_cholesky_stack(matrices).transpose(1, 2, 0))
        inverse_diagonal = 1.0 / np.einsum("iie->ie", unit)
        unit *= inverse_diagonal
        return cls(unit, inverse_diagonal * inverse_diagonal)

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        unit, solution = self.unit, np.array(rhs.T, dtype=np.float64, order="C")
        product = np.empty_like(solution)
        size = solution.shape[0]
        for i in range(size - 1):  # forward: rows below i lose column i of L times row i
            np.multiply(unit[i + 1 :, i], solution[i], out=product[i + 1 :])
            solution[i + 1 :] -= product[i + 1 :]
        solution *= self.inverse_pivots
        for i in range(size - 1, 0, -1):  # backward: rows above i lose row i of L times row i
            np.multiply(unit[i, :i], solution[i], out=product[:i])
            solution[:i] -= product[:i]
        return solution.T.copy()

    def take(self, index: np.ndarray) -> CholeskyFactor:
        return CholeskyFactor(self.unit[:, :, index], self.inverse_pivots[:, index])


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


@dataclass(frozen=True)
class _Results:
    """Per entity: where the working sets write what they find."""

    theta: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray


@dataclass
class _WorkingSet:
    """The entities still being solved (``ids`` into :class:`_Results`), their slices of the problem and their state.

    ``values``, ``first`` and ``second`` (the objective, and the loss derivatives times the row weights) and
    ``gradient`` are at ``theta``.
    """

    ids: np.ndarray
    design: Design
    rows: Rows
    penalty: QuadraticPenalty
    theta: np.ndarray
    margins: np.ndarray
    values: np.ndarray
    first: np.ndarray
    second: np.ndarray
    gradient: np.ndarray
    running: np.ndarray

    @classmethod
    def start(
        cls,
        loss: Loss,
        design: Design,
        rows: Rows,
        penalty: QuadraticPenalty,
        theta: np.ndarray,
        ids: np.ndarray,
    ) -> tuple[_WorkingSet, np.ndarray]:
        """The working set at ``theta``, and the objective there."""
        margins = design.margins(theta) + rows.offsets
        values, first, second = _evaluate(loss, rows, penalty, theta, margins)
        gradient = design.transpose_times(first) + penalty.gradient(theta)
        state = (theta.copy(), margins, values.copy(), first, second, gradient, np.ones(len(ids), dtype=bool))
        return cls(ids, design, rows, penalty, *state), values

    def iterate(self, loss: Loss, tolerance: float, results: _Results, *, newton: bool, last: bool) -> None:
        """One step with a backtracking line search, Newton's or a diagonal one (see ``_DIAGONAL_STEPS``);
        then, unless it is the ``last``, a chord step (the same factorisation at the new point) for the
        entities a Newton step left close to their optimum, which may settle them."""
        # Convergence and rounding are judged relative to the objective's magnitude.
        magnitude = np.maximum(1.0, np.abs(self.values))
        if newton:
            factor = self.design.factorize(self.second, self.penalty)
            step = factor.solve(-self.gradient)
            step_margins = self.design.margins(step)
            decrement = -np.einsum("ed,ed->e", self.gradient, step)
        else:
            factor = None
            step, step_margins, decrement = self._diagonal_step()
        # A non-finite step makes a non-finite decrement: the entity cannot be solved.
        solvable = self.running & np.isfinite(decrement)
        done = solvable & (decrement <= (2.0 * tolerance) * magnitude) & newton

        # Backtracking: halve each entity's step until its objective falls enough (up to rounding).
        pending = solvable.copy()
        scale = np.ones(len(self.ids))
        allowed = self.values + _ROUNDING * magnitude
        for _ in range(_MAX_HALVINGS):
            candidate = self.theta + scale[:, None] * step
            margins = self.margins + scale[:, None] * step_margins
            values, first, second = _evaluate(loss, self.rows, self.penalty, candidate, margins)
            accept = pending & (values <= allowed - _ARMIJO * scale * decrement)
            self._move(accept, candidate, margins, values, first, second)
            pending &= ~accept
            if not pending.any():
                break
            scale[pending] *= 0.5

        # A converged entity's final step counts even if rounding refused it; one that found no descent stalls.
        moved = (solvable & ~pending) | done
        results.iterations[self.ids[moved]] += 1
        results.converged[self.ids[done]] = True
        self.running &= moved & ~done
        if last or not self.running.any():
            return
        self.gradient = self.design.transpose_times(self.first) + self.penalty.gradient(self.theta)

        # After a small full step the Hessian has moved by a few percent at most: the chord step (this
        # factorisation again) estimates the decrement without forming and factorising a new Hessian.
        local = self.running & (scale == 1.0) & (decrement <= _LOCAL_DECREMENT)
        if factor is not None and local.any():
            chord = factor.solve(-self.gradient)
            threshold = (2.0 * tolerance) * np.maximum(1.0, np.abs(self.values))
            settled = local & (-np.einsum("ed,ed->e", self.gradient, chord) <= threshold)
            self.theta[settled] += chord[settled]
            results.iterations[self.ids[settled]] += 1
            results.converged[self.ids[settled]] = True
            self.running &= ~settled

    def _diagonal_step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The gradient scaled by the Hessian's diagonal, its length minimising the quadratic model along
        it: step, its margins, and the model decrease times two."""
        diagonal = self.design.gram_diagonal(self.second) + self.penalty.diagonal()
        direction = self.gradient * np.divide(-1.0, diagonal, out=np.zeros_like(diagonal), where=diagonal > 0)
        direction_margins = self.design.margins(direction)
        slope = -np.einsum("ed,ed->e", self.gradient, direction)
        curvature = np.einsum("er,er,er->e", self.second, direction_margins, direction_margins)
        curvature += np.einsum("ed,ed->e", direction, self.penalty.times(direction))
        length = np.divide(slope, curvature, out=np.zeros_like(slope), where=curvature > 0)
        return length[:, None] * direction, length[:, None] * direction_margins, length * slope

    def compacted(self, results: _Results) -> _WorkingSet:
        """Without the finished entities once they are most of the set (copying costs less than carrying
        them). ``results`` receives the coefficients first, so nothing is lost."""
        if self.running.sum() >= _COMPACT_BELOW * len(self.ids):
            return self
        results.theta[self.ids] = self.theta
        keep = np.flatnonzero(self.running)
        return _WorkingSet(
            self.ids[keep],
            self.design.take(keep),
            self.rows.take(keep),
            self.penalty.take(keep),
            self.theta[keep],
            self.margins[keep],
            self.values[keep],
            self.first[keep],
            self.second[keep],
            self.gradient[keep],
            self.running[keep],
        )

    def _move(
        self,
        accepted: np.ndarray,
        theta: np.ndarray,
        margins: np.ndarray,
        values: np.ndarray,
        first: np.ndarray,
        second: np.ndarray,
    ) -> None:
        """Move the accepted entities to their candidate point (in place: no gathered copies)."""
        if accepted.all():  # the usual case: the candidate arrays are fresh, so take them as they are
            self.theta, self.margins, self.values, self.first, self.second = theta, margins, values, first, second
            return
        rows = accepted[:, None]
        np.copyto(self.theta, theta, where=rows)
        np.copyto(self.margins, margins, where=rows)
        np.copyto(self.first, first, where=rows)
        np.copyto(self.second, second, where=rows)
        np.copyto(self.values, values, where=accepted)


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
    For the logistic loss the first steps are diagonal ones (see ``_DIAGONAL_STEPS``).
    """
    if tolerance <= 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    theta = np.array(theta, dtype=np.float64, copy=True)
    num_entities = theta.shape[0]
    results = _Results(theta, np.zeros(num_entities, dtype=np.int64), np.zeros(num_entities, dtype=bool))
    work, initial_value = _WorkingSet.start(loss, design, rows, penalty, theta, np.arange(num_entities))
    for iteration in range(max_iterations):
        if not work.running.any():
            break
        newton = loss is Loss.SQUARE or iteration >= _DIAGONAL_STEPS
        work.iterate(loss, tolerance, results, newton=newton, last=iteration == max_iterations - 1)
        work = work.compacted(results)
    theta[work.ids] = work.theta

    margins = design.margins(theta) + rows.offsets
    value, first, second = _evaluate(loss, rows, penalty, theta, margins)
    gradient = design.transpose_times(first) + penalty.gradient(theta)
    gradient_norm = np.abs(gradient).max(axis=1, initial=0.0)
    converged = results.converged & np.isfinite(value) & np.isfinite(theta).all(axis=1)
    return Solution(theta, value, initial_value, gradient_norm, results.iterations, converged, second)


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


def _evaluate(
    loss: Loss, rows: Rows, penalty: QuadraticPenalty, theta: np.ndarray, margins: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The objective per entity, and the loss derivatives per row times the row weights, at ``theta``
    (whose margins are given)."""
    row_values, first, second = loss.evaluate(margins, rows.labels)
    first *= rows.weights
    second *= rows.weights
    return np.einsum("er,er->e", rows.weights, row_values) + penalty.value(theta), first, second
