import numpy as np
import pytest
from scipy import sparse

from lambda_learner import (
    HessianType,
    IndexedDataset,
    IndexedModel,
    IndexMap,
    TrainerLogisticLossWithL2,
    TrainerSequentialBayesianLogisticLossWithL2,
    TrainerSequentialBayesianSquareLossWithL2,
    TrainerSquareLossWithL2,
    nt_domain_coeffs_to_index_domain_coeffs,
    nt_domain_data_to_index_domain_data,
)
from tests.lambda_learner.problems import random_problem, reference_objective, reference_solve

PENALTY = 2.0


def indexed(problem):
    index_map, _ = IndexMap.from_records_means_and_variances(problem.records, problem.means, problem.variances)
    data = nt_domain_data_to_index_domain_data(problem.records, index_map)
    model = nt_domain_coeffs_to_index_domain_coeffs(problem.means, problem.variances, index_map, PENALTY)
    return data, model


def reference_for(data, model, delta, task):
    return reference_objective(
        data.X, data.y, data.w, data.offsets, model.theta, model.hessian.diagonal(), PENALTY, delta, task
    )


SEQUENTIAL = [
    (TrainerSequentialBayesianLogisticLossWithL2, "logistic"),
    (TrainerSequentialBayesianSquareLossWithL2, "linear"),
]


