"""Per-entity trainers: one entity's records and model in, the updated model out.

The objectives are the contract in docs/math.md. Each trainer solves to tight
tolerance with the damped Newton method of :mod:`lambda_learner.solver` (the same
code the batched many-entity solver runs), uses sample weights in the loss, the
gradient and the Hessian, and returns the initial model unchanged when a solve fails.
Newton works with the dense ``D x D`` Hessian of the index map's columns, which suits
per-entity models (tens to a few thousand coefficients).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy import sparse

from lambda_learner.losses import Loss
from lambda_learner.representation import IndexedDataset, IndexedModel
from lambda_learner.solver import (
    DEFAULT_MAX_ITERATIONS,
    DEFAULT_TOLERANCE,
    Design,
    QuadraticPenalty,
    Rows,
    minimize,
    objective_gradient,
    objective_value,
)


class HessianType(enum.Enum):
    """What an update returns as the posterior precision.

    FULL: the whole matrix. DIAGONAL: its diagonal. IDENTITY: the identity. NONE: nothing.
    Variances are ``1 / diagonal`` for FULL and DIAGONAL alike.
    """

    FULL = "full"
    DIAGONAL = "diagonal"
    IDENTITY = "identity"
    NONE = "none"


@dataclass(frozen=True)
class TrainingMetadata:
    """How a solve went. When ``converged`` is False the initial model was returned unchanged."""

    converged: bool
    iterations: int
    gradient_norm: float

    @property
    def status(self) -> str:
        return "converged" if self.converged else "failed: returned the initial model"


class Trainer:
    """Minimises ``loss + (1 - delta) lambda/2 |theta|^2 + delta/2 (theta - theta0)' H0 (theta - theta0)``.

    ``theta0`` and ``H0`` come from ``initial_model`` (a missing Hessian means ``H0 = lambda I``).
    """

    row_loss: ClassVar[Loss]

    def __init__(
        self,
        *,
        training_data: IndexedDataset,
        initial_model: IndexedModel,
        hessian_type: HessianType,
        penalty: float,
        delta: float,
    ):
        if not 0.0 <= delta <= 1.0:
            raise ValueError(f"delta must be in [0, 1], got {delta}")
        if penalty < 0:
            raise ValueError(f"penalty must be non-negative, got {penalty}")
        num_features = training_data.num_features
        if initial_model.theta.shape != (num_features,):
            raise ValueError(
                f"initial model has {initial_model.theta.shape} coefficients, data has {num_features} columns"
            )
        self.data = training_data
        self.initial_model = initial_model
        self.hessian_type = hessian_type
        self.param_reg = float(penalty)
        self.param_delta = float(delta)
        self._design = Design(training_data.X.toarray()[None, :, :])
        self._rows = Rows(
            self.row_loss.prepare_labels(training_data.y)[None, :],
            training_data.w[None, :],
            training_data.offsets[None, :],
        )
        prior_mean = initial_model.theta[None, :]
        self._penalty = QuadraticPenalty.from_prior(
            prior_mean, _prior_precision(initial_model, penalty), penalty, delta
        )

    def loss(self, theta: np.ndarray) -> float:
        """The objective at ``theta``."""
        theta = np.asarray(theta, dtype=np.float64)[None, :]
        return float(objective_value(self.row_loss, self._design, self._rows, self._penalty, theta)[0])

    def gradient(self, theta: np.ndarray) -> np.ndarray:
        """The objective's gradient at ``theta``."""
        theta = np.asarray(theta, dtype=np.float64)[None, :]
        return objective_gradient(self.row_loss, self._design, self._rows, self._penalty, theta)[0]

    def train(
        self, *, tolerance: float = DEFAULT_TOLERANCE, max_iterations: int = DEFAULT_MAX_ITERATIONS
    ) -> tuple[IndexedModel, float, TrainingMetadata]:
        """Solve; return the updated model, the objective at it, and how the solve went."""
        solution = minimize(
            self.row_loss,
            self._design,
            self._rows,
            self._penalty,
            self.initial_model.theta[None, :],
            tolerance=tolerance,
            max_iterations=max_iterations,
        )
        metadata = TrainingMetadata(
            converged=bool(solution.converged[0]),
            iterations=int(solution.iterations[0]),
            gradient_norm=float(solution.gradient_norm[0]),
        )
        if not metadata.converged:
            return self.initial_model, self.loss(self.initial_model.theta), metadata
        theta = solution.theta[0]
        model = IndexedModel(theta, self._posterior_precision(solution.row_curvature))
        return model, float(solution.value[0]), metadata

    def _posterior_precision(self, row_curvature: np.ndarray) -> sparse.csc_array | None:
        """``delta H0 + X' D X + (1 - delta) lambda I`` at the optimum, in the requested form."""
        size = len(self.initial_model.theta)
        if self.hessian_type is HessianType.NONE:
            return None
        if self.hessian_type is HessianType.IDENTITY:
            return sparse.eye_array(size, format="csc")
        if self.hessian_type is HessianType.DIAGONAL:
            diagonal = self._design.gram_diagonal(row_curvature)[0] + self._penalty.diagonal()[0]
            return sparse.diags_array(diagonal, format="csc")
        return sparse.csc_array(self._design.hessian(row_curvature, self._penalty)[0])


