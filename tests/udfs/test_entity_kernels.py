import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from lambda_learner import (
    Feature,
    IndexMap,
    TrainerSequentialBayesianLogisticLossWithL2,
    TrainingRecord,
    index_domain_coeffs_to_nt_domain_coeffs,
    nt_domain_coeffs_to_index_domain_coeffs,
    nt_domain_data_to_index_domain_data,
)
from udfs.entity_kernels import COEFFICIENT_FIELDS, UPDATE_FIELDS, ScoreKernel, UpdateKernel

PENALTY, DELTA = 2.0, 0.7


def random_group(seed: int, entities: int = 6, rows_per_entity=(1, 40)):
    """Rows of several entities (shuffled), and priors for some of them over overlapping features."""
    rng = np.random.default_rng(seed)
    records, priors = [], []
    for entity in range(entities):
        entity_id = f"e{entity}"
        own = [f"f{j}" for j in range(6) if rng.random() < 0.6] or ["f0"]
        for _ in range(rng.integers(*rows_per_entity)):
            values = rng.normal(size=len(own))
            margin = values.sum() * 0.3 + rng.normal(-0.5, 0.5)
            records.append(
                {
                    "entity_id": entity_id,
                    "row_key": len(records),
                    "sample_key": int(rng.integers(0, 2**62)),
                    "label": float(rng.random() < expit(margin)),
                    "weight": float(rng.uniform(0.5, 2.0)),
                    "offset": float(rng.normal(-0.5, 0.5)),
                    "names": np.array(["x"] * len(own), dtype=object),
                    "terms": np.array(own, dtype=object),
                    "values": values,
                }
            )
        if entity % 3 != 2:  # every third entity is new
            terms = ["intercept"] + [f"f{j}" for j in range(6) if rng.random() < 0.5]
            names = ["intercept"] + ["x"] * (len(terms) - 1)
            priors.append(
                {
                    "entity_id": entity_id,
                    "names": np.array(names, dtype=object),
                    "terms": np.array(terms, dtype=object),
                    "means": rng.normal(0, 0.5, size=len(terms)),
                    "variances": rng.uniform(0.1, 1.0, size=len(terms)),
                    "updates": int(rng.integers(1, 5)),
                    "total_rows": int(rng.integers(10, 100)),
                }
            )
    rows = pd.DataFrame(records).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return rows, pd.DataFrame(priors, columns=[name for name, _ in COEFFICIENT_FIELDS])


def per_entity_update(rows: pd.DataFrame, prior: pd.Series | None) -> dict:
    """The same entity through the per-entity API, name-term-value in and out."""
    records = [
        TrainingRecord(
            row.label,
            row.weight,
            row.offset,
            [Feature(n, t, v) for n, t, v in zip(row.names, row.terms, row["values"], strict=True)],
        )
        for _, row in rows.iterrows()
    ]
    means, variances = [], []
    if prior is not None:
        name_terms = list(zip(prior.names, prior.terms, strict=True))
        means = [Feature(*nt, m) for nt, m in zip(name_terms, prior.means, strict=True)]
        variances = [Feature(*nt, v) for nt, v in zip(name_terms, prior.variances, strict=True)]
    index_map, _ = IndexMap.from_records_means_and_variances(records, means, variances)
    model = nt_domain_coeffs_to_index_domain_coeffs(means, variances, index_map, PENALTY)
    data = nt_domain_data_to_index_domain_data(records, index_map)
    updated, _, metadata = TrainerSequentialBayesianLogisticLossWithL2(
        training_data=data, initial_model=model, penalty=PENALTY, delta=DELTA
    ).train()
    assert metadata.converged
    coefficient_means, coefficient_variances = index_domain_coeffs_to_nt_domain_coeffs(updated, index_map)
    return {nt: (coefficient_means[nt], coefficient_variances[nt]) for nt in coefficient_means}


