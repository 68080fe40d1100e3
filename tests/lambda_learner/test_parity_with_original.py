"""Parity with lambda-learner 0.1.0 on the same problems, and a test for each deliberate difference."""

import numpy as np
import pytest
from linkedin.learner.ds import feature as original_feature
from linkedin.learner.ds import index_map as original_index_map
from linkedin.learner.ds import indexed_model as original_indexed_model
from linkedin.learner.ds import record as original_record
from linkedin.learner.ds import representation_utils as original_representation
from linkedin.learner.prediction import linear_scorer as original_scorer
from linkedin.learner.prediction.hessian_type import HessianType as OriginalHessianType
from linkedin.learner.prediction.trainer_logistic_loss_with_l2 import (
    TrainerLogisticLossWithL2 as OriginalLogistic,
)
from linkedin.learner.prediction.trainer_sequential_bayesian_logistic_loss_with_l2 import (
    TrainerSequentialBayesianLogisticLossWithL2 as OriginalSequential,
)
from linkedin.learner.prediction.trainer_square_loss_with_l2 import TrainerSquareLossWithL2 as OriginalSquare
from scipy import sparse
from scipy.special import expit

import lambda_learner as ours
from tests.lambda_learner.problems import random_problem, reference_objective, reference_solve

PENALTY = 3.0
DELTA = 0.8


def original_problem(problem):
    """The same problem in the original library's classes."""
    feature = original_feature.Feature
    records = [
        original_record.TrainingRecord(
            r.label, r.weight, r.offset, [feature(f.name, f.term, f.value) for f in r.features]
        )
        for r in problem.records
    ]
    means = [feature(f.name, f.term, f.value) for f in problem.means]
    variances = [feature(f.name, f.term, f.value) for f in problem.variances]
    return records, means, variances


def both_indexed(problem):
    """(data, model) from each library, built through each library's own API."""
    index_map, _ = ours.IndexMap.from_records_means_and_variances(problem.records, problem.means, problem.variances)
    our_data = ours.nt_domain_data_to_index_domain_data(problem.records, index_map)
    our_model = ours.nt_domain_coeffs_to_index_domain_coeffs(problem.means, problem.variances, index_map, PENALTY)
    records, means, variances = original_problem(problem)
    their_map, _ = original_index_map.IndexMap.from_records_means_and_variances(records, means, variances)
    assert list(index_map) == [their_map.get_nt(i) for i in range(len(their_map))]
    their_data = original_representation.nt_domain_data_to_index_domain_data(records, their_map)
    their_model = original_representation.nt_domain_coeffs_to_index_domain_coeffs(means, variances, their_map, PENALTY)
    return (our_data, our_model), (their_data, their_model)


TRAINERS = {
    "sequential": (ours.TrainerSequentialBayesianLogisticLossWithL2, OriginalSequential, {"delta": DELTA}, "logistic"),
    "logistic": (ours.TrainerLogisticLossWithL2, OriginalLogistic, {}, "logistic"),
    "square": (ours.TrainerSquareLossWithL2, OriginalSquare, {}, "linear"),
}


def problem_for(kind, seed):
    problem = random_problem(np.random.default_rng(seed), rows=60, features=8, extra_prior_features=2)
    if TRAINERS[kind][3] == "linear":
        # The original maps every label to +-1; parity holds on labels that already are.
        for i, record in enumerate(problem.records):
            problem.records[i] = ours.TrainingRecord(
                1.0 if record.label > 0 else -1.0, 1.0, record.offset, record.features
            )
    return problem


