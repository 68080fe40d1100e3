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


# lambda-learner 0.1.0's default forgetting factor (chosen there by offline simulations).
DEFAULT_DELTA = 0.8


class Trainer:
    """Minimises ``loss + (1 - delta) lambda/2 |theta|^2 + delta/2 (theta - theta0)' H0 (theta - theta0)``.

    ``theta0`` and ``H0`` come from ``initial_model`` (a missing Hessian means ``H0 = lambda I``).
    A subclass picks the per-row loss (``row_loss``) and whether it is a sequential Bayesian
    update (``sequential``); this one constructor serves them all, with lambda-learner 0.1.0's
    keyword arguments:

    - ``training_data``, ``initial_model``: the entity's mini-batch and its current model
      (the starting point, and for a sequential update the prior);
    - ``hessian_type``: the posterior precision to return; default FULL for the sequential
      trainers and NONE for the plain L2 ones;
    - ``penalty``: lambda >= 0, the L2 scale (and the prior precision of a coefficient without one);
    - ``delta``: the forgetting factor in [0, 1], sequential trainers only (default 0.8): 1 is the
      exact recursive Bayesian update, 0 forgets the prior (plain L2 on the batch). The plain L2
      trainers take no ``delta``: theirs is 0.
    """

    row_loss: ClassVar[Loss]
    sequential: ClassVar[bool] = False

    def __init__(
        self,
        *,
        training_data: IndexedDataset,
        initial_model: IndexedModel,
        hessian_type: HessianType | None = None,
        penalty: float = 0.0,
        delta: float | None = None,
    ):
        if not hasattr(self, "row_loss"):
            raise TypeError(f"{type(self).__name__} has no row_loss: use one of the trainers")
        if delta is None:
            delta = DEFAULT_DELTA if self.sequential else 0.0
        elif not self.sequential:
            raise TypeError(
                f"{type(self).__name__} takes no delta (it ignores the prior); a sequential Bayesian trainer does"
            )
        if hessian_type is None:
            hessian_type = HessianType.FULL if self.sequential else HessianType.NONE
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
    """Linear regression: ``1/2 sum w (x.theta + o - y)^2 + lambda/2 |theta|^2``.

    ``penalty`` is lambda; the initial model is only the starting point (no ``delta``).
    With ``hessian_type=DIAGONAL`` the model carries variances ``1 / (sum_i w_i x_ij^2 + lambda)``.

    >>> import numpy as np
    >>> from scipy import sparse
    >>> from lambda_learner import HessianType, IndexedDataset, IndexedModel, TrainerSquareLossWithL2
    >>> rng = np.random.default_rng(0)
    >>> X = np.column_stack([np.ones(100), rng.normal(size=100)])  # column 0: the intercept
    >>> y = X @ [1.0, -2.0] + 0.1 * rng.normal(size=100)
    >>> data = IndexedDataset(sparse.csr_array(X), labels=y, labels_weights=np.ones(100), offsets=np.zeros(100))
    >>> model, loss, metadata = TrainerSquareLossWithL2(
    ...     training_data=data, initial_model=IndexedModel(np.zeros(2)), penalty=1.0,
    ...     hessian_type=HessianType.DIAGONAL,
    ... ).train()
    >>> print(np.round(model.theta, 2), metadata.converged)
    [ 0.98 -1.97] True
    >>> print(np.round(model.variances, 4))
    [0.0099 0.0106]
    """

    row_loss = Loss.SQUARE


class TrainerLogisticLossWithL2(Trainer):
    """Logistic regression: ``sum w log(1 + exp(-y (x.theta + o))) + lambda/2 |theta|^2``.

    Labels > 0 are positive. ``penalty`` is lambda: the larger, the more the coefficients
    shrink towards 0. The initial model is only the starting point (no ``delta``).

    >>> import numpy as np
    >>> from scipy import sparse
    >>> from lambda_learner import IndexedDataset, IndexedModel, TrainerLogisticLossWithL2
    >>> rng = np.random.default_rng(0)
    >>> X = np.column_stack([np.ones(200), rng.normal(size=200)])
    >>> y = (rng.random(200) < 1 / (1 + np.exp(-(X @ [-0.5, 1.5])))).astype(float)  # truth: -0.5, 1.5
    >>> data = IndexedDataset(sparse.csr_array(X), labels=y, labels_weights=np.ones(200), offsets=np.zeros(200))
    >>> for penalty in (0.0, 100.0):
    ...     model, loss, metadata = TrainerLogisticLossWithL2(
    ...         training_data=data, initial_model=IndexedModel(np.zeros(2)), penalty=penalty
    ...     ).train()
    ...     print(penalty, np.round(model.theta, 2), metadata.converged)
    0.0 [-0.6   1.45] True
    100.0 [-0.14  0.33] True
    """

    row_loss = Loss.LOGISTIC


