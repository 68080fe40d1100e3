"""The fixed effect: one global linear model, trained on Spark with MLlib, scored with Spark SQL.

:class:`FixedEffect` is the coordinate (an estimator): ``fit`` returns a model, a
:class:`FixedEffectModel` or, where an outside model scores the events, an :class:`OutsideScore`;
either scores a frame with one column expression.

MLlib has no offset for ``LogisticRegression`` or ``LinearRegression``; we give them one exactly:

- logistic: the offset becomes feature 0 with its coefficient bounded to [1, 1] (L-BFGS-B);
- linear: the label becomes ``label - offset``.

Both minimise ``sum_i w_i loss_i / sum_i w_i + regParam * penalty(beta)`` with ``standardization
= False``; ``regParam = lambda / sum_i w_i`` makes that our objective ``sum_i w_i loss_i + lambda *
penalty(beta)`` (the intercept is not penalised). ``LinearRegression`` also standardises the label,
which divides the L2 part by the label's standard deviation; the settings undo that. docs/nightly.md
says why not ``GeneralizedLinearRegression``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.functions import array_to_vector
from pyspark.ml.linalg import Matrices
from pyspark.ml.regression import LinearRegression
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from jobs.runtime.settings import FixedEffectConfig
from jobs.storage.schemas import SCORE_COEFFICIENT, bag_arrays, bag_column
from lambda_learner.representation import INTERCEPT
from udfs.arrays import SEPARATOR
from udfs.dense_features import DENSE_FIELDS, dense_rows
from udfs.entity_kernels import ddl


@dataclass(frozen=True)
class FixedEffectModel:
    """A trained fixed effect: name-term coefficients (the intercept first) with their variances, on one bag."""

    feature_bag: str
    names: tuple[str, ...]
    terms: tuple[str, ...]
    means: tuple[float, ...]
    variances: tuple[float, ...]

    def score(self) -> Column:
        """``intercept + sum over the bag of value * coefficient`` (0 for a feature the model lacks)."""
        lookup = dict(zip(_keys(self.names, self.terms), self.means, strict=True))
        intercept = lookup.pop(SEPARATOR.join(INTERCEPT), 0.0)
        if not lookup:
            return F.lit(float(intercept))
        table = F.create_map(*[item for key, mean in lookup.items() for item in (F.lit(key), F.lit(float(mean)))])
        products = F.transform(
            F.coalesce(F.col(bag_column(self.feature_bag)), F.array()),
            lambda f: (
                f["value"]
                * F.coalesce(F.element_at(table, F.concat(f["name"], F.lit(SEPARATOR), f["term"])), F.lit(0.0))
            ),
        )
        return F.aggregate(products, F.lit(float(intercept)), lambda total, x: total + x)

    def coefficient_rows(self) -> list[tuple[str, str, float, float]]:
        """``(name, term, mean, variance)`` per coefficient, as the fixed_effect table holds them."""
        return list(zip(self.names, self.terms, self.means, self.variances, strict=True))


@dataclass(frozen=True)
class OutsideScore:
    """An outside model's score, read from an event column, standing in for the fixed effect."""

    column: str

    def score(self) -> Column:
        return F.col(self.column)

    def coefficient_rows(self) -> list[tuple[str, str, float, float]]:
        # One coefficient of 1 on the outside score: the table says what the generation's fixed effect was.
        return [(*SCORE_COEFFICIENT, 1.0, 0.0)]


FixedEffectScorer = FixedEffectModel | OutsideScore


@dataclass(frozen=True)
class FixedEffect:
    """The fixed-effect coordinate: :meth:`fit` on rows with an offset returns a model that scores events.

    With ``source: score_column`` there is nothing to train: every fit returns the outside score.
    """

    task: str
    config: FixedEffectConfig
    score_column: str = "score_fixed"

    def initial(self) -> FixedEffectScorer:
        """The fixed effect before any training: the outside score, or a model scoring 0."""
        if self.config.source == "score_column":
            return OutsideScore(self.config.score_column)
        return FixedEffectModel(self.config.feature_bag, (), (), (), ())

    def fit(self, frame: DataFrame, offset: Column, previous: FixedEffectScorer | None = None) -> FixedEffectScorer:
        """The model minimising the objective on ``frame``'s events with ``offset`` added to each margin."""
        if self.config.source == "score_column":
            return self.initial()
        rows = frame.select("label", "weight", offset.alias("offset"), *bag_arrays(self.config.feature_bag))
        return fit_fixed_effect(rows, self.task, self.config)

    def with_score(self, frame: DataFrame, model: FixedEffectScorer) -> DataFrame:
        return frame.withColumn(self.score_column, model.score())

    def from_coefficients(self, rows: list[tuple[str, str, float, float]]) -> FixedEffectScorer:
        """A published model back from its ``(name, term, mean, variance)`` rows."""
        if self.config.source == "score_column":
            return self.initial()
        ordered = sorted(rows)
        return FixedEffectModel(
            self.config.feature_bag,
            names=tuple(row[0] for row in ordered),
            terms=tuple(row[1] for row in ordered),
            means=tuple(row[2] for row in ordered),
            variances=tuple(row[3] for row in ordered),
        )