class TrainerSquareLossWithL2(Trainer):
    """Linear regression: ``1/2 sum w (x.theta + o - y)^2 + lambda/2 |theta|^2``."""

    row_loss = Loss.SQUARE

    def __init__(
        self,
        *,
        training_data: IndexedDataset,
        initial_model: IndexedModel,
        hessian_type: HessianType = HessianType.NONE,
        penalty: float = 0.0,
    ):
        super().__init__(
            training_data=training_data,
            initial_model=initial_model,
            hessian_type=hessian_type,
            penalty=penalty,
            delta=0.0,
        )


class TrainerLogisticLossWithL2(Trainer):
    """Logistic regression: ``sum w log(1 + exp(-y (x.theta + o))) + lambda/2 |theta|^2``."""

    row_loss = Loss.LOGISTIC

    def __init__(
        self,
        *,
        training_data: IndexedDataset,
        initial_model: IndexedModel,
        hessian_type: HessianType = HessianType.NONE,
        penalty: float = 0.0,
    ):
        super().__init__(
            training_data=training_data,
            initial_model=initial_model,
            hessian_type=hessian_type,
            penalty=penalty,
            delta=0.0,
        )


class TrainerSequentialBayesianLogisticLossWithL2(Trainer):
    """Lambda Learner's incremental update: logistic loss with the previous model as a Gaussian prior."""

    row_loss = Loss.LOGISTIC

    def __init__(
        self,
        *,
        training_data: IndexedDataset,
        initial_model: IndexedModel,
        hessian_type: HessianType = HessianType.FULL,
        penalty: float = 0.0,
        delta: float = 0.8,
    ):
        super().__init__(
            training_data=training_data,
            initial_model=initial_model,
            hessian_type=hessian_type,
            penalty=penalty,
            delta=delta,
        )


class TrainerSequentialBayesianSquareLossWithL2(Trainer):
    """The same incremental update for regression (square loss): exact recursive least squares at delta 1."""

    row_loss = Loss.SQUARE

    def __init__(
        self,
        *,
        training_data: IndexedDataset,
        initial_model: IndexedModel,
        hessian_type: HessianType = HessianType.FULL,
        penalty: float = 0.0,
        delta: float = 0.8,
    ):
        super().__init__(
            training_data=training_data,
            initial_model=initial_model,
            hessian_type=hessian_type,
            penalty=penalty,
            delta=delta,
        )


def _prior_precision(model: IndexedModel, penalty: float) -> np.ndarray:
    """The prior precision as a diagonal ``(1, D)`` when it is one, else a full ``(1, D, D)``."""
    size = len(model.theta)
    if model.hessian is None:
        return np.full((1, size), float(penalty))
    hessian = (
        sparse.coo_array(model.hessian)
        if sparse.issparse(model.hessian)
        else sparse.coo_array(np.asarray(model.hessian))
    )
    off_diagonal = hessian.coords[0] != hessian.coords[1]
    if not np.any(hessian.data[off_diagonal]):
        return np.asarray(hessian.diagonal(), dtype=np.float64)[None, :]
    return hessian.toarray()[None, :, :]
