"""Validation of a newly trained model on the hold-out, against the current generation, and the publish gate."""

from __future__ import annotations

import math

from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.game.fixed_effect import FixedEffectScorer
from jobs.game.generation import Generation, priors_of
from jobs.game.model import with_game_scores
from jobs.game.random_effect import entity_group
from jobs.runtime.settings import Config
from jobs.storage.store import TableStore
from udfs.entity_kernels import ddl
from udfs.entity_metrics import ENTITY_AUC_FIELDS, entity_aucs


def validate(
    holdout: DataFrame,
    config: Config,
    store: TableStore,
    current: Generation | None,
    fixed_effect: FixedEffectScorer,
    coefficients: dict[str, DataFrame],
) -> tuple[dict[str, float], bool, str]:
    """Hold-out metrics of the new model (fixed effect only, and full) and of the current generation; the gate.

    A metric the hold-out cannot define (no weight, one label only, no entity with both labels) is left out of the
    metrics, named in the reason, and judged by nothing: the gate compares what both models have.
    """
    buckets = config.nightly.buckets
    entity_columns = [r.entity_column for r in config.model.random_effects]
    new = with_game_scores(holdout, config, fixed_effect, coefficients, buckets).select(
        "row_key", "label", "weight", *entity_columns, "score_fixed", "score"
    )
    if current is not None:
        current_coefficients = {r.name: priors_of(store, current.number, r) for r in config.model.random_effects}
        previous = with_game_scores(holdout, config, current.fixed_effect, current_coefficients, buckets)
        new = new.join(previous.select("row_key", F.col("score").alias("score_current")), "row_key")
    # Computed where the rows are: a hold-out of any size never reaches the driver.
    rows = new.localCheckpoint(eager=True)
    if rows.isEmpty():
        return {}, True, "no hold-out rows to validate on"
    measured = holdout_metrics(config, rows, "fixed_only", "score_fixed")
    measured |= holdout_metrics(config, rows, "full", "score")
    if current is not None:
        measured |= holdout_metrics(config, rows, "current", "score_current")
    computed = {key: value for key, value in measured.items() if value is not None}
    publishing, reason = (True, "first generation") if current is None else _gate(config, computed)
    undefined = sorted(measured.keys() - computed.keys())
    if undefined:
        reason += f"; not computable on this hold-out: {', '.join(undefined)}"
    return computed, publishing, reason


def holdout_metrics(config: Config, rows: DataFrame, prefix: str, column: str) -> dict[str, float | None]:
    """The metrics of one score column, computed by Spark: weighted AUC, log loss, calibration; RMSE for linear.

    None for a metric the rows do not define: every one when their weights sum to 0, the AUCs with one label only.
    """
    score, label, weight = F.col(column), F.col("label"), F.col("weight")
    if config.model.task == "linear":
        totals = rows.agg(F.sum(weight * (score - label) ** 2).alias("squares"), F.sum(weight).alias("weight")).first()
        return {f"{prefix}.rmse": math.sqrt(totals.squares / totals.weight) if totals.weight > 0 else None}
    positive = (label > 0).cast("double")
    margin = F.when(label > 0, score).otherwise(-score)
    # log(1 + exp(-margin)) without overflow.
    loss = F.greatest(-margin, F.lit(0.0)) + F.log1p(F.exp(-F.abs(margin)))
    totals = rows.agg(
        F.sum(weight).alias("weight"),
        F.sum(weight * loss).alias("loss"),
        F.sum(weight * positive).alias("positive"),
        F.sum(weight / (1 + F.exp(-score))).alias("expected"),
    ).first()
    keys = ["auc", "log_loss", "calibration", *(f"per_entity_auc.{r.name}" for r in config.model.random_effects)]
    if not totals.weight > 0:
        return dict.fromkeys((f"{prefix}.{key}" for key in keys), None)
    both_labels = 0 < totals.positive < totals.weight
    evaluator = BinaryClassificationEvaluator(
        rawPredictionCol=column, labelCol="label", weightCol="weight", metricName="areaUnderROC", numBins=0
    )
    measured = {
        f"{prefix}.auc": float(evaluator.evaluate(rows)) if both_labels else None,
        f"{prefix}.log_loss": float(totals.loss / totals.weight),
        f"{prefix}.calibration": float(totals.positive / totals.expected),
    }
    for random_effect in config.model.random_effects:
        measured[f"{prefix}.per_entity_auc.{random_effect.name}"] = _per_entity_auc(
            rows, random_effect.entity_column, column, config.nightly.entity_buckets
        )
    return measured


def _per_entity_auc(rows: DataFrame, entity_column: str, column: str, buckets: int) -> float | None:
    """The mean over entities with both labels of each entity's (unweighted) AUC, by buckets of whole entities.

    None when no entity has both labels.
    """
    scored = rows.select(F.col(entity_column).alias("entity_id"), F.col(column).alias("score"), "label")
    grouped = scored.groupBy(entity_group(F.col("entity_id"), buckets))
    aucs = grouped.applyInPandas(entity_aucs, ddl(ENTITY_AUC_FIELDS))
    (mean,) = aucs.agg(F.avg("auc")).first()
    return None if mean is None else float(mean)


def _gate(config: Config, measured: dict[str, float]) -> tuple[bool, str]:
    """Publish unless the new model is worse than the current one by more than the tolerances, on the metrics both
    models have."""
    tolerance = config.nightly

    def rise(metric: str) -> float | None:
        new, old = measured.get(f"full.{metric}"), measured.get(f"current.{metric}")
        return None if new is None or old is None else new - old

    if config.model.task == "linear":
        worse = rise("rmse")
        if worse is not None and worse > tolerance.loss_tolerance:
            return False, f"hold-out RMSE {measured['full.rmse']:.4f} is {worse:.4f} above the current generation's"
        return True, "not worse than the current generation"
    auc_rise, loss_rise = rise("auc"), rise("log_loss")
    if auc_rise is not None and -auc_rise > tolerance.auc_tolerance:
        return False, f"hold-out AUC {measured['full.auc']:.4f} is {-auc_rise:.4f} below the current generation's"
    if loss_rise is not None and loss_rise > tolerance.loss_tolerance:
        return (
            False,
            f"hold-out log loss {measured['full.log_loss']:.4f} is {loss_rise:.4f} above the current generation's",
        )
    return True, "not worse than the current generation"


def non_finite(
    validation: dict[str, float], fixed_effect: FixedEffectScorer, coefficients: dict[str, DataFrame]
) -> str | None:
    """Why a trained model must not be published (a hold-out metric or a coefficient is NaN or infinite), or None."""
    broken = sorted(key for key, value in validation.items() if not math.isfinite(value))
    if broken:
        return f"hold-out metrics are not finite: {', '.join(broken)}"
    numbers = [value for row in fixed_effect.coefficient_rows() for value in row[2:]]
    if not all(math.isfinite(value) for value in numbers):
        return "the fixed effect has a coefficient or variance that is not finite"
    for name, frame in coefficients.items():
        values = F.flatten(F.transform("coefficients", lambda c: F.array(c["mean"], c["variance"])))
        bad = frame.where(F.exists(values, lambda v: F.isnan(v) | (F.abs(v) == float("inf")))).limit(1).count()
        if bad:
            return f"random effect {name} has an entity with a coefficient or variance that is not finite"
    return None
