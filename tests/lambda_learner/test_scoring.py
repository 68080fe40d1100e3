import hashlib

import numpy as np
import pytest
from scipy import sparse

from lambda_learner import (
    CoefficientTable,
    IndexedDataset,
    IndexedModel,
    hash_strings,
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


def test_one_draw_per_request_and_entity_or_per_row():
    # Two entities, one coefficient each (the intercept); six rows in two requests.
    features = sparse.csr_array(np.ones((6, 1)))
    entity = np.array([0, 0, 1, 0, 0, 1])
    request = np.array([0, 0, 0, 1, 1, 1])
    coefficients = table([[0.0], [5.0]], [[1.0], [1.0]])
    keys = hash_strings([f"request-{r}\x1fentity-{e}" for r, e in zip(request, entity, strict=True)])
    per_request = table_scores(features, np.zeros(6), entity, coefficients, sample=True, draw_keys=keys, seed=1)
    # Rows of the same entity in the same request share their draw; other requests draw again.
    assert per_request[0] == per_request[1] and per_request[3] == per_request[4]
    assert per_request[0] != per_request[3] and per_request[2] != per_request[5]
    assert per_request[2] - 5.0 != per_request[0]  # the entities' draws are independent
    per_row = table_scores(features, np.zeros(6), entity, coefficients, sample=True, seed=1)
    assert len(set(per_row.tolist())) == 6
    np.testing.assert_array_equal(
        per_row, table_scores(features, np.zeros(6), entity, coefficients, sample=True, seed=1)
    )


def test_rows_sharing_a_draw_key_share_the_normal_of_each_feature_key():
    # Keyed by the request alone, two entities in one request move together, feature by feature.
    features = sparse.csr_array(np.ones((2, 1)))
    coefficients = table([[0.0], [5.0]], [[1.0], [1.0]])
    scores = table_scores(
        features, np.zeros(2), np.array([0, 1]), coefficients, sample=True, draw_keys=np.array([3, 3]), seed=2
    )
    assert scores[1] - 5.0 == pytest.approx(scores[0], abs=1e-12)


def random_table(rng, entities, width, density=0.5):
    """Entities with random subsets of features 0..width-1, random means and variances."""
    owned = rng.random((entities, width)) < density
    splits = np.concatenate([[0], np.cumsum(owned.sum(axis=1))])
    ids = np.nonzero(owned)[1]
    means, variances = rng.normal(size=len(ids)), rng.uniform(0.1, 2.0, size=len(ids))
    return CoefficientTable.from_segments(splits, ids, means, variances, width)


def test_a_keyed_draw_is_the_same_alone_or_among_other_rows_in_any_order_or_column_layout():
    rng = np.random.default_rng(7)
    entities, width, rows = 5, 8, 40
    coefficients = random_table(rng, entities, width)
    features = sparse.random_array((rows, width), density=0.4, format="csr", rng=rng)
    offsets = rng.normal(size=rows)
    row_entity = rng.integers(-1, entities + 1, size=rows)  # -1 unknown, `entities` a cold-start entity
    draw_keys = hash_strings([f"request-{i % 7}\x1f{e}" for i, e in enumerate(row_entity)])
    feature_keys = hash_strings([f"feature-{j}" for j in range(width)])
    options = dict(sample=True, missing_variance=0.3, seed=11)

    together = table_scores(
        features, offsets, row_entity, coefficients, draw_keys=draw_keys, feature_keys=feature_keys, **options
    )
    for i in range(rows):
        alone = table_scores(
            features[[i]],
            offsets[[i]],
            row_entity[[i]],
            coefficients,
            draw_keys=draw_keys[[i]],
            feature_keys=feature_keys,
            **options,
        )
        assert alone[0] == together[i]
    order = rng.permutation(rows)
    shuffled = table_scores(
        features[order],
        offsets[order],
        row_entity[order],
        coefficients,
        draw_keys=draw_keys[order],
        feature_keys=feature_keys,
        **options,
    )
    np.testing.assert_array_equal(shuffled, together[order])
    # Another column numbering with the same feature keys: the same draws (up to summation order).
    columns = rng.permutation(width)
    renumbered = CoefficientTable.from_segments(
        np.searchsorted(coefficients.keys, np.arange(entities + 1) * width),
        np.argsort(columns)[coefficients.keys % width],
        coefficients.means,
        coefficients.variances,
        width,
    )
    relaid = table_scores(
        features[:, columns],
        offsets,
        row_entity,
        renumbered,
        draw_keys=draw_keys,
        feature_keys=feature_keys[columns],
        **options,
    )
    np.testing.assert_allclose(relaid, together, rtol=1e-12, atol=1e-12)


def test_different_draw_keys_and_different_seeds_draw_differently():
    features = sparse.csr_array(np.ones((2, 3)))
    coefficients = table([[0.0, 1.0, 2.0]], [[1.0, 1.0, 1.0]])
    entity = np.zeros(2, dtype=int)

    def draw(keys, seed):
        return table_scores(features, np.zeros(2), entity, coefficients, sample=True, draw_keys=keys, seed=seed)

    two_keys = draw(np.array([1, 2]), seed=0)
    assert two_keys[0] != two_keys[1]
    assert draw(np.array([1, 1]), seed=0)[1] == two_keys[0]
    assert draw(np.array([1, 2]), seed=1)[0] != two_keys[0]
    np.testing.assert_array_equal(draw(np.array([1, 2]), seed=0), two_keys)
    # Signed keys are taken as their 64-bit two's complement; seeds by their 64 low bits.
    np.testing.assert_array_equal(draw(np.array([-1]).repeat(2), 0), draw(np.array([2**64 - 1] * 2, np.uint64), 0))
    np.testing.assert_array_equal(draw(np.array([1, 2]), seed=-1), draw(np.array([1, 2]), seed=2**64 - 1))


def test_a_missing_coefficient_and_a_new_entity_draw_from_the_prior():
    # Entity 0 knows its intercept exactly (variance 0) and lacks feature 1; entity 1 has no coefficients.
    coefficients = CoefficientTable.from_segments(
        np.array([0, 1]), np.array([0]), np.array([0.5]), np.array([0.0]), width=2
    )
    x, draws, prior_variance = 3.0, 20_000, 0.4
    features = sparse.csr_array(np.tile([1.0, x], (draws, 1)))
    offsets = np.full(draws, 0.25)
    scores = {}
    for name, entity in {"missing feature": 0, "new entity": 1, "unknown": -1}.items():
        scores[name] = table_scores(
            features,
            offsets,
            np.full(draws, entity),
            coefficients,
            sample=True,
            missing_variance=prior_variance,
            seed=3,
        )
    # Standard error of the variance: sqrt(2 / draws) ~ 1%; 5% is five of them, and the draws are seeded.
    assert np.var(scores["missing feature"]) == pytest.approx(prior_variance * x**2, rel=0.05)
    assert np.mean(scores["missing feature"]) == pytest.approx(0.75, abs=0.05)
    assert np.var(scores["new entity"]) == pytest.approx(prior_variance * (1 + x**2), rel=0.05)
    assert np.mean(scores["new entity"]) == pytest.approx(0.25, abs=0.05)
    np.testing.assert_array_equal(scores["unknown"], offsets)  # an unknown row scores its offset alone
    # Without a prior variance nothing the entity lacks moves: the mean score.
    no_prior = table_scores(features, offsets, np.zeros(draws, dtype=int), coefficients, sample=True, seed=3)
    np.testing.assert_array_equal(no_prior, np.full(draws, 0.75))


def test_sampled_coefficients_have_the_stored_means_and_variances():
    # One-hot rows: each score is one sampled coefficient; every row draws its own (default keys).
    means, variances = np.array([[1.0, -2.0, 0.0, 0.3]]), np.array([[0.01, 4.0, 0.5, 0.0]])
    width, draws = means.shape[1], 10_000
    features = sparse.csr_array(np.tile(np.eye(width), (draws, 1)))
    scores = table_scores(
        features, np.zeros(width * draws), np.zeros(width * draws, dtype=int), table(means, variances), sample=True
    )
    sampled = scores.reshape(draws, width)
    # Five standard errors of the mean; the draws are seeded, so this cannot flake.
    assert (np.abs(sampled.mean(axis=0) - means[0]) <= 5 * np.sqrt(variances[0] / draws) + 1e-12).all()
    np.testing.assert_allclose(sampled.var(axis=0), variances[0], rtol=0.1, atol=1e-20)
    # The draws of different features and of different rows are uncorrelated.
    correlation = np.corrcoef(sampled[:, :3].T)
    np.testing.assert_allclose(correlation, np.eye(3), atol=0.05)
    np.testing.assert_allclose(np.corrcoef(sampled[:-1, 1], sampled[1:, 1])[0, 1], 0.0, atol=0.05)


def test_the_mean_path_ignores_the_sampling_options():
    rng = np.random.default_rng(4)
    coefficients = random_table(rng, 6, 10)
    features = sparse.random_array((50, 10), density=0.3, format="csr", rng=rng)
    offsets = rng.normal(size=50)
    row_entity = rng.integers(-1, 7, size=50)
    means, _ = coefficients.lookup(np.repeat(row_entity, 10), np.tile(np.arange(10), 50))
    expected = np.einsum("rf,rf->r", features.toarray(), means.reshape(50, 10)) + offsets
    plain = table_scores(features, offsets, row_entity, coefficients)
    np.testing.assert_allclose(plain, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(
        plain,
        table_scores(
            features, offsets, row_entity, coefficients, draw_keys=np.arange(50), missing_variance=5.0, seed=9
        ),
    )


def test_bad_sampling_options_are_refused():
    features, coefficients = sparse.csr_array(np.ones((2, 1))), table([[0.0]], [[1.0]])
    args = (features, np.zeros(2), np.zeros(2, dtype=int), coefficients)
    with pytest.raises(ValueError, match="draw_keys"):
        table_scores(*args, sample=True, draw_keys=np.arange(3))
    with pytest.raises(ValueError, match="feature_keys"):
        table_scores(*args, sample=True, feature_keys=np.arange(2))
    with pytest.raises(TypeError, match="draw_keys"):
        table_scores(*args, sample=True, draw_keys=np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="missing_variance"):
        table_scores(*args, sample=True, missing_variance=-1.0)
    with pytest.raises(TypeError, match="seed"):
        table_scores(*args, sample=True, seed=np.random.default_rng(0))


def test_hash_strings_is_stable_and_keeps_the_shape():
    keys = hash_strings(["request-1", "request-2", "request-1"])
    assert keys.dtype == np.uint64
    assert keys[0] == keys[2] != keys[1]
    # The 8-byte BLAKE2b digest, little-endian: the same on every machine and in every process.
    assert int(hash_strings(["request-1"])[0]) == 7239539881221587450
    assert int(hash_strings(["é"])[0]) == int.from_bytes(
        hashlib.blake2b("é".encode(), digest_size=8).digest(), "little"
    )
    a, b = hash_strings(["a", "b"])
    np.testing.assert_array_equal(hash_strings(np.array([["a", "b"], ["b", "a"]])), [[a, b], [b, a]])
    assert hash_strings([]).shape == (0,)
    with pytest.raises(TypeError, match="strings"):
        hash_strings(["a", 1])


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
