"""The batched solver: many entities' updates at once, from flat arrays.

Input is an :class:`EntityBatch`: rows sorted by entity (``row_splits`` marks each
entity's rows), a feature matrix whose column ``j`` is feature id ``j`` (column 0
is the intercept by convention, set by the caller), and each entity's prior as flat
(id, mean, variance) segments. An entity's coefficients are the features of its rows
plus those of its prior. The solver packs entities of similar size into zero-padded
dense blocks and runs one vectorised Newton solve per block (no Python loop per
entity); the result is flat again, in the same entity order.

With few distinct features (``dense_layout_limit``) every entity uses the global
column layout; the columns an entity lacks get a unit penalty and zero data, so
they stay at zero and change nothing. Otherwise each entity's coefficients are
renumbered to a compact local layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from lambda_learner.losses import Loss
from lambda_learner.solver import DEFAULT_MAX_ITERATIONS, DEFAULT_TOLERANCE, Design, QuadraticPenalty, Rows, minimize
from lambda_learner.trainers import HessianType

# Largest padded block (entities x rows x coefficients) solved at once. Small enough that a block's
# arrays stay in cache from one step of an iteration to the next (a few MB), large enough that the
# per-call overhead of the vectorised steps is spread over hundreds of entities.
_BLOCK_ELEMENTS = 350_000


@dataclass(frozen=True)
class EntityBatch:
    """Many entities' rows and priors as flat arrays.

    Entity e owns rows ``row_splits[e]:row_splits[e + 1]`` (of ``labels``, ``weights``,
    ``offsets`` and ``features``) and prior coefficients ``prior_splits[e]:prior_splits[e + 1]``
    (of ``prior_ids``, ``prior_means`` and ``prior_variances``); prior ids are feature columns.
    ``features`` is dense ``(N, F)`` or sparse CSR; ``prior_variances`` may hold NaN
    for a coefficient whose variance is unknown (its precision is then ``penalty``).

    >>> import numpy as np
    >>> from lambda_learner import EntityBatch
    >>> batch = EntityBatch(  # entity 0: rows 0-2, a prior on its intercept; entity 1: row 3, no prior
    ...     row_splits=np.array([0, 3, 4]),
    ...     labels=np.array([1.0, 0.0, 1.0, 1.0]), weights=np.ones(4), offsets=np.zeros(4),
    ...     features=np.array([[1.0, 0.5], [1.0, -1.0], [1.0, 2.0], [1.0, 0.0]]),  # column 0: the intercept
    ...     prior_splits=np.array([0, 1, 1]),
    ...     prior_ids=np.array([0]), prior_means=np.array([0.3]), prior_variances=np.array([0.5]),
    ... )
    >>> batch.num_entities, batch.num_features
    (2, 2)
    >>> batch.validate()  # silent when consistent
    >>> from dataclasses import replace
    >>> replace(batch, weights=np.array([1.0, -1.0, 1.0, 1.0])).validate()
    Traceback (most recent call last):
    ...
    ValueError: weights must be non-negative
    """

    row_splits: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    offsets: np.ndarray
    features: np.ndarray | sparse.csr_array
    prior_splits: np.ndarray
    prior_ids: np.ndarray
    prior_means: np.ndarray
    prior_variances: np.ndarray

    @property
    def num_entities(self) -> int:
        return len(self.row_splits) - 1

    @property
    def num_features(self) -> int:
        return self.features.shape[1]

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent or non-finite input."""
        num_rows = self.features.shape[0]
        _check_splits("row_splits", self.row_splits, num_rows)
        _check_splits("prior_splits", self.prior_splits, len(self.prior_ids))
        if len(self.prior_splits) != len(self.row_splits):
            raise ValueError("row_splits and prior_splits must describe the same entities")
        for name in ("labels", "weights", "offsets"):
            values = getattr(self, name)
            if len(values) != num_rows:
                raise ValueError(f"{name} has {len(values)} values for {num_rows} rows")
            if not np.isfinite(values).all():
                raise ValueError(f"{name} must be finite")
        if (self.weights < 0).any():
            raise ValueError("weights must be non-negative")
        values = self.features.data if sparse.issparse(self.features) else self.features
        if not np.isfinite(values).all():
            raise ValueError("feature values must be finite")
        if len(self.prior_means) != len(self.prior_ids) or len(self.prior_variances) != len(self.prior_ids):
            raise ValueError("prior_ids, prior_means and prior_variances must have the same length")
        if len(self.prior_ids) and (self.prior_ids.min() < 0 or self.prior_ids.max() >= self.num_features):
            raise ValueError(f"prior ids must be feature columns in [0, {self.num_features})")
        if not np.isfinite(self.prior_means).all():
            raise ValueError("prior means must be finite")
        known = ~np.isnan(self.prior_variances)
        if not (self.prior_variances[known] > 0).all():
            raise ValueError("prior variances must be positive (or NaN for unknown)")


