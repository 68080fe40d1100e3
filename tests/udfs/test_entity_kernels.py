from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import expit

from lambda_learner import (
    BatchedSolver,
    Feature,
    IndexMap,
    TrainerSequentialBayesianLogisticLossWithL2,
    TrainingRecord,
    index_domain_coeffs_to_nt_domain_coeffs,
    nt_domain_coeffs_to_index_domain_coeffs,
    nt_domain_data_to_index_domain_data,
)
from udfs.entity_kernels import COEFFICIENT_FIELDS, FAILURES, ROW_FIELDS, UPDATE_FIELDS, ScoreKernel, UpdateKernel

PENALTY, DELTA = 2.0, 0.7


def random_prior(rng: np.random.Generator, entity_id: str) -> dict:
    """A prior over the intercept and a random half of six features."""
    terms = ["intercept"] + [f"f{j}" for j in range(6) if rng.random() < 0.5]
    names = ["intercept"] + ["x"] * (len(terms) - 1)
    return {
        "entity_id": entity_id,
        "names": np.array(names, dtype=object),
        "terms": np.array(terms, dtype=object),
        "means": rng.normal(0, 0.5, size=len(terms)),
        "variances": rng.uniform(0.1, 1.0, size=len(terms)),
        "updates": int(rng.integers(1, 5)),
        "total_rows": int(rng.integers(10, 100)),
    }


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
            priors.append(random_prior(rng, entity_id))
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


# --- several micro-batches per entity in one call ---------------------------------------------------------------

BATCH_IDS = (3, 11, 12, 40)
COEFFICIENT_COLUMNS = [name for name, _ in COEFFICIENT_FIELDS]


def random_batches(seed: int, task: str = "logistic", entities: int = 9, rows_per_batch=(1, 9)):
    """Rows of several entities over several batches (shuffled), and priors for some of them.

    An entity joins at a random batch (a new entity appears later), skips some batches, and
    its rows use a random part of its features (its coefficients grow from batch to batch).
    """
    rng = np.random.default_rng(seed)
    records, priors = [], []
    for entity in range(entities):
        entity_id = f"e{entity}"
        own = [f"f{j}" for j in range(6) if rng.random() < 0.7] or ["f0"]
        truth = rng.normal(0, 0.5, size=len(own))
        for batch_id in BATCH_IDS[rng.integers(len(BATCH_IDS)) :]:
            if rng.random() < 0.25:
                continue
            for _ in range(rng.integers(*rows_per_batch)):
                used = rng.random(len(own)) < 0.7
                values = rng.normal(size=len(own))
                offset = float(rng.normal(-0.3, 0.5))
                margin = values[used] @ truth[used] + offset
                label = float(rng.random() < expit(margin)) if task == "logistic" else float(margin + rng.normal())
                records.append(
                    {
                        "entity_id": entity_id,
                        "row_key": 1000 * seed + len(records),
                        "sample_key": int(rng.integers(-(2**62), 2**62)),
                        "label": label,
                        "weight": float(rng.uniform(0.5, 2.0)),
                        "offset": offset,
                        "names": np.array(["x"] * int(used.sum()), dtype=object),
                        "terms": np.array(own, dtype=object)[used],
                        "values": values[used],
                        "batch_id": batch_id,
                    }
                )
        if entity % 3 != 2:  # every third entity is new
            priors.append(random_prior(rng, entity_id))
    rows = pd.DataFrame(records, columns=[name for name, _ in ROW_FIELDS])
    rows = rows.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return rows, pd.DataFrame(priors, columns=COEFFICIENT_COLUMNS)