@pytest.mark.parametrize(("trainer_class", "task"), SEQUENTIAL)
@pytest.mark.parametrize("delta", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_sequential_update_matches_a_fully_converged_reference(trainer_class, task, delta, weighted):
    data, model = indexed(
        random_problem(np.random.default_rng(11), task=task, weighted=weighted, extra_prior_features=2)
    )
    value, gradient, hessian = reference_for(data, model, delta, task)
    expected = reference_solve(value, gradient, hessian, model.theta)

    updated, loss, metadata = trainer_class(
        training_data=data, initial_model=model, penalty=PENALTY, delta=delta
    ).train()

    assert metadata.converged and metadata.status == "converged"
    np.testing.assert_allclose(updated.theta, expected, rtol=1e-6, atol=1e-9)
    assert loss == pytest.approx(value(expected), rel=1e-12)
    assert metadata.gradient_norm < 1e-6
    # Posterior precision: delta H0 + X' D X + (1 - delta) lambda I at the optimum, weights included.
    np.testing.assert_allclose(updated.hessian.toarray(), hessian(expected), rtol=1e-6)
    np.testing.assert_allclose(updated.variances, 1 / np.diag(hessian(expected)), rtol=1e-6)


@pytest.mark.parametrize(
    ("trainer_class", "task"), [(TrainerLogisticLossWithL2, "logistic"), (TrainerSquareLossWithL2, "linear")]
)
def test_l2_trainers_ignore_the_prior(trainer_class, task):
    data, model = indexed(random_problem(np.random.default_rng(5), task=task, weighted=True))
    value, gradient, hessian = reference_for(data, model, 0.0, task)
    expected = reference_solve(value, gradient, hessian, np.zeros_like(model.theta))

    updated, _, metadata = trainer_class(
        training_data=data, initial_model=model, penalty=PENALTY, hessian_type=HessianType.FULL
    ).train()

    assert metadata.converged
    np.testing.assert_allclose(updated.theta, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(updated.hessian.toarray(), hessian(expected), rtol=1e-6)


def test_loss_and_gradient_are_the_documented_objective():
    data, model = indexed(random_problem(np.random.default_rng(3), weighted=True))
    value, gradient, _ = reference_for(data, model, 0.6, "logistic")
    trainer = TrainerSequentialBayesianLogisticLossWithL2(
        training_data=data, initial_model=model, penalty=PENALTY, delta=0.6
    )
    for theta in (model.theta, np.random.default_rng(0).normal(size=len(model.theta))):
        assert trainer.loss(theta) == pytest.approx(value(theta), rel=1e-12)
        np.testing.assert_allclose(trainer.gradient(theta), gradient(theta), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("hessian_type", list(HessianType))
def test_hessian_types(hessian_type):
    data, model = indexed(random_problem(np.random.default_rng(8)))
    full, _, _ = TrainerSequentialBayesianLogisticLossWithL2(
        training_data=data, initial_model=model, penalty=PENALTY
    ).train()
    updated, _, _ = TrainerSequentialBayesianLogisticLossWithL2(
        training_data=data, initial_model=model, penalty=PENALTY, hessian_type=hessian_type
    ).train()

    np.testing.assert_allclose(updated.theta, full.theta)
    if hessian_type is HessianType.NONE:
        assert updated.hessian is None and updated.variances is None
    elif hessian_type is HessianType.IDENTITY:
        np.testing.assert_array_equal(updated.hessian.toarray(), np.eye(len(updated.theta)))
    elif hessian_type is HessianType.DIAGONAL:
        np.testing.assert_allclose(updated.hessian.toarray(), np.diag(full.hessian.diagonal()))
        np.testing.assert_allclose(updated.variances, full.variances)
    else:
        assert (full.hessian.toarray() != np.diag(full.hessian.diagonal())).any()


def test_a_full_prior_precision_is_used_whole():
    data, model = indexed(random_problem(np.random.default_rng(4)))
    first, _, _ = TrainerSequentialBayesianLogisticLossWithL2(
        training_data=data, initial_model=model, penalty=PENALTY
    ).train()
    assert (first.hessian.toarray() != np.diag(first.hessian.diagonal())).any()
    deviation = np.random.default_rng(1).normal(size=len(first.theta))
    expected_prior_term = 0.5 * deviation @ first.hessian.toarray() @ deviation
    # Without data and with delta 1 the objective is the full quadratic prior term alone.
    empty = IndexedDataset(sparse.csr_array((0, len(first.theta))), [], [], [])
    prior_only = TrainerSequentialBayesianLogisticLossWithL2(
        training_data=empty, initial_model=first, penalty=PENALTY, delta=1.0
    )
    assert prior_only.loss(first.theta + deviation) == pytest.approx(expected_prior_term, rel=1e-12)


@pytest.mark.parametrize("failure", ["non-finite offset", "out of iterations"])
def test_a_failed_solve_returns_the_initial_model_and_says_so(failure):
    data, initial = indexed(random_problem(np.random.default_rng(2)))
    max_iterations = 1
    if failure == "non-finite offset":
        data.offsets[3] = np.nan
        max_iterations = 100
    trainer = TrainerSequentialBayesianLogisticLossWithL2(training_data=data, initial_model=initial, penalty=PENALTY)
    updated, _, metadata = trainer.train(max_iterations=max_iterations)
    assert not metadata.converged
    assert metadata.status.startswith("failed")
    assert updated is initial


def test_bad_settings_are_refused():
    data, model = indexed(random_problem(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="delta"):
        TrainerSequentialBayesianLogisticLossWithL2(training_data=data, initial_model=model, delta=1.5)
    with pytest.raises(ValueError, match="penalty"):
        TrainerLogisticLossWithL2(training_data=data, initial_model=model, penalty=-1.0)
    with pytest.raises(ValueError, match="coefficients"):
        TrainerLogisticLossWithL2(training_data=data, initial_model=IndexedModel(np.zeros(2)))


def test_extreme_margins_stay_finite():
    # Offsets of +-1000 overflow exp(); the stable loss does not.
    X = sparse.csr_array(np.ones((4, 1)))
    data = IndexedDataset(X, [1.0, 0.0, 1.0, 0.0], np.ones(4), [-1000.0, 1000.0, 900.0, -900.0])
    trainer = TrainerLogisticLossWithL2(training_data=data, initial_model=IndexedModel(np.zeros(1)), penalty=1.0)
    assert trainer.loss(np.zeros(1)) == pytest.approx(2000.0)
    updated, loss, metadata = trainer.train()
    assert metadata.converged and np.isfinite(loss) and np.isfinite(updated.theta).all()


ALL_TRAINERS = [
    TrainerSquareLossWithL2,
    TrainerLogisticLossWithL2,
    TrainerSequentialBayesianLogisticLossWithL2,
    TrainerSequentialBayesianSquareLossWithL2,
]


@pytest.mark.parametrize("trainer_class", ALL_TRAINERS)
def test_one_constructor_with_lambda_learners_defaults(trainer_class):
    data, model = indexed(random_problem(np.random.default_rng(6)))
    trainer = trainer_class(training_data=data, initial_model=model)
    assert trainer.param_reg == 0.0
    if trainer_class.sequential:
        assert trainer.hessian_type is HessianType.FULL and trainer.param_delta == 0.8
        assert trainer_class(training_data=data, initial_model=model, delta=0.3).param_delta == 0.3
    else:
        # The plain L2 trainers ignore the prior and, as in lambda-learner 0.1.0, take no delta.
        assert trainer.hessian_type is HessianType.NONE and trainer.param_delta == 0.0
        with pytest.raises(TypeError, match="delta"):
            trainer_class(training_data=data, initial_model=model, delta=0.5)
    with pytest.raises(TypeError):
        trainer_class(data, model)  # keyword arguments only
