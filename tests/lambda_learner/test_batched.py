"""The batched solver gives each entity what the per-entity trainer gives it."""

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import sparse
from scipy.special import expit

from lambda_learner import (
    BatchedSolver,
    EntityBatch,
    HessianType,
    IndexedDataset,
    IndexedModel,
    Loss,
    TrainerSequentialBayesianLogisticLossWithL2,
    TrainerSequentialBayesianSquareLossWithL2,
)

PER_ENTITY_TRAINER = {
    Loss.LOGISTIC: TrainerSequentialBayesianLogisticLossWithL2,
    Loss.SQUARE: TrainerSequentialBayesianSquareLossWithL2,
}


@dataclass
class Entity:
    rows: np.ndarray  # (n, F) dense in the global columns, zero where a feature is absent
    labels: np.ndarray
    weights: np.ndarray
    offsets: np.ndarray
    prior_ids: np.ndarray
    prior_means: np.ndarray
    prior_variances: np.ndarray


def random_entities(seed: int, row_counts: list[int], num_features: int, loss: Loss) -> list[Entity]:
    """Entities with their own feature subsets; priors that cover some of them, others, or nothing."""
    rng = np.random.default_rng(seed)
    entities = []
    for count in row_counts:
        own = rng.random(num_features) < rng.uniform(0.2, 0.9)
        own[0] = True  # the intercept column
        rows = rng.normal(size=(count, num_features)) * own
        rows[:, 0] = 1.0
        truth = rng.normal(0, 0.8, size=num_features)
        offsets = rng.normal(0, 1, size=count)
        margins = rows @ truth + offsets
        labels = (
            (rng.random(count) < expit(margins)).astype(float)
            if loss is Loss.LOGISTIC
            else margins + rng.normal(size=count)
        )
        weights = rng.uniform(0.1, 2.0, size=count) * (rng.random(count) > 0.05)
        prior_mask = (rng.random(num_features) < 0.5) if rng.random() > 0.2 else np.zeros(num_features, dtype=bool)
        prior_ids = np.flatnonzero(prior_mask)
        variances = rng.uniform(0.05, 2.0, size=len(prior_ids))
        variances[rng.random(len(prior_ids)) < 0.15] = np.nan  # a mean without a variance
        entities.append(
            Entity(rows, labels, weights, offsets, prior_ids, rng.normal(0, 0.5, size=len(prior_ids)), variances)
        )
    return entities


def as_batch(entities: list[Entity], *, sparse_input: bool) -> EntityBatch:
    rows = np.vstack([e.rows for e in entities])
    return EntityBatch(
        row_splits=np.cumsum([0] + [len(e.labels) for e in entities]),
        labels=np.concatenate([e.labels for e in entities]),
        weights=np.concatenate([e.weights for e in entities]),
        offsets=np.concatenate([e.offsets for e in entities]),
        features=sparse.csr_array(rows) if sparse_input else rows,
        prior_splits=np.cumsum([0] + [len(e.prior_ids) for e in entities]),
        prior_ids=np.concatenate([e.prior_ids for e in entities]).astype(np.int64),
        prior_means=np.concatenate([e.prior_means for e in entities]),
        prior_variances=np.concatenate([e.prior_variances for e in entities]),
    )