def batch_by_batch(kernel: UpdateKernel, rows: pd.DataFrame, priors: pd.DataFrame):
    """The reference: one kernel call per batch, each fed the coefficients the calls before it left.

    Returns the final state (entity_id index), per entity the figures the calls add up to, and
    every row's score under its entity's state right after the row's batch (ScoreKernel).
    """
    state = priors.set_index("entity_id")
    totals: dict[str, dict] = {}
    scores: dict[int, float] = {}
    for batch_id in sorted(rows.batch_id.unique()):
        batch_rows = rows[rows.batch_id == batch_id].reset_index(drop=True)
        current = state.loc[state.index.intersection(batch_rows.entity_id.unique())].reset_index()
        updated = kernel(batch_rows, current)
        assert (updated.batches == 1).all()
        for _, entity in updated.iterrows():
            total = totals.setdefault(
                entity.entity_id,
                {"batches": 0, "converged_batches": 0, "converged_rows": 0, "rows": 0, "iterations": 0}
                | {"loss_before": 0.0, "loss_after": 0.0, "failure": None},
            )
            total["batches"] += 1
            total["converged_batches"] += int(entity.converged)
            total["converged_rows"] += int(entity.rows) if entity.converged else 0
            for column in ("rows", "iterations", "loss_before", "loss_after"):
                total[column] += entity[column]
            total["failure"] = total["failure"] or entity.failure
        coefficients = updated[COEFFICIENT_COLUMNS].set_index("entity_id")
        state = pd.concat([state.drop(coefficients.index, errors="ignore"), coefficients])
        scored = ScoreKernel()(batch_rows, state.reset_index())
        scores.update(zip(scored.row_key, scored.score, strict=True))
    return state, totals, scores


def assert_same_coefficients(got: pd.Series, expected: pd.Series, rtol: float = 1e-9) -> None:
    got_terms = sorted(zip(got.names, got.terms, got.means, got.variances, strict=True))
    expected_terms = sorted(zip(expected.names, expected.terms, expected.means, expected.variances, strict=True))
    assert [nt[:2] for nt in got_terms] == [nt[:2] for nt in expected_terms]
    for column in (2, 3):
        np.testing.assert_allclose(
            [nt[column] for nt in got_terms], [nt[column] for nt in expected_terms], rtol=rtol, atol=1e-12
        )