class TrainerSequentialBayesianLogisticLossWithL2(Trainer):
    """Lambda Learner's incremental update: logistic loss with the previous model as a Gaussian prior.

    ``delta`` weighs the prior (the initial model's means and variances): at 1 the update is
    the exact recursive Laplace update, at 0 the prior is forgotten and the update is plain
    L2 with ``penalty`` (lambda) on this batch alone; in between, the prior counts for less.
    ``penalty`` is also the prior precision of a coefficient the prior lacks. The updated
    variances are ``1 / diagonal of delta H0 + X' D X + (1 - delta) lambda I``.

    >>> from lambda_learner import (
    ...     Feature, IndexMap, TrainerSequentialBayesianLogisticLossWithL2, TrainingRecord,
    ...     index_domain_coeffs_to_nt_domain_coeffs, nt_domain_coeffs_to_index_domain_coeffs,
    ...     nt_domain_data_to_index_domain_data,
    ... )
    >>> means = [Feature("intercept", "intercept", -1.0), Feature("country", "us", 0.5)]
    >>> variances = [Feature("intercept", "intercept", 0.1), Feature("country", "us", 0.1)]
    >>> records = [  # a batch where "us" rows are all positive, the others half
    ...     TrainingRecord(label=float(i % 4 != 0), weight=1.0, offset=0.0, features=[Feature("country", "us", i % 2)])
    ...     for i in range(40)
    ... ]
    >>> index_map, _ = IndexMap.from_records_means_and_variances(records, means, variances)
    >>> data = nt_domain_data_to_index_domain_data(records, index_map)
    >>> prior = nt_domain_coeffs_to_index_domain_coeffs(means, variances, index_map, 1.0)
    >>> for delta in (1.0, 0.8, 0.0):
    ...     model, loss, metadata = TrainerSequentialBayesianLogisticLossWithL2(
    ...         training_data=data, initial_model=prior, penalty=1.0, delta=delta
    ...     ).train()
    ...     updated, updated_variances = index_domain_coeffs_to_nt_domain_coeffs(model, index_map)
    ...     print(delta, metadata.converged, round(updated[("country", "us")], 2),
    ...           round(updated_variances[("country", "us")], 3))
    1.0 True 1.1 0.07
    0.8 True 1.16 0.082
    0.0 True 1.92 0.366
    """

    row_loss = Loss.LOGISTIC
    sequential = True


class TrainerSequentialBayesianSquareLossWithL2(Trainer):
    """The same incremental update for regression (square loss): exact recursive least squares at delta 1.

    With ``delta=1`` updating on two batches in turn gives the ridge (``penalty`` = lambda)
    solution on both batches at once; with ``delta < 1`` the older batch counts for less.

    >>> import numpy as np
    >>> from scipy import sparse
    >>> from lambda_learner import (
    ...     IndexedDataset, IndexedModel, TrainerSequentialBayesianSquareLossWithL2, TrainerSquareLossWithL2,
    ... )
    >>> rng = np.random.default_rng(1)
    >>> X = np.column_stack([np.ones(60), rng.normal(size=60)])
    >>> y = X @ [0.5, 2.0] + rng.normal(size=60)
    >>> def rows(part):
    ...     return IndexedDataset(sparse.csr_array(X[part]), y[part], np.ones(len(y[part])), np.zeros(len(y[part])))
    >>> start = IndexedModel(np.zeros(2))  # no Hessian: the prior precision is lambda I
    >>> def update(part, model, delta):
    ...     return TrainerSequentialBayesianSquareLossWithL2(
    ...         training_data=rows(part), initial_model=model, penalty=2.0, delta=delta
    ...     ).train()
    >>> def ridge(part):
    ...     return TrainerSquareLossWithL2(training_data=rows(part), initial_model=start, penalty=2.0).train()[0]
    >>> first, _, _ = update(slice(0, 30), start, delta=1.0)
    >>> second, _, metadata = update(slice(30, 60), first, delta=1.0)
    >>> print(np.round(second.theta, 3), np.round(ridge(slice(0, 60)).theta, 3), metadata.converged)
    [0.423 1.837] [0.423 1.837] True
    >>> forgetful, _, _ = update(slice(30, 60), first, delta=0.0)  # delta 0: the first batch is forgotten
    >>> print(np.round(forgetful.theta, 3), np.round(ridge(slice(30, 60)).theta, 3))
    [0.451 1.876] [0.451 1.876]
    """

    row_loss = Loss.SQUARE
    sequential = True


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
