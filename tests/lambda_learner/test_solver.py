import numpy as np
import pytest

from lambda_learner.solver import (
    CholeskyFactor,
    Design,
    MatrixFactor,
    QuadraticPenalty,
    RowSpaceFactor,
    factorize_stack,
)


def hessians(rng, entities, rows, size):
    features = rng.normal(size=(entities, rows, size))
    weights = rng.uniform(0.0, 2.0, size=(entities, rows))
    curvature = rng.uniform(0.1, 3.0, size=(entities, size))
    penalty = QuadraticPenalty(curvature, np.zeros((entities, size)), np.zeros(entities))
    return Design(features), weights, penalty


@pytest.mark.parametrize(("rows", "size"), [(3, 10), (30, 10), (10, 60), (80, 60)])
def test_every_factorisation_solves_the_newton_system(rows, size):
    rng = np.random.default_rng(rows * size)
    design, weights, penalty = hessians(rng, 7, rows, size)
    rhs = rng.normal(size=(7, size))
    factor = design.factorize(weights, penalty)
    expected_kind = RowSpaceFactor if rows < size else (CholeskyFactor if size <= 48 else MatrixFactor)
    assert isinstance(factor, expected_kind)
    expected = np.linalg.solve(design.hessian(weights, penalty), rhs[:, :, None])[:, :, 0]
    np.testing.assert_allclose(factor.solve(rhs), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(factor.take(np.array([4, 1])).solve(rhs[[4, 1]]), expected[[4, 1]], rtol=1e-9)


@pytest.mark.parametrize("size", [5, 60])
def test_a_singular_matrix_gives_nan_for_its_entity_only(size):
    rng = np.random.default_rng(0)
    matrices = np.stack([np.eye(size) * 2.0, np.zeros((size, size)), np.eye(size)])
    solutions = factorize_stack(matrices).solve(rng.normal(size=(3, size)))
    assert np.isfinite(solutions[[0, 2]]).all()
    assert np.isnan(solutions[1]).all()