def poison(rows: pd.DataFrame, priors: pd.DataFrame, seed: int) -> None:
    """One random row or prior made unusable, in place."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(4)
    if kind == 3 and len(priors):  # a NaN variance
        variances = priors.at[int(rng.integers(len(priors))), "variances"]
        variances[rng.integers(len(variances))] = np.nan
        return
    column, value = [("offset", np.inf), ("label", np.nan), ("weight", -1.0), ("offset", -np.inf)][kind]
    rows.at[int(rng.integers(len(rows))), column] = value


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    max_rows=st.sampled_from([2, 3, 1000]),
    min_rows=st.sampled_from([1, 2]),
    task=st.sampled_from(["logistic", "linear"]),
    poisoned=st.booleans(),
)
def test_several_batches_in_one_call_equal_one_call_per_batch(seed, max_rows, min_rows, task, poisoned):
    rows, priors = random_batches(seed, task)
    if poisoned:
        poison(rows, priors, seed)
    kernel = UpdateKernel(task, PENALTY, DELTA, max_rows_per_entity=max_rows, min_rows=min_rows)
    state, totals, scores = batch_by_batch(kernel, rows, priors)

    result = kernel(rows, priors)
    assert list(result.columns) == [name for name, _ in UPDATE_FIELDS]
    assert sorted(result.entity_id) == sorted(totals)
    by_prior = priors.set_index("entity_id")
    for _, updated in result.iterrows():
        total = totals[updated.entity_id]
        assert_same_coefficients(updated, state.loc[updated.entity_id])
        for column in ("batches", "converged_batches", "converged_rows", "rows", "iterations", "failure"):
            assert updated[column] == total[column], column
        assert updated.converged == (total["converged_batches"] == total["batches"])
        assert updated.loss_before == pytest.approx(total["loss_before"], rel=1e-9, abs=1e-12)
        assert updated.loss_after == pytest.approx(total["loss_after"], rel=1e-9, abs=1e-12)
        assert updated.had_prior == (updated.entity_id in by_prior.index)
        if updated.had_prior:  # the counts the entity had before its first batch, for the caller to advance
            prior = by_prior.loc[updated.entity_id]
            assert (updated.updates, updated.total_rows) == (prior.updates, prior.total_rows)
        else:
            assert (updated.updates, updated.total_rows) == (0, 0)
        # Every row of the entity, capped or skipped ones too, scored after its own batch.
        assert sorted(updated.row_keys) == sorted(rows.row_key[rows.entity_id == updated.entity_id])
        expected = [scores[key] for key in updated.row_keys]
        np.testing.assert_allclose(updated.row_scores, expected, rtol=1e-9, atol=1e-12)


def test_row_scores_follow_the_state_after_each_rows_batch():
    # One entity, a prior on its intercept only, batches 1 and 2 over a feature it gains in batch 1.
    rows = pd.DataFrame(
        {
            "entity_id": "a",
            "row_key": [10, 11, 20, 21],
            "sample_key": [1, 2, 1, 2],
            "label": [1.0, 0.0, 1.0, 1.0],
            "weight": 1.0,
            "offset": [0.5, -0.5, 0.25, 9.0],  # offsets never count in a row's score
            "names": [np.array(["x"], dtype=object)] * 4,
            "terms": [np.array(["f"], dtype=object)] * 4,
            "values": [np.array([v]) for v in (1.0, -2.0, 0.5, 3.0)],
            "batch_id": [1, 1, 2, 2],
        }
    )
    priors = pd.DataFrame(
        {
            "entity_id": ["a"],
            "names": [np.array(["intercept"], dtype=object)],
            "terms": [np.array(["intercept"], dtype=object)],
            "means": [np.array([0.2])],
            "variances": [np.array([0.5])],
            "updates": [3],
            "total_rows": [30],
        }
    )
    kernel = UpdateKernel("logistic", PENALTY, DELTA, max_rows_per_entity=100)
    after_first = kernel(rows[rows.batch_id == 1], priors)
    after_second = kernel(rows[rows.batch_id == 2], after_first[COEFFICIENT_COLUMNS])
    result = kernel(rows, priors).iloc[0]

    def score(state: pd.DataFrame, row_key: int) -> float:
        return ScoreKernel()(rows[rows.row_key == row_key], state).score.iloc[0]

    expected = {10: score(after_first, 10), 11: score(after_first, 11)}
    expected |= {20: score(after_second, 20), 21: score(after_second, 21)}
    assert dict(zip(result.row_keys, result.row_scores, strict=True)) == pytest.approx(expected, rel=1e-12)
    assert (result.batches, result.converged_batches, result.converged_rows, result.rows) == (2, 2, 4, 4)
    assert (result.updates, result.total_rows) == (3, 30)  # the caller adds 2 updates and 4 rows
    assert result.loss_before == pytest.approx(after_first.loss_before[0] + after_second.loss_before[0], rel=1e-12)
    assert_same_coefficients(result, after_second.iloc[0], rtol=1e-12)


def test_the_cap_and_the_minimum_apply_per_entity_and_batch():
    rows, priors = random_batches(13, entities=12, rows_per_batch=(1, 8))
    kept = rows.sort_values("sample_key").groupby(["entity_id", "batch_id"]).head(4)
    kept = kept[kept.groupby(["entity_id", "batch_id"]).row_key.transform("size") >= 3]
    assert len(kept) < len(rows) and kept.entity_id.nunique() < rows.entity_id.nunique()

    result = UpdateKernel("logistic", PENALTY, DELTA, max_rows_per_entity=4, min_rows=3)(rows, priors)
    unrestricted = UpdateKernel("logistic", PENALTY, DELTA, max_rows_per_entity=1000)(kept, priors)

    assert sorted(result.entity_id) == sorted(unrestricted.entity_id)
    for (_, got), (_, expected) in zip(result.iterrows(), unrestricted.iterrows(), strict=True):
        assert_same_coefficients(got, expected)
        assert (got.rows, got.batches) == (expected.rows, expected.batches)
        assert got.batches == kept[kept.entity_id == got.entity_id].batch_id.nunique()
        assert len(got.row_keys) == (rows.entity_id == got.entity_id).sum()  # every row of the entity is scored


@pytest.mark.parametrize("batch_id", [None, 7])
def test_one_batch_reports_one_update_of_all_its_rows(batch_id):
    rows, priors = random_group(3)
    if batch_id is not None:
        rows = rows.assign(batch_id=batch_id)
    result = UpdateKernel("logistic", PENALTY, DELTA, max_rows_per_entity=1000)(rows, priors)

    assert result.converged.all() and result.failure.isna().all()
    assert (result.batches == 1).all() and (result.converged_batches == 1).all()
    assert (result.converged_rows == result.rows).all()
    scored = ScoreKernel()(rows, result[COEFFICIENT_COLUMNS]).set_index("row_key").score
    for _, updated in result.iterrows():
        np.testing.assert_allclose(updated.row_scores, scored.loc[updated.row_keys], rtol=1e-12, atol=1e-15)


def test_the_result_converts_to_the_spark_schema():
    rows, priors = random_batches(11)
    poison(rows, priors, 0)
    result = UpdateKernel("logistic", PENALTY, DELTA, max_rows_per_entity=3)(rows, priors)
    kinds = {
        "string": pa.string(),
        "long": pa.int64(),
        "int": pa.int32(),
        "double": pa.float64(),
        "boolean": pa.bool_(),
    }

    def arrow(kind: str) -> pa.DataType:
        return pa.list_(kinds[kind[6:-1]]) if kind.startswith("array<") else kinds[kind]

    schema = pa.schema([(name, arrow(kind)) for name, kind in UPDATE_FIELDS])
    table = pa.Table.from_pandas(result, schema=schema, preserve_index=False, safe=True)
    assert table.num_rows == len(result)


# --- one bad entity never fails its group ------------------------------------------------------------------------


def set_value(frame: pd.DataFrame, entity_id: str, column: str, value, position: int | None = None) -> None:
    """In place: ``column`` of the entity's first row, or one element of that array column."""
    index = frame.index[frame.entity_id == entity_id][0]
    if position is None:
        frame.at[index, column] = value
        return
    array = np.array(frame.at[index, column], dtype=np.float64, copy=True)
    array[position] = value
    frame.at[index, column] = array


