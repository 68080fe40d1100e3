import numpy as np
import pytest
from scipy import sparse

from lambda_learner import (
    CoefficientTable,
    IndexedDataset,
    IndexedModel,
    probabilities,
    score_linear_model,
    table_scores,
    thompson_sample,
)


def test_mean_scores_are_linear_plus_offset():
    data = IndexedDataset(sparse.csr_array([[1.0, 2.0], [1.0, -1.0]]), [1, 0], [1, 1], [0.5, -0.5])
    model = IndexedModel(np.array([0.25, 1.0]))
    np.testing.assert_allclose(score_linear_model(model, data), [2.75, -1.25])
    np.testing.assert_allclose(probabilities(np.array([0.0])), [0.5])


def test_sampled_scores_need_variances():
    data = IndexedDataset(np.eye(2), [1, 0], [1, 1], [0, 0])
    with pytest.raises(ValueError, match="variances"):
        score_linear_model(IndexedModel(np.zeros(2)), data, exploration_threshold=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        score_linear_model(IndexedModel(np.zeros(2)), data, exploration_threshold=-1.0)


def test_thompson_draws_have_the_stored_mean_and_variance_and_are_seeded():
    means, variances = np.array([1.0, -2.0, 0.0]), np.array([0.01, 4.0, 0.0])
    draws = thompson_sample(means, variances, seed=3, draws=20000)
    np.testing.assert_allclose(draws.mean(axis=0), means, atol=0.05)
    np.testing.assert_allclose(draws.var(axis=0), variances, rtol=0.05)
    np.testing.assert_array_equal(draws, thompson_sample(means, variances, seed=3, draws=20000))
    assert not np.array_equal(draws, thompson_sample(means, variances, seed=4, draws=20000))


def table(means, variances):
    """Entities 0..E-1 with coefficients on features 0..D-1 (dense arrays for brevity)."""
    means, variances = np.asarray(means, float), np.asarray(variances, float)
    entities, width = means.shape
    splits = np.arange(entities + 1) * width
    return CoefficientTable.from_segments(
        splits, np.tile(np.arange(width), entities), means.ravel(), variances.ravel(), width
    )


def test_mean_table_scores_look_up_each_rows_entity():
    features = sparse.csr_array(np.array([[1.0, 2.0], [1.0, 0.0], [1.0, 1.0]]))
    coefficients = table([[0.5, 1.0], [-1.0, 3.0]], np.ones((2, 2)))
    scores = table_scores(features, np.array([0.0, 0.1, 0.2]), np.array([0, 1, -1]), coefficients)
    np.testing.assert_allclose(scores, [2.5, -0.9, 0.2])  # an unknown entity (-1) scores its offset


def test_one_draw_per_request_or_per_row():
    # Two entities, one coefficient each (the intercept); six rows in two requests.
    features = sparse.csr_array(np.ones((6, 1)))
    entity = np.array([0, 0, 1, 0, 0, 1])
    request = np.array([0, 0, 0, 1, 1, 1])
    coefficients = table([[0.0], [5.0]], [[1.0], [1.0]])
    per_request = table_scores(features, np.zeros(6), entity, coefficients, sample=True, draw_group=request, seed=1)
    # Rows of the same entity in the same request share their draw; other requests draw again.
    assert per_request[0] == per_request[1] and per_request[3] == per_request[4]
    assert per_request[0] != per_request[3] and per_request[2] != per_request[5]
    per_row = table_scores(features, np.zeros(6), entity, coefficients, sample=True, seed=1)
    assert len(set(per_row.tolist())) == 6
    np.testing.assert_array_equal(
        per_row, table_scores(features, np.zeros(6), entity, coefficients, sample=True, seed=1)
    )


def test_sampled_scores_are_centred_on_the_mean_score_with_the_variance():
    rng = np.random.default_rng(0)
    features = sparse.csr_array(rng.normal(size=(4000, 3)))
    means, variances = np.array([[0.5, -1.0, 2.0]]), np.array([[0.1, 0.2, 0.3]])
    offsets = rng.normal(size=4000)
    scores = table_scores(features, offsets, np.zeros(4000, dtype=int), table(means, variances), sample=True, seed=5)
    residual = scores - (features @ means[0] + offsets)
    expected_variance = (features.toarray() ** 2) @ variances[0]
    assert abs(residual.mean()) < 0.05
    assert np.mean(residual**2) == pytest.approx(expected_variance.mean(), rel=0.1)