@dataclass(frozen=True)
class BatchResult:
    """Per entity: updated coefficients as flat (id, mean, variance) segments, and how the solve went.

    A failed entity (``converged`` False) keeps its prior segment unchanged.
    ``loss_before`` and ``loss_after`` are the weighted data loss of the entity's rows at
    the prior mean and at the update (progressive validation comes free with the update).
    """

    coefficient_splits: np.ndarray
    coefficient_ids: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    converged: np.ndarray
    iterations: np.ndarray
    gradient_norm: np.ndarray
    loss_before: np.ndarray
    loss_after: np.ndarray


@dataclass(frozen=True)
class BatchedSolver:
    """The per-entity objective (see docs/math.md) solved for a whole :class:`EntityBatch`.

    Each entity minimises ``loss + (1 - delta) lambda/2 |theta|^2 + delta/2 (theta - theta0)' H0 (theta - theta0)``
    with its prior means ``theta0`` and precisions ``H0 = 1 / prior variance`` (``penalty`` where the
    variance is NaN or the prior lacks the coefficient): the same update as
    :class:`~lambda_learner.trainers.TrainerSequentialBayesianLogisticLossWithL2` (logistic loss) or its
    square-loss twin, for every entity at once. ``penalty`` is lambda >= 0, the L2 scale; ``delta``
    the forgetting factor in [0, 1]: 1 is the exact recursive Bayesian update, 0 forgets the prior.
    ``hessian_type`` sets the returned variances (``1 / diagonal`` of the posterior precision
    for FULL and DIAGONAL, 1 for IDENTITY, NaN for NONE).

    >>> import numpy as np
    >>> from lambda_learner import BatchedSolver, EntityBatch, Loss
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=40)
    >>> labels = (rng.random(40) < 1 / (1 + np.exp(-(0.5 + x)))).astype(float)
    >>> batch = EntityBatch(  # entity 0: 30 rows and a prior on its intercept; entity 1: 10 rows, no prior
    ...     row_splits=np.array([0, 30, 40]), labels=labels, weights=np.ones(40), offsets=np.zeros(40),
    ...     features=np.column_stack([np.ones(40), x]),
    ...     prior_splits=np.array([0, 1, 1]),
    ...     prior_ids=np.array([0]), prior_means=np.array([0.3]), prior_variances=np.array([0.5]),
    ... )
    >>> result = BatchedSolver(Loss.LOGISTIC, penalty=1.0, delta=1.0).solve(batch)
    >>> print(result.converged, result.coefficient_splits, result.coefficient_ids)  # (id, mean, variance) segments
    [ True  True] [0 2 4] [0 1 0 1]
    >>> print(np.round(result.means, 2), np.round(result.variances, 3))
    [ 1.02  1.08 -0.35  0.65] [0.131 0.233 0.299 0.479]
    >>> print(np.round(result.loss_before, 2), np.round(result.loss_after, 2))  # data loss at the prior, the update
    [19.03  6.93] [14.04  6.07]
    """

    loss: Loss
    penalty: float
    delta: float
    hessian_type: HessianType = HessianType.FULL
    tolerance: float = DEFAULT_TOLERANCE
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    dense_layout_limit: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.delta <= 1.0:
            raise ValueError(f"delta must be in [0, 1], got {self.delta}")
        if self.penalty < 0:
            raise ValueError(f"penalty must be non-negative, got {self.penalty}")

    def solve(self, batch: EntityBatch) -> BatchResult:
        batch.validate()
        layout = _Layout.build(batch, global_columns=batch.num_features <= self.dense_layout_limit)
        num_entities = batch.num_entities
        num_coefficients = len(layout.coefficient_entity)
        means = np.zeros(num_coefficients)
        variances = np.full(num_coefficients, np.nan)
        converged = np.zeros(num_entities, dtype=bool)
        iterations = np.zeros(num_entities, dtype=np.int64)
        gradient_norm = np.zeros(num_entities)
        loss_before = np.zeros(num_entities)
        loss_after = np.zeros(num_entities)

        for entities, num_rows, num_columns in layout.blocks():
            block = layout.pack(batch, entities, num_rows, num_columns, self.loss, self.penalty, self.delta)
            design = Design(block.features)
            solution = minimize(
                self.loss,
                design,
                block.rows,
                block.penalty,
                block.prior_mean,
                tolerance=self.tolerance,
                max_iterations=self.max_iterations,
            )
            slots, columns, coefficients = block.coefficient_slots, block.coefficient_columns, block.coefficients
            means[coefficients] = solution.theta[slots, columns]
            variances[coefficients] = self._variances(design, block.penalty, solution.row_curvature)[slots, columns]
            converged[entities] = solution.converged
            iterations[entities] = solution.iterations
            gradient_norm[entities] = solution.gradient_norm
            loss_before[entities] = solution.initial_value - block.penalty.value(block.prior_mean)
            loss_after[entities] = solution.value - block.penalty.value(solution.theta)

        return layout.result(batch, means, variances, converged, iterations, gradient_norm, loss_before, loss_after)

    def _variances(self, design: Design, penalty: QuadraticPenalty, row_curvature: np.ndarray) -> np.ndarray:
        if self.hessian_type is HessianType.NONE:
            return np.full(penalty.curvature.shape, np.nan)
        if self.hessian_type is HessianType.IDENTITY:
            return np.ones(penalty.curvature.shape)
        with np.errstate(divide="ignore"):  # zero precision only where a solve failed; the prior replaces it
            return 1.0 / (design.gram_diagonal(row_curvature) + penalty.curvature)