POISONS = {
    "offset inf": ("rows", "offset", np.inf, None, "non_finite_input"),
    "label nan": ("rows", "label", np.nan, None, "non_finite_input"),
    "weight inf": ("rows", "weight", np.inf, None, "non_finite_input"),
    "negative weight": ("rows", "weight", -1.0, None, "negative_weight"),
    "value nan": ("rows", "values", np.nan, 0, "non_finite_input"),
    "value 1e308": ("rows", "values", 1e308, 0, "non_finite_result"),
    "variance nan": ("priors", "variances", np.nan, 0, "non_finite_prior"),
    "variance inf": ("priors", "variances", np.inf, 0, "non_finite_prior"),
    "variance zero": ("priors", "variances", 0.0, 0, "non_finite_prior"),
    "mean inf": ("priors", "means", -np.inf, 0, "non_finite_prior"),
}


@pytest.mark.parametrize("poisoned", sorted(POISONS))
def test_a_poisoned_entity_fails_alone_and_keeps_its_prior(poisoned):
    rows, priors = random_group(1, entities=6, rows_per_entity=(5, 20))
    kernel = UpdateKernel("logistic", PENALTY, DELTA, max_rows_per_entity=1000)
    healthy = kernel(rows[rows.entity_id != "e0"], priors).set_index("entity_id")
    frame, column, value, position, reason = POISONS[poisoned]
    set_value(rows if frame == "rows" else priors, "e0", column, value, position)

    result = kernel(rows, priors).set_index("entity_id")

    assert result.loc["e0"].failure == reason
    bad = result.loc["e0"]
    assert not bad.converged and (bad.batches, bad.converged_batches, bad.converged_rows) == (1, 0, 0)
    prior = priors.set_index("entity_id").loc["e0"]
    for field in ("names", "terms", "means", "variances"):
        np.testing.assert_array_equal(bad[field], prior[field])
    assert (bad.updates, bad.total_rows) == (prior.updates, prior.total_rows)
    assert np.isfinite(bad.loss_before) and bad.loss_after == bad.loss_before
    assert len(bad.row_scores) == (rows.entity_id == "e0").sum()
    others = result.drop(index="e0")
    assert others.converged.all() and others.failure.isna().all()
    for entity_id, updated in others.iterrows():
        assert_same_coefficients(updated, healthy.loc[entity_id])
        assert updated.loss_after == pytest.approx(healthy.loc[entity_id].loss_after, rel=1e-9)
        np.testing.assert_allclose(updated.row_scores, healthy.loc[entity_id].row_scores, rtol=1e-9)


