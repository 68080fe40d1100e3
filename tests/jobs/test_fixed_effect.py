"""The fixed effect fitted by MLlib equals the documented objective's minimiser (offsets, weights, penalty)."""

import numpy as np
import pytest
from pyspark.sql import functions as F
from scipy import optimize
from scipy.special import expit

from jobs.game.fixed_effect import fit_fixed_effect
from jobs.runtime.settings import FixedEffectConfig

PENALTY = 20.0


def sample(seed: int, task: str, rows: int = 3000, features: int = 4):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features))
    X[rng.random(X.shape) < 0.2] = 0.0  # some features absent from some rows
    offsets = rng.normal(-0.5, 1.0, size=rows)
    weights = rng.uniform(0.2, 3.0, size=rows)
    margins = X @ rng.normal(0, 0.8, size=features) + 0.3 + offsets
    if task == "logistic":
        labels = (rng.random(rows) < expit(margins)).astype(float)
    else:
        labels = margins + rng.normal(0, 0.5, size=rows)
    return X, offsets, weights, labels


def frame(spark, X, offsets, weights, labels):
    rows = [
        (
            float(labels[i]),
            float(weights[i]),
            float(offsets[i]),
            ["x"] * int((X[i] != 0).sum()),
            [str(j) for j in np.flatnonzero(X[i])],
            [float(v) for v in X[i][X[i] != 0]],
        )
        for i in range(len(labels))
    ]
    schema = (
        "label double, weight double, offset double, names array<string>, terms array<string>, values array<double>"
    )
    return spark.createDataFrame(rows, schema)


def reference(X, offsets, weights, labels, task, penalty):
    """The documented objective, intercept unpenalised, solved to a tight gradient."""
    design = np.hstack([np.ones((len(labels), 1)), X])

    def value(beta):
        margins = design @ beta + offsets
        if task == "logistic":
            data = np.sum(weights * np.logaddexp(0, -np.where(labels > 0, 1, -1) * margins))
        else:
            data = 0.5 * np.sum(weights * (margins - labels) ** 2)
        return data + penalty / 2 * beta[1:] @ beta[1:]

    def gradient(beta):
        margins = design @ beta + offsets
        residual = expit(margins) - (labels > 0) if task == "logistic" else margins - labels
        return design.T @ (weights * residual) + penalty * np.r_[0.0, beta[1:]]

    result = optimize.minimize(value, np.zeros(design.shape[1]), jac=gradient, method="BFGS", options={"gtol": 1e-9})
    margins = design @ result.x + offsets
    curvature = weights * (expit(margins) * expit(-margins) if task == "logistic" else 1.0)
    hessian_diagonal = np.einsum("nd,n,nd->d", design, curvature, design) + penalty * np.r_[0.0, np.ones(X.shape[1])]
    return result.x, 1.0 / hessian_diagonal


@pytest.mark.parametrize("task", ["logistic", "linear"])
def test_mllib_fits_our_objective_with_offsets_weights_and_penalty(spark, task):
    X, offsets, weights, labels = sample(1, task)
    model = fit_fixed_effect(frame(spark, X, offsets, weights, labels), task, FixedEffectConfig(penalty=PENALTY))
    expected_means, expected_variances = reference(X, offsets, weights, labels, task, PENALTY)

    assert model.names[0] == "intercept" and model.terms[1:] == tuple(str(j) for j in range(X.shape[1]))
    np.testing.assert_allclose(model.means, expected_means, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.variances, expected_variances, rtol=1e-3)


def test_elastic_net_for_the_linear_task_meets_its_optimality_conditions(spark):
    X, offsets, weights, labels = sample(2, "linear", features=6)
    X[:, 5] = np.random.default_rng(5).normal(0, 0.01, size=len(labels))  # noise too weak to survive the L1 part
    mix = 0.8
    model = fit_fixed_effect(
        frame(spark, X, offsets, weights, labels), "linear", FixedEffectConfig(penalty=PENALTY, elastic_net=mix)
    )
    beta = np.array(model.means)
    design = np.hstack([np.ones((len(labels), 1)), X])
    gradient = design.T @ (weights * (design @ beta + offsets - labels)) + PENALTY * (1 - mix) * np.r_[0.0, beta[1:]]
    l1 = PENALTY * mix
    assert abs(gradient[0]) < 1e-3 * l1  # the intercept is not penalised
    for j in range(1, len(beta)):
        if beta[j] == 0.0:
            assert abs(gradient[j]) <= l1 * (1 + 1e-3)
        else:
            assert gradient[j] == pytest.approx(-l1 * np.sign(beta[j]), rel=1e-3)
    assert beta[6] == 0.0


def test_the_model_scores_events_in_sql(spark):
    X, offsets, weights, labels = sample(3, "logistic", rows=200)
    model = fit_fixed_effect(frame(spark, X, offsets, weights, labels), "logistic", FixedEffectConfig(penalty=PENALTY))
    bag = F.transform(
        F.arrays_zip("names", "terms", "values"),
        lambda f: F.struct(f["names"].alias("name"), f["terms"].alias("term"), f["values"].alias("value")),
    )
    events = frame(spark, X, offsets, weights, labels).select(bag.alias("features_global"))
    scored = events.select(model.score().alias("score")).toPandas()
    expected = model.means[0] + X @ np.array(model.means[1:])
    np.testing.assert_allclose(scored.score.to_numpy(), expected, rtol=1e-12, atol=1e-12)