@dataclass(frozen=True)
class _Block:
    """One padded block of entities, ready for the Newton solver."""

    features: np.ndarray
    rows: Rows
    penalty: QuadraticPenalty
    prior_mean: np.ndarray
    coefficients: np.ndarray
    coefficient_slots: np.ndarray
    coefficient_columns: np.ndarray


@dataclass(frozen=True)
class _Layout:
    """Where every row, feature value and coefficient of a batch goes in the padded blocks.

    Everything is indexed so that packing a block costs in proportion to the block, not the batch.
    """

    # Dense input in the global layout: rows are copied whole, no nonzero lists.
    copy_dense_rows: bool
    coefficient_entity: np.ndarray
    coefficient_id: np.ndarray
    coefficient_column: np.ndarray
    # Entity e's coefficients are coefficient_splits[e]:coefficient_splits[e + 1] (sorted by entity, then id).
    coefficient_splits: np.ndarray
    coefficient_in_prior: np.ndarray
    # Per coefficient: its prior mean (0 outside the prior) and variance (NaN outside the prior or unknown).
    coefficient_prior_mean: np.ndarray
    coefficient_prior_variance: np.ndarray
    prior_coefficient: np.ndarray
    entity_rows: np.ndarray
    entity_columns: np.ndarray
    # Sparse or local layout: the CSR nonzeros of each row, their block column and value.
    nonzero_splits: np.ndarray
    nonzero_column: np.ndarray
    nonzero_value: np.ndarray

    @classmethod
    def build(cls, batch: EntityBatch, *, global_columns: bool) -> _Layout:
        num_entities, num_features = batch.num_entities, batch.num_features
        entity_rows = np.diff(batch.row_splits)
        prior_entity = np.repeat(np.arange(num_entities), np.diff(batch.prior_splits))
        prior_keys = prior_entity * num_features + batch.prior_ids

        dense_input = not sparse.issparse(batch.features)
        copy_dense_rows = dense_input and global_columns
        if copy_dense_rows:
            nonzero_splits = nonzero_column = nonzero_value = np.zeros(0, dtype=np.int64)
        else:
            matrix = sparse.csr_array(batch.features)
            matrix.sum_duplicates()
            nonzero_splits, nonzero_column, nonzero_value = matrix.indptr, matrix.indices, matrix.data
            nonzero_entity = np.repeat(np.arange(num_entities), np.diff(nonzero_splits[batch.row_splits]))

        # Every entity's coefficients as keys entity * F + id, sorted: its rows' features and its prior's.
        if global_columns:
            present = np.zeros((num_entities, num_features), dtype=bool)
            if copy_dense_rows:
                filled = entity_rows > 0
                starts = batch.row_splits[:-1][filled]
                present[filled] = np.logical_or.reduceat(batch.features != 0, starts, axis=0) if len(starts) else False
            else:
                present[nonzero_entity, nonzero_column] = True
            present.reshape(-1)[prior_keys] = True
            keys = np.flatnonzero(present)
            prior_coefficient = (np.cumsum(present.reshape(-1)) - 1)[prior_keys]
        else:
            row_keys = nonzero_entity * num_features + nonzero_column
            keys = np.unique(np.concatenate([row_keys, prior_keys]))
            prior_coefficient = np.searchsorted(keys, prior_keys)
        coefficient_entity, coefficient_id = np.divmod(keys, num_features)
        coefficient_splits = np.zeros(num_entities + 1, dtype=np.int64)
        np.cumsum(np.bincount(coefficient_entity, minlength=num_entities), out=coefficient_splits[1:])
        if global_columns:
            coefficient_column = coefficient_id
            entity_columns = np.full(num_entities, num_features)
        else:
            coefficient_column = np.arange(len(keys)) - coefficient_splits[coefficient_entity]
            entity_columns = np.diff(coefficient_splits)
            nonzero_column = coefficient_column[np.searchsorted(keys, row_keys)]
        in_prior = np.zeros(len(keys), dtype=bool)
        in_prior[prior_coefficient] = True
        prior_mean = np.zeros(len(keys))
        prior_mean[prior_coefficient] = batch.prior_means
        prior_variance = np.full(len(keys), np.nan)
        prior_variance[prior_coefficient] = batch.prior_variances
        return cls(
            copy_dense_rows=copy_dense_rows,
            coefficient_entity=coefficient_entity,
            coefficient_id=coefficient_id,
            coefficient_column=coefficient_column,
            coefficient_splits=coefficient_splits,
            coefficient_in_prior=in_prior,
            coefficient_prior_mean=prior_mean,
            coefficient_prior_variance=prior_variance,
            prior_coefficient=prior_coefficient,
            entity_rows=entity_rows,
            entity_columns=entity_columns,
            nonzero_splits=nonzero_splits,
            nonzero_column=nonzero_column,
            nonzero_value=nonzero_value,
        )

    def blocks(self):
        """Yield (entities, padded rows, padded columns) for groups of entities of similar size."""
        row_class = _size_class(self.entity_rows)
        column_class = _size_class(self.entity_columns)
        classes = row_class * 64 + column_class
        order = np.argsort(classes, kind="stable")
        boundaries = np.flatnonzero(np.diff(classes[order])) + 1
        for group in np.split(order, boundaries):
            if len(group) == 0:
                continue
            num_rows = max(1, int(self.entity_rows[group].max()))
            num_columns = max(1, int(self.entity_columns[group].max()))
            # Equal blocks: a small remainder block would cost as much Python overhead as a full one.
            num_blocks = -(-len(group) * num_rows * num_columns // _BLOCK_ELEMENTS)
            for part in np.array_split(group, num_blocks):
                yield part, num_rows, num_columns

    def pack(
        self,
        batch: EntityBatch,
        entities: np.ndarray,
        num_rows: int,
        num_columns: int,
        loss: Loss,
        penalty: float,
        delta: float,
    ) -> _Block:
        size = len(entities)
        labels, weights, offsets, features = self._pack_rows(batch, entities, num_rows, num_columns)
        labels = loss.prepare_labels(labels)

        counts = np.diff(self.coefficient_splits)[entities]
        coefficients = _ranges(self.coefficient_splits[entities], counts)
        coefficient_slots = np.repeat(np.arange(size), counts)
        coefficient_columns = self.coefficient_column[coefficients]
        # Flat positions in the (size, num_columns) block: one-dimensional scatters are the cheap ones.
        positions = coefficient_slots * num_columns + coefficient_columns
        used = np.zeros((size, num_columns), dtype=bool)
        used.reshape(-1)[positions] = True
        prior_mean = np.zeros((size, num_columns))
        prior_mean.reshape(-1)[positions] = self.coefficient_prior_mean[coefficients]
        prior_precision = np.full((size, num_columns), float(penalty))
        variances = self.coefficient_prior_variance[coefficients]
        prior_precision.reshape(-1)[positions] = np.where(np.isnan(variances), penalty, 1.0 / variances)

        quadratic = QuadraticPenalty.from_prior(prior_mean, prior_precision, penalty, delta)
        # Columns the entity does not have: unit curvature, no pull; they stay at zero.
        quadratic.curvature[~used] = 1.0
        quadratic.linear[~used] = 0.0
        return _Block(
            features=features,
            rows=Rows(labels, weights, offsets),
            penalty=quadratic,
            prior_mean=prior_mean,
            coefficients=coefficients,
            coefficient_slots=coefficient_slots,
            coefficient_columns=coefficient_columns,
        )

    def _pack_rows(
        self, batch: EntityBatch, entities: np.ndarray, num_rows: int, num_columns: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Labels, weights, offsets ``(E, R)`` and features ``(E, R, D)`` of the block's entities."""
        size = len(entities)
        counts = self.entity_rows[entities]
        first_row = batch.row_splits[entities]
        if entities[-1] - entities[0] + 1 == size and (counts == num_rows).all():
            # Consecutive entities with the same row count: the flat arrays reshape as they are.
            rows = slice(first_row[0], first_row[0] + size * num_rows)
            shape = (size, num_rows)
            labels, weights, offsets = (
                batch.labels[rows].reshape(shape),
                batch.weights[rows].reshape(shape),
                batch.offsets[rows].reshape(shape),
            )
            if self.copy_dense_rows:
                return labels, weights, offsets, np.asarray(batch.features[rows]).reshape(*shape, num_columns)
            row_slot = np.repeat(np.arange(size), num_rows)
            row_position = np.tile(np.arange(num_rows), size)
            row_range = np.arange(rows.start, rows.stop)
        else:
            row_range = _ranges(first_row, counts)
            row_slot = np.repeat(np.arange(size), counts)
            row_position = row_range - np.repeat(first_row, counts)
            labels, weights, offsets = np.ones((size, num_rows)), np.zeros((size, num_rows)), np.zeros((size, num_rows))
            labels[row_slot, row_position] = batch.labels[row_range]
            weights[row_slot, row_position] = batch.weights[row_range]
            offsets[row_slot, row_position] = batch.offsets[row_range]

        features = np.zeros((size, num_rows, num_columns))
        if self.copy_dense_rows:
            features[row_slot, row_position, :] = batch.features[row_range]
        else:
            row_nonzeros = np.diff(self.nonzero_splits)[row_range]
            nonzeros = _ranges(self.nonzero_splits[row_range], row_nonzeros)
            features[
                np.repeat(row_slot, row_nonzeros),
                np.repeat(row_position, row_nonzeros),
                self.nonzero_column[nonzeros],
            ] = self.nonzero_value[nonzeros]
        return labels, weights, offsets, features

    def result(
        self,
        batch: EntityBatch,
        means: np.ndarray,
        variances: np.ndarray,
        converged: np.ndarray,
        iterations: np.ndarray,
        gradient_norm: np.ndarray,
        loss_before: np.ndarray,
        loss_after: np.ndarray,
    ) -> BatchResult:
        """Flat output; a failed entity's segment is its prior, as given."""
        failed = ~converged[self.coefficient_entity]
        prior_order = self.prior_coefficient
        means[prior_order[failed[prior_order]]] = batch.prior_means[failed[prior_order]]
        variances[prior_order[failed[prior_order]]] = batch.prior_variances[failed[prior_order]]
        keep = ~failed | self.coefficient_in_prior
        counts = np.bincount(self.coefficient_entity[keep], minlength=batch.num_entities)
        return BatchResult(
            coefficient_splits=np.concatenate([[0], np.cumsum(counts)]),
            coefficient_ids=self.coefficient_id[keep],
            means=means[keep],
            variances=variances[keep],
            converged=converged,
            iterations=iterations,
            gradient_norm=gradient_norm,
            loss_before=loss_before,
            loss_after=loss_after,
        )


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenated ranges ``starts[i] : starts[i] + counts[i]``."""
    ends = np.cumsum(counts)
    return np.repeat(starts - ends + counts, counts) + np.arange(ends[-1] if len(ends) else 0)


def _size_class(sizes: np.ndarray) -> np.ndarray:
    """Sizes grouped by powers of two, so padding wastes at most half a block."""
    return np.ceil(np.log2(np.maximum(sizes, 1))).astype(np.int64)


def _check_splits(name: str, splits: np.ndarray, total: int) -> None:
    if len(splits) == 0 or splits[0] != 0 or splits[-1] != total or (np.diff(splits) < 0).any():
        raise ValueError(f"{name} must start at 0, never decrease and end at {total}")
