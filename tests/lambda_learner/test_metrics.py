import itertools

import numpy as np
import pytest

from lambda_learner import auc, calibration, evaluate, log_loss, per_entity_auc, rmse


def brute_force_auc(scores, labels, weights):
    """Weighted share of (positive, negative) pairs ranked right, ties counting one half."""
    won = total = 0.0
    for i, j in itertools.product(range(len(scores)), repeat=2):
        if labels[i] > 0 and labels[j] <= 0:
            pair = weights[i] * weights[j]
            total += pair
            won += pair * (1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0)
    return won / total


@pytest.mark.parametrize("seed", range(5))
def test_weighted_auc_with_ties_matches_the_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties
    labels = rng.integers(0, 2, size=40).astype(float)
    weights = rng.uniform(0.1, 3.0, size=40)
    assert auc(scores, labels, weights) == pytest.approx(brute_force_auc(scores, labels, weights))
    assert auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels, np.ones(40)))


def test_auc_extremes():
    assert auc([0.1, 0.9], [0, 1]) == 1.0
    assert auc([0.9, 0.1], [0, 1]) == 0.0
    assert np.isnan(auc([0.1, 0.9], [1, 1]))


def test_per_entity_auc_drops_single_class_entities_and_averages_unweighted():
    rng = np.random.default_rng(1)
    entity = np.repeat(["a", "b", "c", "d"], 15)
    scores = rng.normal(size=60)
    labels = (rng.random(60) < 0.5).astype(float)
    labels[entity == "c"] = 1.0  # one class only: no AUC
    weights = rng.uniform(0.5, 2.0, size=60)
    expected = [brute_force_auc(scores[entity == e], labels[entity == e], weights[entity == e]) for e in "abd"]
    mean, counted = per_entity_auc(scores, labels, entity, weights)
    assert counted == 3
    assert mean == pytest.approx(np.mean(expected))


def test_log_loss_rmse_and_calibration():
    margins = np.array([0.0, 2.0, -1.0])
    labels = np.array([1.0, 0.0, 0.0])
    weights = np.array([1.0, 2.0, 1.0])
    probability = 1 / (1 + np.exp(-margins))
    losses = -np.where(labels > 0, np.log(probability), np.log(1 - probability))
    assert log_loss(margins, labels, weights) == pytest.approx(np.average(losses, weights=weights))
    assert log_loss(probability, labels, weights, from_margins=False) == pytest.approx(
        np.average(losses, weights=weights)
    )
    assert log_loss([-1000.0], [1.0]) == pytest.approx(1000.0)
    assert calibration(margins, labels, weights) == pytest.approx(1.0 / np.sum(weights * probability))
    assert rmse([1.0, 2.0], [1.0, 4.0]) == pytest.approx(np.sqrt(2.0))


def test_evaluate_names_its_metrics():
    result = evaluate(["auc", "rmse"], np.array([0.1, 0.9]), np.array([0.0, 1.0]))
    assert result == {"auc": 1.0, "rmse": pytest.approx(np.sqrt((0.01 + 0.01) / 2))}
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(["f1"], np.zeros(2), np.zeros(2))