def fit_fixed_effect(rows: DataFrame, task: str, config: FixedEffectConfig) -> FixedEffectModel:
    """Fit on ``rows`` (label, weight, offset, names, terms, values) with MLlib; variances from the Hessian diagonal."""
    vocabulary = sorted(
        (row.name, row.term)
        for row in rows.select(F.explode(F.arrays_zip("names", "terms")).alias("f"))
        .select(F.col("f.names").alias("name"), F.col("f.terms").alias("term"))
        .distinct()
        .collect()
    )
    keys = _keys([name for name, _ in vocabulary], [term for _, term in vocabulary])
    shifted_label = F.col("label") - F.col("offset")
    total_weight, weighted_label, weighted_square = rows.agg(
        F.sum("weight"), F.sum(F.col("weight") * shifted_label), F.sum(F.col("weight") * shifted_label**2)
    ).first()
    if not total_weight or total_weight <= 0:
        raise ValueError("the fixed effect has no training rows with positive weight")
    regularisation = config.penalty / total_weight
    # Dense once, kept: MLlib and the variances read it several times.
    frame = rows.mapInPandas(dense_rows(keys), ddl(DENSE_FIELDS)).localCheckpoint(eager=True)
    width = len(keys)
    if task == "logistic":
        with_offset = frame.select(
            "label", "weight", array_to_vector(F.concat(F.array("offset"), "x")).alias("features")
        )
        bound = [1.0] + [float("inf")] * width
        estimator = LogisticRegression(
            weightCol="weight",
            regParam=regularisation,
            elasticNetParam=0.0,
            standardization=False,
            maxIter=config.max_iterations,
            tol=1e-10,
            lowerBoundsOnCoefficients=Matrices.dense(1, width + 1, [1.0] + [-float("inf")] * width),
            upperBoundsOnCoefficients=Matrices.dense(1, width + 1, bound),
        )
        fitted = estimator.fit(with_offset)
        coefficients = fitted.coefficients.toArray()[1:]
    else:
        # MLlib solves for label / sd: its L2 part shrinks by sd, its L1 part does not.
        mean = weighted_label / total_weight
        deviation = float(np.sqrt(max(weighted_square / total_weight - mean * mean, 0.0))) or 1.0
        mix = config.elastic_net + deviation * (1.0 - config.elastic_net)
        estimator = LinearRegression(
            weightCol="weight",
            regParam=regularisation * mix,
            elasticNetParam=config.elastic_net / mix,
            standardization=False,
            maxIter=config.max_iterations,
            tol=1e-10,
        )
        shifted = frame.select(
            (F.col("label") - F.col("offset")).alias("label"), "weight", array_to_vector("x").alias("features")
        )
        fitted = estimator.fit(shifted)
        coefficients = fitted.coefficients.toArray()
    intercept = float(fitted.intercept)
    curvature = _hessian_diagonal(frame, task, intercept, coefficients)
    ridge = config.penalty * (1.0 - config.elastic_net)
    variances = [1.0 / curvature[0], *(1.0 / (curvature[1:] + ridge))]
    return FixedEffectModel(
        config.feature_bag,
        names=(INTERCEPT[0], *[name for name, _ in vocabulary]),
        terms=(INTERCEPT[1], *[term for _, term in vocabulary]),
        means=(intercept, *coefficients.tolist()),
        variances=tuple(float(v) for v in variances),
    )


def _hessian_diagonal(frame: DataFrame, task: str, intercept: float, coefficients: np.ndarray) -> np.ndarray:
    """``sum_i w_i loss''_i x_ij^2`` for the intercept and each feature, in one pass."""
    beta = F.array(*[F.lit(float(c)) for c in coefficients])
    margin = F.aggregate(
        F.zip_with("x", beta, lambda x, b: x * b), F.lit(intercept) + F.col("offset"), lambda a, v: a + v
    )
    probability = 1.0 / (1.0 + F.exp(-margin))
    curvature = F.col("weight") * (probability * (1.0 - probability) if task == "logistic" else F.lit(1.0))
    squares = F.transform("x", lambda x: x * x)
    sums = frame.select(curvature.alias("c"), squares.alias("s")).select(
        F.sum("c").alias("intercept"),
        *[F.sum(F.col("c") * F.col("s")[j]).alias(f"x{j}") for j in range(len(coefficients))],
    )
    return np.asarray(list(sums.first()), dtype=np.float64)


def _keys(names, terms) -> list[str]:
    return [f"{name}{SEPARATOR}{term}" for name, term in zip(names, terms, strict=True)]