def as_dict(result_row: pd.Series) -> dict:
    return {
        (n, t): (m, v)
        for n, t, m, v in zip(result_row.names, result_row.terms, result_row.means, result_row.variances, strict=True)
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_group_update_equals_the_per_entity_update_of_each_entity(seed):
    rows, priors = random_group(seed)
    result = UpdateKernel("logistic", PENALTY, DELTA, max_rows_per_entity=1000)(rows, priors)

    assert list(result.columns) == [name for name, _ in UPDATE_FIELDS]
    assert sorted(result.entity_id) == sorted(rows.entity_id.unique())
    assert result.converged.all()
    for _, updated in result.iterrows():
        prior = (
            priors.set_index("entity_id").loc[updated.entity_id] if updated.entity_id in set(priors.entity_id) else None
        )
        expected = per_entity_update(rows[rows.entity_id == updated.entity_id], prior)
        got = as_dict(updated)
        assert got.keys() == expected.keys()
        for name_term, (mean, variance) in expected.items():
            assert got[name_term][0] == pytest.approx(mean, rel=1e-6, abs=1e-9)
            assert got[name_term][1] == pytest.approx(variance, rel=1e-6)
        assert updated.rows == (rows.entity_id == updated.entity_id).sum()
        assert updated.had_prior == (prior is not None)
        if prior is not None:  # the state's counts pass through untouched
            assert (updated.updates, updated.total_rows) == (prior.updates, prior.total_rows)
        assert updated.loss_after <= updated.loss_before + 1e-9 or prior is None


def test_whole_entities_give_the_same_result_in_any_grouping():
    rows, priors = random_group(4, entities=9)
    kernel = UpdateKernel("logistic", PENALTY, DELTA, max_rows_per_entity=1000)
    together = kernel(rows, priors).set_index("entity_id")
    for entity_id, entity_rows in rows.groupby("entity_id"):
        alone = kernel(entity_rows, priors[priors.entity_id == entity_id]).set_index("entity_id").loc[entity_id]
        np.testing.assert_allclose(alone.means, together.loc[entity_id].means, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(alone.terms, together.loc[entity_id].terms)


def test_rows_over_the_cap_are_sampled_by_their_key():
    rows, priors = random_group(5, entities=2, rows_per_entity=(30, 31))
    capped = UpdateKernel("logistic", PENALTY, DELTA, max_rows_per_entity=7)(rows, priors).set_index("entity_id")
    kept = rows.sort_values("sample_key").groupby("entity_id").head(7)
    uncapped = UpdateKernel("logistic", PENALTY, DELTA, max_rows_per_entity=1000)(kept, priors).set_index("entity_id")
    assert (capped.rows == 7).all()
    for entity_id in capped.index:
        np.testing.assert_allclose(capped.loc[entity_id].means, uncapped.loc[entity_id].means)


def test_entities_below_the_minimum_are_left_out():
    rows, priors = random_group(6, entities=5, rows_per_entity=(1, 6))
    counts = rows.entity_id.value_counts()
    result = UpdateKernel("logistic", PENALTY, 0.0, max_rows_per_entity=1000, min_rows=3)(rows, priors)
    assert set(result.entity_id) == set(counts[counts >= 3].index)


def test_a_group_without_rows_gives_an_empty_frame_with_the_columns():
    rows, priors = random_group(7)
    result = UpdateKernel("logistic", PENALTY, DELTA, max_rows_per_entity=1000)(rows.iloc[:0], priors)
    assert result.empty and list(result.columns) == [name for name, _ in UPDATE_FIELDS]


def test_scores_are_each_rows_dot_product_with_its_entitys_means():
    rows, priors = random_group(8)
    scored = ScoreKernel()(rows, priors).set_index("row_key").loc[rows.row_key]
    by_entity = priors.set_index("entity_id")
    for (_, row), score in zip(rows.iterrows(), scored.score, strict=True):
        if row.entity_id not in by_entity.index:
            assert score == 0.0  # no coefficients yet: the fixed effect alone
            continue
        entity = by_entity.loc[row.entity_id]
        coefficients = dict(zip(zip(entity.names, entity.terms, strict=True), entity.means, strict=True))
        expected = coefficients.get(("intercept", "intercept"), 0.0) + sum(
            value * coefficients.get((name, term), 0.0)
            for name, term, value in zip(row.names, row.terms, row["values"], strict=True)
        )
        assert score == pytest.approx(expected, rel=1e-12, abs=1e-12)
