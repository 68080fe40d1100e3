import numpy as np
import pytest

from lambda_learner import (
    Feature,
    IndexedDataset,
    IndexedModel,
    IndexMap,
    TrainingRecord,
    index_domain_coeffs_to_nt_domain_coeffs,
    nt_domain_coeffs_to_index_domain_coeffs,
    nt_domain_data_to_index_domain_data,
)


def test_features_are_hashable_values():
    assert Feature("a", "b", 1.0) == Feature("a", "b", 1.0)
    assert len({Feature("a", "b", 1.0), Feature("a", "b", 1.0), Feature("a", "c", 1.0)}) == 2
    assert Feature("a", "b", 2.0).name_term == ("a", "b")


def test_index_map_puts_the_intercept_first_and_counts_what_it_saw():
    records = [
        TrainingRecord(1.0, 1.0, 0.0, [Feature("x", "1", 1.0), Feature("x", "2", 1.0), Feature("x", "1", 3.0)]),
        TrainingRecord(0.0, 1.0, 0.0, [Feature("y", "", 1.0)]),
    ]
    means = [Feature("intercept", "intercept", 0.1), Feature("x", "2", 0.5), Feature("z", "", 0.2)]
    variances = [Feature("x", "2", 0.1)]
    index_map, metadata = IndexMap.from_records_means_and_variances(records, means, variances)
    assert list(index_map) == [("intercept", "intercept"), ("x", "2"), ("z", ""), ("x", "1"), ("y", "")]
    assert index_map.intercept_index == 0
    assert metadata == {"num_nts_in_both": 1, "num_nts_in_coeffs_only": 1, "num_nts_in_records_only": 2}
    assert index_map.get_nt(3) == ("x", "1") and ("y", "") in index_map
    with pytest.raises(IndexError, match="not in the index map"):
        index_map.get_index(("nope", ""))
    with pytest.raises(IndexError):
        index_map.get_nt(5)


def test_records_become_a_design_matrix_with_the_intercept():
    records = [
        TrainingRecord(1.0, 2.0, 0.5, [Feature("x", "1", 3.0)]),
        TrainingRecord(2.5, 1.0, -0.5, [Feature("x", "2", 4.0), Feature("x", "1", 1.0)]),
    ]
    index_map, _ = IndexMap.from_records_means_and_variances(records, [], [])
    data = nt_domain_data_to_index_domain_data(records, index_map)
    np.testing.assert_array_equal(data.X.toarray(), [[1.0, 3.0, 0.0], [1.0, 1.0, 4.0]])
    np.testing.assert_array_equal(data.y, [1.0, 2.5])  # regression labels stay real
    np.testing.assert_array_equal(data.w, [2.0, 1.0])
    np.testing.assert_array_equal(data.offsets, [0.5, -0.5])


def test_models_round_trip_and_missing_variances_take_the_penalty():
    index_map = IndexMap()
    index_map.batch_push([("x", "1"), ("x", "2")])
    means = [Feature("x", "1", 0.5), Feature("intercept", "intercept", -1.0)]
    variances = [Feature("x", "1", 0.25)]
    model = nt_domain_coeffs_to_index_domain_coeffs(means, variances, index_map, regularization_param=4.0)
    np.testing.assert_array_equal(model.theta, [-1.0, 0.5, 0.0])
    np.testing.assert_array_equal(model.hessian.diagonal(), [4.0, 4.0, 4.0])
    back_means, back_variances = index_domain_coeffs_to_nt_domain_coeffs(model, index_map)
    assert back_means == {("intercept", "intercept"): -1.0, ("x", "1"): 0.5, ("x", "2"): 0.0}
    assert back_variances == {("intercept", "intercept"): 0.25, ("x", "1"): 0.25, ("x", "2"): 0.25}


def test_a_nonpositive_variance_is_refused():
    with pytest.raises(ValueError, match="variance of"):
        nt_domain_coeffs_to_index_domain_coeffs([], [Feature("intercept", "intercept", 0.0)], IndexMap(), 1.0)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="labels"):
        IndexedDataset(np.ones((2, 1)), [1.0], [1.0, 1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="hessian shape"):
        IndexedModel(np.zeros(2), np.eye(3))
