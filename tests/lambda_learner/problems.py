"""Random per-entity problems and an independent reference solver for the tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy.special import expit

from lambda_learner import Feature, TrainingRecord


@dataclass
class Problem:
    """One entity's mini-batch and prior, in name-term-value form."""

    records: list[TrainingRecord]
    means: list[Feature]
    variances: list[Feature]


def random_problem(
    rng: np.random.Generator,
    *,
    rows: int = 40,
    features: int = 6,
    task: str = "logistic",
    weighted: bool = False,
    prior_features: int | None = None,
    extra_prior_features: int = 0,
) -> Problem:
    """Rows drawn from a random truth; a prior on the first ``prior_features`` features plus some the rows lack."""
    prior_features = features if prior_features is None else prior_features
    truth = rng.normal(0.0, 0.7, size=features + 1)
    values = rng.normal(size=(rows, features))
    offsets = rng.normal(-0.5, 0.5, size=rows)
    margins = truth[0] + values @ truth[1:] + offsets
    if task == "logistic":
        labels = (rng.random(rows) < expit(margins)).astype(float)
    else:
        labels = margins + rng.normal(0.0, 0.3, size=rows)
    weights = rng.uniform(0.2, 3.0, size=rows) if weighted else np.ones(rows)
    records = [
        TrainingRecord(
            label=float(labels[i]),
            weight=float(weights[i]),
            offset=float(offsets[i]),
            features=[Feature("f", str(j), float(values[i, j])) for j in range(features)],
        )
        for i in range(rows)
    ]
    prior = [Feature("intercept", "intercept", float(truth[0] + rng.normal(0, 0.3)))]
    prior += [Feature("f", str(j), float(truth[j + 1] + rng.normal(0, 0.3))) for j in range(prior_features)]
    prior += [Feature("g", str(j), float(rng.normal(0, 0.5))) for j in range(extra_prior_features)]
    variances = [Feature(f.name, f.term, float(rng.uniform(0.05, 1.0))) for f in prior]
    return Problem(records, prior, variances)


def reference_objective(X, y, w, offsets, prior_mean, prior_precision, penalty, delta, task):
    """The objective of docs/math.md, written out independently of the package, with its derivatives."""
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    signed = np.where(y > 0, 1.0, -1.0)

    def value(theta):
        margins = X @ theta + offsets
        if task == "logistic":
            data = np.sum(w * np.logaddexp(0.0, -signed * margins))
        else:
            data = 0.5 * np.sum(w * (margins - y) ** 2)
        deviation = theta - prior_mean
        return data + (1 - delta) * penalty / 2 * theta @ theta + delta / 2 * deviation @ (prior_precision * deviation)

    def gradient(theta):
        margins = X @ theta + offsets
        residual = -signed * expit(-signed * margins) if task == "logistic" else margins - y
        return X.T @ (w * residual) + (1 - delta) * penalty * theta + delta * prior_precision * (theta - prior_mean)

    def hessian(theta):
        margins = X @ theta + offsets
        curvature = expit(margins) * expit(-margins) if task == "logistic" else np.ones_like(margins)
        return X.T @ (X * (w * curvature)[:, None]) + np.diag((1 - delta) * penalty + delta * prior_precision)

    return value, gradient, hessian


def reference_solve(value, gradient, hessian, start):
    """A fully converged minimiser: scipy's trust-region Newton, then plain Newton steps to rounding level."""
    theta = optimize.minimize(value, start, jac=gradient, hess=hessian, method="trust-exact", options={"gtol": 1e-10}).x
    for _ in range(3):
        theta = theta - np.linalg.solve(hessian(theta), gradient(theta))
    assert np.abs(gradient(theta)).max() < 1e-10
    return theta