def test_a_group_of_bad_entities_only_returns_each_failed():
    rows, priors = random_batches(3, entities=4)
    rows["offset"] = np.inf
    result = UpdateKernel("logistic", PENALTY, DELTA, max_rows_per_entity=1000)(rows, priors)
    assert sorted(result.entity_id) == sorted(rows.entity_id.unique())
    assert (result.failure == "non_finite_input").all() and (result.converged_batches == 0).all()
    assert (result.batches == rows.groupby("entity_id").batch_id.nunique().loc[result.entity_id].to_numpy()).all()
    assert (result.loss_before == 0).all() and (result.loss_after == 0).all()


def test_a_poisoned_batch_is_skipped_and_the_entity_goes_on_from_the_batch_before():
    rows, priors = random_batches(5, entities=6, rows_per_batch=(3, 6))
    kernel = UpdateKernel("logistic", PENALTY, DELTA, max_rows_per_entity=1000)
    batches = rows.groupby("entity_id").batch_id.unique().map(sorted)
    entity_id = next(e for e, ids in batches.items() if len(ids) >= 3)
    middle = batches[entity_id][1]
    in_middle = (rows.entity_id == entity_id) & (rows.batch_id == middle)
    without_middle = kernel(rows[~in_middle], priors).set_index("entity_id").loc[entity_id]
    rows.loc[rows.index[in_middle][0], "offset"] = np.nan

    result = kernel(rows, priors).set_index("entity_id").loc[entity_id]

    assert not result.converged and result.failure == "non_finite_input"
    assert (result.batches, result.converged_batches) == (len(batches[entity_id]), len(batches[entity_id]) - 1)
    assert result.converged_rows == without_middle.rows
    assert_same_coefficients(result, without_middle, rtol=1e-9)
    assert result.loss_after - result.loss_before == pytest.approx(
        without_middle.loss_after - without_middle.loss_before, rel=1e-9
    )


def test_a_non_finite_solver_result_keeps_the_prior(monkeypatch):
    rows, priors = random_group(2, entities=4, rows_per_entity=(5, 10))
    kernel = UpdateKernel("logistic", PENALTY, DELTA, max_rows_per_entity=1000)
    clean = kernel(rows, priors).set_index("entity_id")
    solve = BatchedSolver.solve

    def corrupted(self, batch):  # the first entity's update comes back converged but with a NaN variance
        result = solve(self, batch)
        variances = result.variances.copy()
        variances[result.coefficient_splits[0]] = np.nan
        return replace(result, variances=variances)

    monkeypatch.setattr(BatchedSolver, "solve", corrupted)
    result = kernel(rows, priors).set_index("entity_id")

    first = result.loc["e0"]
    assert not first.converged and first.failure == "non_finite_result"
    np.testing.assert_array_equal(first.means, priors.set_index("entity_id").loc["e0"].means)
    assert first.loss_after == first.loss_before == clean.loc["e0"].loss_before
    for entity_id in ("e1", "e2", "e3"):
        np.testing.assert_array_equal(result.loc[entity_id].means, clean.loc[entity_id].means)


def test_failure_reasons_are_the_documented_ones():
    assert FAILURES[0] is None
    assert set(FAILURES[1:]) == {
        "non_finite_input",
        "negative_weight",
        "non_finite_prior",
        "no_convergence",
        "non_finite_result",
    }