def per_entity(entity: Entity, loss: Loss, penalty: float, delta: float):
    """The per-entity trainer on the entity's own columns: its rows' features and its prior's."""
    columns = np.union1d(np.flatnonzero((entity.rows != 0).any(axis=0)), entity.prior_ids)
    data = IndexedDataset(sparse.csr_array(entity.rows[:, columns]), entity.labels, entity.weights, entity.offsets)
    position = np.searchsorted(columns, entity.prior_ids)
    theta = np.zeros(len(columns))
    theta[position] = entity.prior_means
    precision = np.full(len(columns), penalty)
    precision[position] = np.where(np.isnan(entity.prior_variances), penalty, 1 / entity.prior_variances)
    model = IndexedModel(theta, sparse.diags_array(precision))
    updated, _, metadata = PER_ENTITY_TRAINER[loss](
        training_data=data, initial_model=model, penalty=penalty, delta=delta
    ).train()
    assert metadata.converged
    return columns, updated.theta, updated.variances


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    row_counts=st.lists(st.sampled_from([0, 1, 2, 3, 7, 30, 150, 2000]), min_size=1, max_size=10),
    num_features=st.integers(1, 30),
    loss=st.sampled_from(list(Loss)),
    delta=st.floats(0.0, 1.0),
    penalty=st.floats(0.05, 20.0),
    dense_layout_limit=st.sampled_from([0, 64]),
    sparse_input=st.booleans(),
)
def test_batched_solver_matches_the_per_entity_trainer(
    seed, row_counts, num_features, loss, delta, penalty, dense_layout_limit, sparse_input
):
    entities = random_entities(seed, row_counts, num_features, loss)
    solver = BatchedSolver(loss, penalty=penalty, delta=delta, dense_layout_limit=dense_layout_limit)
    result = solver.solve(as_batch(entities, sparse_input=sparse_input))

    assert result.converged.all()
    for index, entity in enumerate(entities):
        columns, means, variances = per_entity(entity, loss, penalty, delta)
        segment = slice(result.coefficient_splits[index], result.coefficient_splits[index + 1])
        np.testing.assert_array_equal(result.coefficient_ids[segment], columns)
        np.testing.assert_allclose(result.means[segment], means, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(result.variances[segment], variances, rtol=1e-6)


def test_losses_before_and_after_are_the_rows_data_loss():
    entities = random_entities(3, [20, 5, 40], 6, Loss.LOGISTIC)
    result = BatchedSolver(Loss.LOGISTIC, penalty=1.0, delta=0.7).solve(as_batch(entities, sparse_input=False))
    for index, entity in enumerate(entities):
        theta_before = np.zeros(6)
        theta_before[entity.prior_ids] = entity.prior_means
        segment = slice(result.coefficient_splits[index], result.coefficient_splits[index + 1])
        theta_after = np.zeros(6)
        theta_after[result.coefficient_ids[segment]] = result.means[segment]
        signed = np.where(entity.labels > 0, 1.0, -1.0)
        for theta, reported in ((theta_before, result.loss_before[index]), (theta_after, result.loss_after[index])):
            margins = entity.rows @ theta + entity.offsets
            assert reported == pytest.approx(np.sum(entity.weights * np.logaddexp(0, -signed * margins)), rel=1e-10)
        assert result.loss_after[index] < result.loss_before[index]


def test_an_unfinished_solve_keeps_the_prior():
    entities = random_entities(5, [10, 10, 10], 4, Loss.LOGISTIC)
    rushed = BatchedSolver(Loss.LOGISTIC, penalty=1.0, delta=0.5, max_iterations=1).solve(
        as_batch(entities, sparse_input=False)
    )
    assert not rushed.converged.any()
    for index, entity in enumerate(entities):
        segment = slice(rushed.coefficient_splits[index], rushed.coefficient_splits[index + 1])
        np.testing.assert_array_equal(rushed.coefficient_ids[segment], entity.prior_ids)
        np.testing.assert_array_equal(rushed.means[segment], entity.prior_means)
        np.testing.assert_array_equal(rushed.variances[segment], entity.prior_variances)


def test_one_broken_entity_does_not_spoil_the_batch():
    # No penalty, no prior weight: an entity without rows has a singular Hessian and cannot be solved.
    entities = random_entities(9, [60, 0, 60], 3, Loss.LOGISTIC)
    entities[1].prior_ids, entities[1].prior_means, entities[1].prior_variances = (
        np.array([0, 2]),
        np.ones(2),
        np.ones(2),
    )
    solver = BatchedSolver(Loss.LOGISTIC, penalty=0.0, delta=0.0)
    result = solver.solve(as_batch(entities, sparse_input=True))

    np.testing.assert_array_equal(result.converged, [True, False, True])
    broken = slice(result.coefficient_splits[1], result.coefficient_splits[2])
    np.testing.assert_array_equal(result.means[broken], [1.0, 1.0])
    alone = solver.solve(as_batch([entities[0], entities[2]], sparse_input=True))
    kept = np.r_[
        result.coefficient_splits[0] : result.coefficient_splits[1],
        result.coefficient_splits[2] : result.coefficient_splits[3],
    ]
    np.testing.assert_allclose(result.means[kept], alone.means, rtol=1e-12)


@pytest.mark.parametrize("hessian_type", [HessianType.IDENTITY, HessianType.NONE])
def test_variance_modes(hessian_type):
    entities = random_entities(1, [10, 3], 4, Loss.SQUARE)
    result = BatchedSolver(Loss.SQUARE, penalty=1.0, delta=0.5, hessian_type=hessian_type).solve(
        as_batch(entities, sparse_input=False)
    )
    if hessian_type is HessianType.IDENTITY:
        np.testing.assert_array_equal(result.variances, 1.0)
    else:
        assert np.isnan(result.variances).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.weights.__setitem__(0, -1.0), "weights must be non-negative"),
        (lambda b: b.offsets.__setitem__(0, np.inf), "offsets must be finite"),
        (lambda b: b.labels.__setitem__(0, np.nan), "labels must be finite"),
        (lambda b: b.prior_variances.__setitem__(0, 0.0), "prior variances must be positive"),
        (lambda b: b.prior_ids.__setitem__(0, 99), "prior ids"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(change, message):
    entities = random_entities(2, [4, 4], 3, Loss.LOGISTIC)
    entities[0].prior_ids = np.array([0, 1])
    entities[0].prior_means = np.zeros(2)
    entities[0].prior_variances = np.ones(2)
    batch = as_batch(entities, sparse_input=False)
    change(batch)
    with pytest.raises(ValueError, match=message):
        BatchedSolver(Loss.LOGISTIC, penalty=1.0, delta=0.5).solve(batch)


def test_row_splits_must_cover_the_rows():
    batch = as_batch(random_entities(2, [4, 4], 3, Loss.LOGISTIC), sparse_input=False)
    broken = EntityBatch(**{**batch.__dict__, "row_splits": np.array([0, 5, 7])})
    with pytest.raises(ValueError, match="row_splits"):
        BatchedSolver(Loss.LOGISTIC, penalty=1.0, delta=0.5).solve(broken)