@pytest.mark.parametrize("kind", list(TRAINERS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_at_the_prior_agree(kind, seed):
    our_class, their_class, extra, _ = TRAINERS[kind]
    (our_data, our_model), (their_data, their_model) = both_indexed(problem_for(kind, seed))
    our_trainer = our_class(training_data=our_data, initial_model=our_model, penalty=PENALTY, **extra)
    their_trainer = their_class(training_data=their_data, initial_model=their_model, penalty=PENALTY, **extra)
    theta = our_model.theta
    assert our_trainer.loss(theta) == pytest.approx(their_trainer.loss(theta), rel=1e-9)
    np.testing.assert_allclose(our_trainer.gradient(theta), their_trainer.gradient(theta), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", list(TRAINERS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_updated_coefficients_agree_and_ours_are_fully_converged(kind, seed):
    our_class, their_class, extra, task = TRAINERS[kind]
    (our_data, our_model), (their_data, their_model) = both_indexed(problem_for(kind, seed))
    ours_updated, _, metadata = our_class(
        training_data=our_data, initial_model=our_model, penalty=PENALTY, **extra
    ).train()
    theirs_updated, _, _ = their_class(
        training_data=their_data, initial_model=their_model, penalty=PENALTY, **extra
    ).train()

    scale = np.abs(theirs_updated.theta).max()
    np.testing.assert_allclose(ours_updated.theta, theirs_updated.theta, rtol=1e-3, atol=1e-3 * scale)
    delta = extra.get("delta", 0.0)
    value, gradient, hessian = reference_objective(
        our_data.X,
        our_data.y,
        our_data.w,
        our_data.offsets,
        our_model.theta,
        our_model.hessian.diagonal(),
        PENALTY,
        delta,
        task,
    )
    converged = reference_solve(value, gradient, hessian, our_model.theta)
    assert metadata.converged
    np.testing.assert_allclose(ours_updated.theta, converged, rtol=1e-6, atol=1e-9)
    # The original stops early: measurably further from the optimum than we are.
    assert np.abs(theirs_updated.theta - converged).max() > np.abs(ours_updated.theta - converged).max()


@pytest.mark.parametrize("kind", ["sequential", "logistic"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_variances_agree(kind, seed):
    our_class, their_class, extra, _ = TRAINERS[kind]
    (our_data, our_model), (their_data, their_model) = both_indexed(problem_for(kind, seed))
    ours_updated, _, _ = our_class(
        training_data=our_data, initial_model=our_model, penalty=PENALTY, hessian_type=ours.HessianType.FULL, **extra
    ).train()
    theirs_updated, _, _ = their_class(
        training_data=their_data,
        initial_model=their_model,
        penalty=PENALTY,
        hessian_type=OriginalHessianType.FULL,
        **extra,
    ).train()
    their_variances = 1.0 / theirs_updated.hessian.diagonal()
    np.testing.assert_allclose(ours_updated.variances, their_variances, rtol=1e-3)


# --- deliberate differences: the original's behaviour, then ours ---


def test_difference_weights_enter_the_hessian():
    problem = random_problem(np.random.default_rng(7), rows=50, features=5, weighted=True)
    (our_data, our_model), (their_data, their_model) = both_indexed(problem)
    ours_updated, _, _ = ours.TrainerSequentialBayesianLogisticLossWithL2(
        training_data=our_data, initial_model=our_model, penalty=PENALTY, delta=DELTA
    ).train()
    theirs_updated, _, _ = OriginalSequential(
        training_data=their_data, initial_model=their_model, penalty=PENALTY, delta=DELTA
    ).train()

    def precision(theta, weights):
        X = our_data.X.toarray()
        margins = X @ theta + our_data.offsets
        curvature = weights * expit(margins) * expit(-margins)
        return DELTA * our_model.hessian.diagonal() + np.einsum("nd,n,nd->d", X, curvature, X) + (1 - DELTA) * PENALTY

    # The original's precision leaves the weights out; ours has them.
    np.testing.assert_allclose(theirs_updated.hessian.diagonal(), precision(theirs_updated.theta, 1.0), rtol=1e-9)
    np.testing.assert_allclose(ours_updated.hessian.diagonal(), precision(ours_updated.theta, our_data.w), rtol=1e-9)
    assert not np.allclose(ours_updated.variances, 1 / theirs_updated.hessian.diagonal(), rtol=0.05)


def test_difference_thompson_sampling_uses_the_variance():
    # Coefficient 0 is known precisely (precision 400), coefficient 1 barely (precision 0.25).
    precision = np.array([400.0, 0.25])
    their_model = original_indexed_model.IndexedModel(np.zeros(2), np.diag(precision))
    our_model = ours.IndexedModel(np.zeros(2), np.diag(precision))
    their_data = original_representation.IndexedDataset(
        sparse.csc_matrix(np.eye(2)), np.ones(2), np.ones(2), np.zeros(2)
    )
    our_data = ours.IndexedDataset(np.eye(2), np.ones(2), np.ones(2), np.zeros(2))
    draws = 4000
    np.random.seed(0)
    theirs = np.array([original_scorer.score_linear_model(their_model, their_data, 1.0) for _ in range(draws)])
    rng = np.random.default_rng(0)
    mine = np.array([ours.score_linear_model(our_model, our_data, 1.0, seed=rng) for _ in range(draws)])
    # The original draws with the precision as the covariance; we draw with the variance.
    np.testing.assert_allclose(theirs.var(axis=0), precision, rtol=0.1)
    np.testing.assert_allclose(mine.var(axis=0), 1 / precision, rtol=0.1)


def test_difference_regression_labels_stay_real():
    assert original_record.TrainingRecord(2.5, 1.0, 0.0, []).label == -1
    assert ours.TrainingRecord(2.5, 1.0, 0.0, []).label == 2.5
    rng = np.random.default_rng(3)
    labels = rng.normal(3.0, 0.1, size=200)
    records = [ours.TrainingRecord(float(y), 1.0, 0.0, []) for y in labels]
    index_map, _ = ours.IndexMap.from_records_means_and_variances(records, [], [])
    data = ours.nt_domain_data_to_index_domain_data(records, index_map)
    model = ours.nt_domain_coeffs_to_index_domain_coeffs([], [], index_map, 1e-6)
    updated, _, _ = ours.TrainerSquareLossWithL2(training_data=data, initial_model=model, penalty=1e-6).train()
    assert updated.theta[0] == pytest.approx(labels.mean(), rel=1e-6)
    their_records = [original_record.TrainingRecord(float(y), 1.0, 0.0, []) for y in labels]
    their_map, _ = original_index_map.IndexMap.from_records_means_and_variances(their_records, [], [])
    their_data = original_representation.nt_domain_data_to_index_domain_data(their_records, their_map)
    their_model = original_representation.nt_domain_coeffs_to_index_domain_coeffs([], [], their_map, 1e-6)
    their_updated, _, _ = OriginalSquare(training_data=their_data, initial_model=their_model, penalty=1e-6).train()
    assert their_updated.theta[0] == pytest.approx(-1.0, abs=1e-3)


def test_difference_square_loss_weights_and_hessian():
    problem = random_problem(np.random.default_rng(9), rows=40, features=3, task="linear", weighted=True)
    (our_data, our_model), (their_data, their_model) = both_indexed(problem)
    theta = our_model.theta
    residual = our_data.X @ theta + our_data.offsets - our_data.y
    ridge = PENALTY / 2 * theta @ theta
    our_trainer = ours.TrainerSquareLossWithL2(
        training_data=our_data, initial_model=our_model, penalty=PENALTY, hessian_type=ours.HessianType.FULL
    )
    their_trainer = OriginalSquare(
        training_data=their_data, initial_model=their_model, penalty=PENALTY, hessian_type=OriginalHessianType.FULL
    )
    # The original's square loss drops the weights (and maps labels to +-1); ours weighs each row.
    their_residual = their_data.X @ theta + their_data.offsets - their_data.y
    assert their_trainer.loss(theta) == pytest.approx(0.5 * their_residual @ their_residual + ridge)
    assert our_trainer.loss(theta) == pytest.approx(0.5 * np.sum(our_data.w * residual**2) + ridge)
    # Its Hessian is the logistic one; ours is X' W X + lambda I.
    updated, _, _ = our_trainer.train()
    X = our_data.X.toarray()
    np.testing.assert_allclose(
        updated.hessian.toarray(), X.T @ (X * our_data.w[:, None]) + PENALTY * np.eye(X.shape[1])
    )
    their_updated, _, _ = their_trainer.train()
    assert not np.allclose(their_updated.hessian.toarray(), X.T @ X + PENALTY * np.eye(X.shape[1]), rtol=0.05)


def test_difference_no_overflow_at_large_margins():
    X = sparse.csc_matrix(np.ones((2, 1)))
    their_data = original_representation.IndexedDataset(X, np.array([1.0, -1.0]), np.ones(2), np.array([-800.0, 800.0]))
    their_trainer = OriginalLogistic(
        training_data=their_data, initial_model=original_indexed_model.IndexedModel(np.zeros(1)), penalty=1.0
    )
    with np.errstate(over="ignore"):
        assert np.isinf(their_trainer.loss(np.zeros(1)))
    our_data = ours.IndexedDataset(X, np.array([1.0, 0.0]), np.ones(2), np.array([-800.0, 800.0]))
    our_trainer = ours.TrainerLogisticLossWithL2(
        training_data=our_data, initial_model=ours.IndexedModel(np.zeros(1)), penalty=1.0
    )
    assert our_trainer.loss(np.zeros(1)) == pytest.approx(1600.0)


def test_difference_a_model_without_hessian_converts_back():
    their_map = original_index_map.IndexMap()
    with pytest.raises(UnboundLocalError):
        original_representation.index_domain_coeffs_to_nt_domain_coeffs(
            original_indexed_model.IndexedModel(np.array([0.5])), their_map
        )
    means, variances = ours.index_domain_coeffs_to_nt_domain_coeffs(ours.IndexedModel(np.array([0.5])), ours.IndexMap())
    assert means == {("intercept", "intercept"): 0.5}
    assert variances is None
