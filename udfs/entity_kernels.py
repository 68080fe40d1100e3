"""The random-effect kernels Spark calls per group: pandas frames in, flat numpy arrays to the solver, pandas out.

A group holds whole entities of one random-effect type (an entity bucket, or one entity
in the per-entity baseline). Spark hands over two frames per group (``cogroup``): the
entities' rows (of one micro-batch, or of several to apply in order: a rebase's replay)
and their current coefficients. Feature bags arrive flattened into
parallel arrays (``names``, ``terms``, ``values``), coefficients likewise (``names``,
``terms``, ``means``, ``variances``); the intercept is the name-term ``intercept/intercept``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from lambda_learner.batched import BatchedSolver, EntityBatch
from lambda_learner.losses import Loss
from lambda_learner.representation import INTERCEPT
from lambda_learner.scoring import CoefficientTable, hash_strings, table_scores
from udfs.arrays import SEPARATOR, flatten, name_term_codes, name_term_keys

ROW_FIELDS = [
    ("entity_id", "string"),
    ("row_key", "long"),
    ("sample_key", "long"),
    ("label", "double"),
    ("weight", "double"),
    ("offset", "double"),
    ("names", "array<string>"),
    ("terms", "array<string>"),
    ("values", "array<double>"),
    # The micro-batch that ingested the row; an entity's batches are applied in increasing order.
    # Optional: rows without it form one batch.
    ("batch_id", "long"),
]
COEFFICIENT_FIELDS = [
    ("entity_id", "string"),
    ("names", "array<string>"),
    ("terms", "array<string>"),
    ("means", "array<double>"),
    ("variances", "array<double>"),
    # The state's counts, handed through to the result so that no join is needed to advance them.
    ("updates", "long"),
    ("total_rows", "long"),
]
UPDATE_FIELDS = [
    *COEFFICIENT_FIELDS,
    ("had_prior", "boolean"),
    ("converged", "boolean"),
    ("iterations", "int"),
    ("rows", "long"),
    ("loss_before", "double"),
    ("loss_after", "double"),
    ("batches", "int"),
    ("converged_batches", "int"),
    ("converged_rows", "long"),
    ("failure", "string"),
    ("row_keys", "array<long>"),
    ("row_scores", "array<double>"),
]
SCORE_FIELDS = [("row_key", "long"), ("entity_id", "string"), ("score", "double")]

# Why an (entity, batch) update failed and kept the entity's state; None: it did not fail.
FAILURES = (
    None,
    "non_finite_input",  # a kept row's label, weight, offset or feature value is NaN or infinite
    "negative_weight",  # a kept row's weight is negative
    "non_finite_prior",  # a mean or variance of the entity's state is NaN or infinite, or a variance is <= 0
    "no_convergence",  # the solve stopped before converging
    "non_finite_result",  # the solve met non-finite numbers (objective, coefficient, variance or curvature w x^2)
)
FAILURE_REASONS = [reason for reason in FAILURES if reason is not None]
_NON_FINITE_INPUT, _NEGATIVE_WEIGHT, _NON_FINITE_PRIOR, _NO_CONVERGENCE, _NON_FINITE_RESULT = range(1, 6)


def ddl(fields: list[tuple[str, str]]) -> str:
    """A Spark schema string for ``applyInPandas``."""
    return ", ".join(f"{name} {kind}" for name, kind in fields)


@dataclass(frozen=True)
class UpdateKernel:
    """Updates every entity of a group from its rows and its prior (none for a new entity).

    Each entity's rows may come from several micro-batches (``batch_id``; rows without the
    column form one batch). The entity's batches are applied in increasing ``batch_id`` order,
    each exactly as a call of its own would apply it, the previous batch's posterior (means and
    variances) being the next one's prior: one call does what a call per batch, each fed the
    previous call's coefficients, would do. Round r solves the r-th batch of every entity at once.

    Per (entity, batch): more than ``max_rows_per_entity`` rows keep a uniform sample of them,
    the rows with the smallest ``sample_key`` (a seeded hash, so a replay keeps the same rows);
    fewer than ``min_rows`` (after the cap) skip the batch, leaving the entity's state as it was.
    An entity with no batch left is left out of the result.

    An (entity, batch) update fails, and the entity keeps its state from before the batch,
    when a kept row or the state is not finite (checked before solving, so that one bad
    entity never fails its group), when the solve does not converge or when it ends on a
    non-finite coefficient or variance; ``failure`` names the first failure's reason (``FAILURES``)
    and the entity goes on with its next batch.

    Per entity the result (``UPDATE_FIELDS``) holds:

    - the coefficients after the last batch; ``updates`` and ``total_rows`` are the state's
      counts as given (0 for a new entity), not advanced: the caller advances them by
      ``converged_batches`` and ``converged_rows``, which is what as many separate updates add;
    - ``had_prior``: the entity had coefficients before its first batch; ``batches``: batches
      applied (not skipped), ``converged_batches`` of them converged; ``converged``: all did;
    - ``iterations``, ``rows`` (kept rows of the applied batches) and ``converged_rows`` (of
      the converged ones): sums over the batches;
    - ``loss_before`` and ``loss_after``: sums over the batches of each batch's weighted data
      loss under the state before it and after it (the same for a failed batch); a loss that
      is not finite (a batch with bad input above all) counts 0;
    - ``row_keys`` and ``row_scores``: every row of the entity (capped or skipped ones too)
      and its score ``x . theta`` (intercept included, offset not) under the entity's state
      right after the row's own batch, for the next random-effect type's offsets.
    """

    task: str
    penalty: float
    delta: float
    max_rows_per_entity: int
    min_rows: int = 1

    def __call__(self, rows: pd.DataFrame, priors: pd.DataFrame) -> pd.DataFrame:
        plan = _BatchPlan.build(rows, self.max_rows_per_entity, self.min_rows)
        if plan is None:
            return _empty(UPDATE_FIELDS)
        num_entities = len(plan.entities)
        vocabulary = _Vocabulary(rows, priors)
        # From here on, the plan's rows in the plan's order.
        features = vocabulary.row_features(rows["values"])[plan.order]
        labels, weights, offsets = (
            rows[name].to_numpy(np.float64)[plan.order] for name in ("label", "weight", "offset")
        )
        known = pd.Index(priors["entity_id"]).get_indexer(plan.entities)
        had_prior = known >= 0
        prior_rows = known[had_prior]
        prior_splits, prior_ids = vocabulary.coefficient_ids(known)
        state = _Segments(
            prior_splits,
            prior_ids,
            flatten(priors["means"].iloc[prior_rows], np.float64)[1],
            flatten(priors["variances"].iloc[prior_rows], np.float64)[1],
        )
        input_failure = _input_failures(plan, labels, weights, offsets, features)
        usable = np.isfinite(state.means) & np.isfinite(state.variances) & (state.variances > 0)
        bad_prior = state.entities_with(~usable)

        totals = _Totals.zeros(num_entities)
        scores = np.zeros(len(plan.order))
        by_score_round = plan.rows_by_score_round()
        _score(scores, by_score_round.get(-1), plan.row_entity, state, features, len(vocabulary))
        solver = BatchedSolver(Loss.for_task(self.task), penalty=self.penalty, delta=self.delta)
        for round_number in range(plan.num_rounds):
            segments = np.flatnonzero(plan.segment_round == round_number)
            entities = plan.segment_entity[segments]
            failure = np.where(bad_prior[entities], _NON_FINITE_PRIOR, input_failure[segments])
            solved = failure == 0
            outcome = _solve(
                solver, plan, segments[solved], state.take(entities[solved]), features, labels, weights, offsets
            )
            failure[solved] = outcome.failure
            loss_before = np.zeros(len(segments))
            loss_after = np.zeros(len(segments))
            iterations = np.zeros(len(segments), dtype=np.int64)
            loss_before[solved], loss_after[solved], iterations[solved] = (
                outcome.loss_before,
                outcome.loss_after,
                outcome.iterations,
            )
            totals.add(entities, failure, plan.segment_rows[segments], iterations, loss_before, loss_after)
            state = state.replace(entities[solved][outcome.failure == 0], outcome.posteriors)
            _score(scores, by_score_round.get(round_number), plan.row_entity, state, features, len(vocabulary))

        names, terms = vocabulary.name_terms(state.ids)
        counts = {column: np.zeros(num_entities, dtype=np.int64) for column in ("updates", "total_rows")}
        for column, values in counts.items():
            values[had_prior] = priors[column].to_numpy()[prior_rows]
        return pd.DataFrame(
            {
                "entity_id": plan.entities,
                "names": _split(names, state.splits),
                "terms": _split(terms, state.splits),
                "means": _split(state.means, state.splits),
                "variances": _split(state.variances, state.splits),
                **counts,
                "had_prior": had_prior,
                "converged": totals.converged_batches == totals.batches,
                "iterations": totals.iterations.astype(np.int32),
                "rows": totals.rows,
                "loss_before": totals.loss_before,
                "loss_after": totals.loss_after,
                "batches": totals.batches.astype(np.int32),
                "converged_batches": totals.converged_batches.astype(np.int32),
                "converged_rows": totals.converged_rows,
                "failure": np.asarray(FAILURES, dtype=object)[totals.failure],
                "row_keys": _split(rows["row_key"].to_numpy(np.int64)[plan.order], plan.entity_row_splits),
                "row_scores": _split(scores, plan.entity_row_splits),
            }
        )


@dataclass(frozen=True)
class _BatchPlan:
    """A group's rows sorted by (entity, batch, sample key), cut into (entity, batch) segments.

    ``order``: the rows' positions in the group's frame, sorted, of the entities with at least
    one applied batch (the others are left out); all other row arrays follow it. A segment's kept rows are its
    first ``segment_rows`` rows (the cap); an applied segment (enough rows) has the round
    ``segment_round`` (its rank among the entity's applied segments), a skipped one -1. Rows
    are scored after round ``segment_score_round``: the entity's last applied segment up to
    theirs (-1: before any, under the prior).
    """

    order: np.ndarray
    entities: np.ndarray
    entity_row_splits: np.ndarray
    row_entity: np.ndarray
    row_segment: np.ndarray
    segment_starts: np.ndarray
    segment_rows: np.ndarray
    segment_entity: np.ndarray
    segment_round: np.ndarray
    segment_score_round: np.ndarray

    @classmethod
    def build(cls, rows: pd.DataFrame, max_rows: int, min_rows: int) -> _BatchPlan | None:
        if rows.empty:
            return None
        entity_codes, _ = pd.factorize(rows["entity_id"], sort=True, use_na_sentinel=False)
        batches = rows["batch_id"].to_numpy(np.int64) if "batch_id" in rows else np.zeros(len(rows), dtype=np.int64)
        order = np.lexsort((rows["sample_key"].to_numpy(np.int64), batches, entity_codes))
        entity_codes, batches = entity_codes[order], batches[order]
        segment = _Segmentation.of(entity_codes, batches, max_rows, min_rows)
        applied_entities = np.bincount(entity_codes[segment.starts], weights=segment.applied) > 0
        keep = applied_entities[entity_codes]
        if not keep.any():
            return None
        if not keep.all():
            order, entity_codes, batches = order[keep], entity_codes[keep], batches[keep]
            segment = _Segmentation.of(entity_codes, batches, max_rows, min_rows)
        entity_starts = np.flatnonzero(np.r_[True, entity_codes[1:] != entity_codes[:-1]])
        row_entity = np.cumsum(np.r_[True, entity_codes[1:] != entity_codes[:-1]]) - 1
        segment_entity = row_entity[segment.starts]
        # Applied segments counted per entity, up to and including each segment.
        applied_so_far = np.cumsum(segment.applied)
        first_segment = np.searchsorted(segment_entity, np.arange(len(entity_starts)))
        applied_so_far -= (applied_so_far - segment.applied)[first_segment][segment_entity]
        return cls(
            order=order,
            entities=rows["entity_id"].to_numpy(dtype=object)[order[entity_starts]],
            entity_row_splits=np.append(entity_starts, len(order)),
            row_entity=row_entity,
            row_segment=segment.of_row,
            segment_starts=segment.starts,
            segment_rows=segment.kept,
            segment_entity=segment_entity,
            segment_round=np.where(segment.applied, applied_so_far - 1, -1),
            segment_score_round=applied_so_far - 1,
        )

    @property
    def num_rounds(self) -> int:
        return int(self.segment_round.max()) + 1

    def kept_rows(self, segments: np.ndarray) -> np.ndarray:
        """The kept rows of the segments, segment after segment."""
        return _ranges(self.segment_starts[segments], self.segment_rows[segments])

    def rows_by_score_round(self) -> dict[int, np.ndarray]:
        """The rows to score after each round (-1: under the prior), in row order."""
        row_round = self.segment_score_round[self.row_segment]
        order = np.argsort(row_round, kind="stable")
        rounds, starts = np.unique(row_round[order], return_index=True)
        return dict(zip(rounds.tolist(), np.split(order, starts[1:]), strict=True))


@dataclass(frozen=True)
class _Segmentation:
    """(entity, batch) segments of sorted rows: starts, each row's segment, kept rows, applied or not."""

    starts: np.ndarray
    of_row: np.ndarray
    kept: np.ndarray
    applied: np.ndarray

    @classmethod
    def of(cls, entity_codes: np.ndarray, batches: np.ndarray, max_rows: int, min_rows: int) -> _Segmentation:
        new = np.r_[True, (entity_codes[1:] != entity_codes[:-1]) | (batches[1:] != batches[:-1])]
        starts = np.flatnonzero(new)
        kept = np.minimum(np.diff(np.append(starts, len(new))), max_rows)
        return cls(starts, np.cumsum(new) - 1, kept, kept >= max(min_rows, 1))


@dataclass(frozen=True)
class _Segments:
    """Coefficients of many entities as flat segments: entity e owns ``splits[e]:splits[e + 1]``."""

    splits: np.ndarray
    ids: np.ndarray
    means: np.ndarray
    variances: np.ndarray

    def entities_with(self, flags: np.ndarray) -> np.ndarray:
        """Per entity: whether any of its coefficients is flagged."""
        owners = np.repeat(np.arange(len(self.splits) - 1), np.diff(self.splits))
        return np.bincount(owners[flags], minlength=len(self.splits) - 1) > 0

    def take(self, entities: np.ndarray) -> _Segments:
        """The chosen entities' segments, in the order chosen."""
        lengths = np.diff(self.splits)[entities]
        positions = _ranges(self.splits[entities], lengths)
        return _Segments(
            np.concatenate([[0], np.cumsum(lengths)]),
            self.ids[positions],
            self.means[positions],
            self.variances[positions],
        )

    def replace(self, entities: np.ndarray, new: _Segments) -> _Segments:
        """These segments with entity ``entities[k]``'s replaced by ``new``'s k-th."""
        if len(entities) == 0:
            return self
        lengths = np.diff(self.splits)
        starts = self.splits[:-1].copy()
        lengths[entities] = np.diff(new.splits)
        starts[entities] = len(self.ids) + new.splits[:-1]
        positions = _ranges(starts, lengths)
        return _Segments(
            np.concatenate([[0], np.cumsum(lengths)]),
            np.concatenate([self.ids, new.ids])[positions],
            np.concatenate([self.means, new.means])[positions],
            np.concatenate([self.variances, new.variances])[positions],
        )


@dataclass(frozen=True)
class _Outcome:
    """One round's solve, per solved segment; ``posteriors`` holds the segments that did not fail."""

    failure: np.ndarray
    iterations: np.ndarray
    loss_before: np.ndarray
    loss_after: np.ndarray
    posteriors: _Segments


def _solve(
    solver: BatchedSolver,
    plan: _BatchPlan,
    segments: np.ndarray,
    priors: _Segments,
    features: sparse.csr_array,
    labels: np.ndarray,
    weights: np.ndarray,
    offsets: np.ndarray,
) -> _Outcome:
    """The segments' updates from their entities' priors, all in one batched solve (of valid inputs)."""
    if len(segments) == 0:
        nothing = np.zeros(0, dtype=np.int64)
        return _Outcome(nothing, nothing, np.zeros(0), np.zeros(0), priors)
    rows = plan.kept_rows(segments)
    batch_features = features[rows]
    # Only the columns this round uses: the solver's layout as a call on these rows alone would choose it.
    columns = np.unique(np.concatenate([batch_features.indices, priors.ids]))
    batch_features = sparse.csr_array(
        (batch_features.data, np.searchsorted(columns, batch_features.indices), batch_features.indptr),
        shape=(len(rows), len(columns)),
    )
    batch = EntityBatch(
        row_splits=np.concatenate([[0], np.cumsum(plan.segment_rows[segments])]),
        labels=labels[rows],
        weights=weights[rows],
        offsets=offsets[rows],
        features=batch_features,
        prior_splits=priors.splits,
        prior_ids=np.searchsorted(columns, priors.ids),
        prior_means=priors.means,
        prior_variances=priors.variances,
    )
    with np.errstate(all="ignore"):  # extreme (finite) input may overflow: reported below, not warned about
        result = solver.solve(batch)
        value_weights = np.repeat(batch.weights, np.diff(batch_features.indptr))
        overflows = ~np.isfinite(value_weights * batch_features.data * batch_features.data)
    posteriors = _Segments(result.coefficient_splits, columns[result.coefficient_ids], result.means, result.variances)
    # Non-finite: a coefficient or variance, or the solve stopped on a non-finite objective or curvature w x^2.
    row_segments = np.repeat(np.arange(len(segments)), plan.segment_rows[segments])
    value_segments = np.repeat(row_segments, np.diff(batch_features.indptr))
    non_finite = posteriors.entities_with(~(np.isfinite(result.means) & np.isfinite(result.variances)))
    stopped_non_finite = ~np.isfinite(result.loss_after)
    stopped_non_finite[value_segments[overflows]] = True
    non_finite |= ~result.converged & stopped_non_finite
    failure = np.where(result.converged, 0, _NO_CONVERGENCE)
    failure[non_finite] = _NON_FINITE_RESULT
    failed = failure != 0
    # A failed update leaves the state as it was: its loss after is its loss before. A loss that is not finite counts 0.
    loss_before = np.where(np.isfinite(result.loss_before), result.loss_before, 0.0)
    loss_after = np.where(failed, loss_before, result.loss_after)
    return _Outcome(failure, result.iterations, loss_before, loss_after, posteriors.take(np.flatnonzero(~failed)))


@dataclass(frozen=True)
class _Totals:
    """Per entity, sums over its applied batches, and its first failure."""

    batches: np.ndarray
    converged_batches: np.ndarray
    rows: np.ndarray
    converged_rows: np.ndarray
    iterations: np.ndarray
    loss_before: np.ndarray
    loss_after: np.ndarray
    failure: np.ndarray

    @classmethod
    def zeros(cls, num_entities: int) -> _Totals:
        def counts() -> np.ndarray:
            return np.zeros(num_entities, dtype=np.int64)

        return cls(
            batches=counts(),
            converged_batches=counts(),
            rows=counts(),
            converged_rows=counts(),
            iterations=counts(),
            loss_before=np.zeros(num_entities),
            loss_after=np.zeros(num_entities),
            failure=counts(),
        )

    def add(
        self,
        entities: np.ndarray,
        failure: np.ndarray,
        rows: np.ndarray,
        iterations: np.ndarray,
        loss_before: np.ndarray,
        loss_after: np.ndarray,
    ) -> None:
        """One round: entities appear once each."""
        converged = failure == 0
        self.batches[entities] += 1
        self.converged_batches[entities] += converged
        self.rows[entities] += rows
        self.converged_rows[entities] += np.where(converged, rows, 0)
        self.iterations[entities] += iterations
        self.loss_before[entities] += loss_before
        self.loss_after[entities] += loss_after
        first = ~converged & (self.failure[entities] == 0)
        self.failure[entities[first]] = failure[first]


def _input_failures(
    plan: _BatchPlan, labels: np.ndarray, weights: np.ndarray, offsets: np.ndarray, features: sparse.csr_array
) -> np.ndarray:
    """Per segment: the failure its kept rows cause (0: none)."""
    non_finite = ~(np.isfinite(labels) & np.isfinite(weights) & np.isfinite(offsets))
    value_rows = np.repeat(np.arange(len(labels)), np.diff(features.indptr))
    non_finite[value_rows[~np.isfinite(features.data)]] = True
    kept = np.arange(len(labels)) - plan.segment_starts[plan.row_segment] < plan.segment_rows[plan.row_segment]
    num_segments = len(plan.segment_starts)
    failure = np.zeros(num_segments, dtype=np.int64)
    failure[np.bincount(plan.row_segment[kept & (weights < 0)], minlength=num_segments) > 0] = _NEGATIVE_WEIGHT
    failure[np.bincount(plan.row_segment[kept & non_finite], minlength=num_segments) > 0] = _NON_FINITE_INPUT
    return failure


def _score(
    scores: np.ndarray,
    rows: np.ndarray | None,
    row_entity: np.ndarray,
    state: _Segments,
    features: sparse.csr_array,
    width: int,
) -> None:
    """``scores[rows]``: the rows' ``x . theta`` under their entities' coefficients in ``state``."""
    if rows is None or len(rows) == 0:
        return
    entities, owners = np.unique(row_entity[rows], return_inverse=True)
    coefficients = state.take(entities)
    table = CoefficientTable.from_segments(
        coefficients.splits, coefficients.ids, coefficients.means, coefficients.variances, width
    )
    with np.errstate(all="ignore"):  # a non-finite value or coefficient scores non-finite, as it should
        scores[rows] = table_scores(features[rows], np.zeros(len(rows)), owners, table)


@dataclass(frozen=True)
class ScoreKernel:
    """Each row's score under its entity's coefficients (0 for an entity without any).

    ``thompson``: one draw of each entity's coefficients from ``N(mean, variance)`` per
    ``draw_group`` value (a request) and entity, a coefficient the entity lacks (or a whole new
    entity) from the prior ``N(0, prior_variance)``. A draw is a function of ``seed``, the request,
    the entity and the feature's name and term only: the same in any bucket, on any executor,
    different for another request. Otherwise the means (a missing coefficient counts 0).
    """

    thompson: bool = False
    seed: int = 0
    prior_variance: float = 0.0

    def __call__(self, rows: pd.DataFrame, coefficients: pd.DataFrame) -> pd.DataFrame:
        if rows.empty:
            return _empty(SCORE_FIELDS)
        vocabulary = _Vocabulary(rows, coefficients)
        splits, ids = vocabulary.coefficient_ids(np.arange(len(coefficients)))
        table = CoefficientTable.from_segments(
            splits,
            ids,
            flatten(coefficients["means"], np.float64)[1],
            flatten(coefficients["variances"], np.float64)[1],
            len(vocabulary),
        )
        entity_ids = rows["entity_id"].to_numpy(dtype=object)
        owners = pd.Index(coefficients["entity_id"]).get_indexer(entity_ids)
        # A new entity is an entity of its own, with no coefficients: Thompson draws all of them from the prior.
        unknown = owners < 0
        owners[unknown] = len(coefficients) + pd.factorize(entity_ids[unknown])[0]
        sampling = {}
        if self.thompson:
            groups = rows["draw_group"].astype(str) if "draw_group" in rows else rows["row_key"].astype(str)
            sampling = {
                "draw_keys": hash_strings((groups + SEPARATOR + rows["entity_id"].astype(str)).to_numpy(dtype=object)),
                "feature_keys": hash_strings(name_term_keys(*vocabulary.name_terms(np.arange(len(vocabulary))))),
                "missing_variance": self.prior_variance,
                "seed": self.seed,
            }
        scores = table_scores(
            vocabulary.row_features(rows["values"]),
            np.zeros(len(rows)),
            owners,
            table,
            sample=self.thompson,
            **sampling,
        )
        return pd.DataFrame({"row_key": rows["row_key"].to_numpy(), "entity_id": entity_ids, "score": scores})


def cogrouped_on_driver(
    rows: pd.DataFrame, coefficients: pd.DataFrame, key: str, kernel: UpdateKernel | ScoreKernel
) -> pd.DataFrame:
    """What ``rows.groupBy(key).cogroup(coefficients.groupBy(key)).applyInPandas(kernel)`` returns, on the driver.

    The same groups get the same calls (a kernel sorts its group's rows itself, so the order rows
    arrive in changes nothing): the same result, bit for bit, without a Spark job. Groups with
    coefficients but no rows give nothing, as they give the kernels nothing.
    """
    fields = UPDATE_FIELDS if isinstance(kernel, UpdateKernel) else SCORE_FIELDS
    by_group = dict(tuple(coefficients.groupby(key, sort=False))) if len(coefficients) else {}
    empty = coefficients.iloc[0:0]
    parts = [
        kernel(group.reset_index(drop=True), by_group.get(value, empty).reset_index(drop=True))
        for value, group in rows.groupby(key, sort=True)
    ]
    parts = [part for part in parts if len(part)]
    return pd.concat(parts, ignore_index=True) if parts else _empty(fields)


@dataclass(frozen=True)
class DriverCoordinate:
    """A random-effect type as the driver's update sees it: its name (a ``type_column`` value), score column, kernel."""

    name: str
    score_column: str
    kernel: UpdateKernel


def updated_on_driver(
    rows: pd.DataFrame,
    coefficients: pd.DataFrame,
    coordinates: list[DriverCoordinate],
    offset_for: Callable[[str, Callable[[str], np.ndarray]], np.ndarray],
    *,
    type_column: str,
    key: str,
    fixed_column: str,
) -> list[pd.DataFrame]:
    """Each type's updated entities (``UPDATE_FIELDS``), type after type, as the executors' cogroups give them.

    ``rows``: every type's kernel rows (``ROW_FIELDS``, their ``offset`` the fixed effect's score alone)
    and ``coefficients`` (``COEFFICIENT_FIELDS``), tagged with their type and group ``key``. Type k's
    offset is ``offset_for(score column, column by name)``: the fixed effect's score, each earlier type's
    score of the row right after its update, each later type's before any update (the first type's is
    never an offset); a row without an entity of a type counts 0 for it, as Spark's ``fillna`` does.
    """
    rows_of, coefficients_of = {}, {}
    for coordinate in coordinates:
        own = rows[rows[type_column] == coordinate.name].drop(columns=type_column).reset_index(drop=True)
        theirs = coefficients[coefficients[type_column] == coordinate.name].drop(columns=type_column)
        rows_of[coordinate.name] = own
        coefficients_of[coordinate.name] = theirs[theirs["entity_id"].isin(own["entity_id"])]
    scores: dict[str, pd.Series] = {}
    for coordinate in coordinates[1:]:
        scored = cogrouped_on_driver(rows_of[coordinate.name], coefficients_of[coordinate.name], key, ScoreKernel())
        scores[coordinate.score_column] = pd.Series(scored["score"].to_numpy(), index=scored["row_key"].to_numpy())
    updated_by_type = []
    for coordinate in coordinates:
        own = rows_of[coordinate.name]
        keys = own["row_key"].to_numpy()

        def column(name: str, own: pd.DataFrame = own, keys: np.ndarray = keys) -> np.ndarray:
            if name == fixed_column:
                return own["offset"].to_numpy()
            if name not in scores:
                return np.zeros(len(keys))
            return scores[name].reindex(keys).fillna(0.0).to_numpy()

        own = own.assign(offset=offset_for(coordinate.score_column, column))
        updated = cogrouped_on_driver(own, coefficients_of[coordinate.name], key, coordinate.kernel)
        after = pd.Series(
            np.concatenate([np.zeros(0), *updated["row_scores"]]),
            index=np.concatenate([np.zeros(0, dtype=np.int64), *updated["row_keys"]]),
        )
        scores[coordinate.score_column] = after
        updated_by_type.append(updated)
    return updated_by_type


def update_totals(updated: pd.DataFrame) -> dict[str, float]:
    """Sums over updated entities (``UPDATE_FIELDS``): the figures a nearline batch reports per type."""
    return {
        "entities": len(updated),
        "new": int((~updated["had_prior"].astype(bool)).sum()),
        "failed": int((updated["batches"] - updated["converged_batches"]).sum()),
        "loss_before": float(updated["loss_before"].sum()),
        "loss_after": float(updated["loss_after"].sum()),
        "rows": int(updated["rows"].sum()),
        **{reason: int((updated["failure"] == reason).sum()) for reason in FAILURE_REASONS},
    }


class _Vocabulary:
    """The name-terms of one group's rows and coefficients, numbered in (name, term) order.

    Sorted numbering makes every entity's coefficients come out in the same order in any group.
    """

    def __init__(self, rows: pd.DataFrame, coefficients: pd.DataFrame):
        self._row_splits, row_names = flatten(rows["names"], object)
        _, row_terms = flatten(rows["terms"], object)
        self._coefficient_splits, coefficient_names = flatten(coefficients["names"], object)
        _, coefficient_terms = flatten(coefficients["terms"], object)
        names = np.concatenate([[INTERCEPT[0]], row_names, coefficient_names])
        terms = np.concatenate([[INTERCEPT[1]], row_terms, coefficient_terms])
        codes, self._names, self._terms = name_term_codes(names, terms)
        self._intercept = codes[0]
        self._row_ids = codes[1 : 1 + len(row_names)]
        self._coefficient_ids = codes[1 + len(row_names) :]

    def __len__(self) -> int:
        return len(self._names)

    def row_features(self, values: pd.Series) -> sparse.csr_array:
        """The rows as a CSR matrix over this vocabulary, with the intercept set to 1."""
        _, flat_values = flatten(values, np.float64)
        lengths = np.diff(self._row_splits) + 1
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        indices = np.empty(indptr[-1], dtype=np.int64)
        data = np.empty(indptr[-1])
        starts = indptr[:-1]
        indices[starts], data[starts] = self._intercept, 1.0
        rest = np.ones(indptr[-1], dtype=bool)
        rest[starts] = False
        indices[rest], data[rest] = self._row_ids, flat_values
        return sparse.csr_array((data, indices, indptr), shape=(len(lengths), len(self)))

    def coefficient_ids(self, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Splits and feature ids of the chosen coefficient rows (``-1`` chooses none: a new entity)."""
        chosen = which >= 0
        starts = np.zeros(len(which), dtype=np.int64)
        lengths = np.zeros(len(which), dtype=np.int64)
        starts[chosen] = self._coefficient_splits[which[chosen]]
        lengths[chosen] = self._coefficient_splits[which[chosen] + 1] - starts[chosen]
        return np.concatenate([[0], np.cumsum(lengths)]), self._coefficient_ids[_ranges(starts, lengths)]

    def name_terms(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._names[ids], self._terms[ids]


def _split(values: np.ndarray, splits: np.ndarray) -> list[np.ndarray]:
    """``values`` cut at ``splits`` (as ``np.split``, several times faster for many small pieces)."""
    bounds = splits.tolist()
    return [values[start:end] for start, end in itertools.pairwise(bounds)]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``starts[k], starts[k] + 1, ..., starts[k] + lengths[k] - 1`` for every k, concatenated (without a loop)."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


def _empty(fields: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame({name: [] for name, _ in fields})
