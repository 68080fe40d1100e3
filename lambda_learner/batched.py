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

# Largest padded block (entities x rows x coefficients) solved at once.
_BLOCK_ELEMENTS = 4_000_000


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
    """Where every row, feature value and coefficient of a batch goes in the padded blocks."""

    # Dense input in the global layout: rows are copied whole, no nonzero lists.
    copy_dense_rows: bool
    row_entity: np.ndarray
    row_position: np.ndarray
    coefficient_entity: np.ndarray
    coefficient_id: np.ndarray
    coefficient_column: np.ndarray
    coefficient_in_prior: np.ndarray
    prior_coefficient: np.ndarray
    entity_rows: np.ndarray
    entity_columns: np.ndarray
    nonzero_row: np.ndarray
    nonzero_column: np.ndarray
    nonzero_value: np.ndarray

    @classmethod
    def build(cls, batch: EntityBatch, *, global_columns: bool) -> _Layout:
        num_entities, num_features = batch.num_entities, batch.num_features
        entity_rows = np.diff(batch.row_splits)
        row_entity = np.repeat(np.arange(num_entities), entity_rows)
        row_position = np.arange(len(row_entity)) - batch.row_splits[row_entity]
        prior_entity = np.repeat(np.arange(num_entities), np.diff(batch.prior_splits))
        prior_keys = prior_entity * num_features + batch.prior_ids

        dense_input = not sparse.issparse(batch.features)
        copy_dense_rows = dense_input and global_columns
        if copy_dense_rows:
            nonzero_row = nonzero_column = nonzero_value = np.zeros(0, dtype=np.int64)
        else:
            matrix = sparse.csr_array(batch.features)
            matrix.sum_duplicates()
            nonzero_row = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
            nonzero_column, nonzero_value = matrix.indices, matrix.data

        # Every entity's coefficients as keys entity * F + id, sorted: its rows' features and its prior's.
        if global_columns:
            present = np.zeros((num_entities, num_features), dtype=bool)
            if copy_dense_rows:
                filled = entity_rows > 0
                starts = batch.row_splits[:-1][filled]
                present[filled] = np.logical_or.reduceat(batch.features != 0, starts, axis=0) if len(starts) else False
            else:
                present[row_entity[nonzero_row], nonzero_column] = True
            present[prior_entity, batch.prior_ids] = True
            keys = np.flatnonzero(present)
        else:
            row_keys = row_entity[nonzero_row] * num_features + nonzero_column
            keys = np.unique(np.concatenate([row_keys, prior_keys]))
        coefficient_entity, coefficient_id = np.divmod(keys, num_features)
        if global_columns:
            coefficient_column = coefficient_id
            entity_columns = np.full(num_entities, num_features)
        else:
            first = np.searchsorted(coefficient_entity, np.arange(num_entities))
            coefficient_column = np.arange(len(keys)) - first[coefficient_entity]
            entity_columns = np.bincount(coefficient_entity, minlength=num_entities)
            nonzero_column = coefficient_column[np.searchsorted(keys, row_keys)]
        prior_coefficient = np.searchsorted(keys, prior_keys)
        in_prior = np.zeros(len(keys), dtype=bool)
        in_prior[prior_coefficient] = True
        return cls(
            copy_dense_rows=copy_dense_rows,
            row_entity=row_entity,
            row_position=row_position,
            coefficient_entity=coefficient_entity,
            coefficient_id=coefficient_id,
            coefficient_column=coefficient_column,
            coefficient_in_prior=in_prior,
            prior_coefficient=prior_coefficient,
            entity_rows=entity_rows,
            entity_columns=entity_columns,
            nonzero_row=nonzero_row,
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
            per_block = max(1, _BLOCK_ELEMENTS // (num_rows * num_columns))
            for start in range(0, len(group), per_block):
                yield group[start : start + per_block], num_rows, num_columns

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
        slot_of = np.full(batch.num_entities, -1)
        slot_of[entities] = np.arange(len(entities))
        size = len(entities)
        labels, weights, offsets, features = self._pack_rows(batch, entities, slot_of, num_rows, num_columns)
        labels = loss.prepare_labels(labels)

        coefficients = np.flatnonzero(slot_of[self.coefficient_entity] >= 0)
        coefficient_slots = slot_of[self.coefficient_entity[coefficients]]
        coefficient_columns = self.coefficient_column[coefficients]
        used = np.zeros((size, num_columns), dtype=bool)
        used[coefficient_slots, coefficient_columns] = True

        prior_mean = np.zeros((size, num_columns))
        prior_precision = np.full((size, num_columns), float(penalty))
        prior_entries = np.flatnonzero(slot_of[self.coefficient_entity[self.prior_coefficient]] >= 0)
        prior_targets = self.prior_coefficient[prior_entries]
        prior_slots = slot_of[self.coefficient_entity[prior_targets]]
        prior_columns = self.coefficient_column[prior_targets]
        prior_mean[prior_slots, prior_columns] = batch.prior_means[prior_entries]
        variances = batch.prior_variances[prior_entries]
        prior_precision[prior_slots, prior_columns] = np.where(np.isnan(variances), penalty, 1.0 / variances)

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
        self, batch: EntityBatch, entities: np.ndarray, slot_of: np.ndarray, num_rows: int, num_columns: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Labels, weights, offsets ``(E, R)`` and features ``(E, R, D)`` of the block's entities."""
        size = len(entities)
        if entities[-1] - entities[0] + 1 == size and (self.entity_rows[entities] == num_rows).all():
            # Consecutive entities with the same row count: the flat arrays reshape as they are.
            rows = slice(batch.row_splits[entities[0]], batch.row_splits[entities[-1] + 1])
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
            row_range = np.flatnonzero(slot_of[self.row_entity] >= 0)
            row_slot, row_position = slot_of[self.row_entity[row_range]], self.row_position[row_range]
            labels, weights, offsets = np.ones((size, num_rows)), np.zeros((size, num_rows)), np.zeros((size, num_rows))
            labels[row_slot, row_position] = batch.labels[row_range]
            weights[row_slot, row_position] = batch.weights[row_range]
            offsets[row_slot, row_position] = batch.offsets[row_range]

        features = np.zeros((size, num_rows, num_columns))
        if self.copy_dense_rows:
            features[row_slot, row_position, :] = batch.features[row_range]
        else:
            nonzeros = np.flatnonzero(slot_of[self.row_entity[self.nonzero_row]] >= 0)
            nonzero_rows = self.nonzero_row[nonzeros]
            features[
                slot_of[self.row_entity[nonzero_rows]],
                self.row_position[nonzero_rows],
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


def _size_class(sizes: np.ndarray) -> np.ndarray:
    """Sizes grouped by powers of two, so padding wastes at most half a block."""
    return np.ceil(np.log2(np.maximum(sizes, 1))).astype(np.int64)


def _check_splits(name: str, splits: np.ndarray, total: int) -> None:
    if len(splits) == 0 or splits[0] != 0 or splits[-1] != total or (np.diff(splits) < 0).any():
        raise ValueError(f"{name} must start at 0, never decrease and end at {total}")
