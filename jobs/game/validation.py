"""Validation of a newly trained model on the hold-out, against the current generation, and the publish gate."""

from __future__ import annotations

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.game.fixed_effect import FixedEffectScorer
from jobs.game.generation import Generation, priors_of
from jobs.game.model import with_game_scores
from jobs.runtime.settings import Config
from jobs.storage.store import TableStore
from lambda_learner import metrics


def validate(
    holdout: DataFrame,
    config: Config,
    store: TableStore,
    current: Generation | None,
    fixed_effect: FixedEffectScorer,
    coefficients: dict[str, DataFrame],
) -> tuple[dict[str, float], bool, str]:
    """Hold-out metrics of the new model (fixed effect only, and full) and of the current generation; the gate."""
    buckets = config.nightly.buckets
    entity_columns = [r.entity_column for r in config.model.random_effects]
    new = with_game_scores(holdout, config, fixed_effect, coefficients, buckets).select(
        "row_key", "label", "weight", *entity_columns, "score_fixed", "score"
    )
    if current is not None:
        current_coefficients = {r.name: priors_of(store, current.number, r) for r in config.model.random_effects}
        previous = with_game_scores(holdout, config, current.fixed_effect, current_coefficients, buckets)
        new = new.join(previous.select("row_key", F.col("score").alias("score_current")), "row_key")
    rows = new.toPandas()
    if rows.empty:
        return {}, True, "no hold-out rows to validate on"
    labels, weights = rows["label"].to_numpy(), rows["weight"].to_numpy()
    measured = _holdout_metrics(config, rows, labels, weights, "fixed_only", rows["score_fixed"].to_numpy())
    measured |= _holdout_metrics(config, rows, labels, weights, "full", rows["score"].to_numpy())
    if current is None:
        return measured, True, "first generation"
    measured |= _holdout_metrics(config, rows, labels, weights, "current", rows["score_current"].to_numpy())
    return (measured, *_gate(config, measured))


def _holdout_metrics(config: Config, rows, labels, weights, prefix: str, scores: np.ndarray) -> dict[str, float]:
    if config.model.task == "linear":
        return {f"{prefix}.rmse": metrics.rmse(scores, labels, weights)}
    measured = {
        f"{prefix}.auc": metrics.auc(scores, labels, weights),
        f"{prefix}.log_loss": metrics.log_loss(scores, labels, weights),
        f"{prefix}.calibration": metrics.calibration(scores, labels, weights),
    }
    for random_effect in config.model.random_effects:
        value, _ = metrics.per_entity_auc(scores, labels, rows[random_effect.entity_column].to_numpy())
        measured[f"{prefix}.per_entity_auc.{random_effect.name}"] = value
    return measured


def _gate(config: Config, measured: dict[str, float]) -> tuple[bool, str]:
    """Publish unless the new model is worse than the current one by more than the tolerances."""
    tolerance = config.nightly
    if config.model.task == "linear":
        worse = measured["full.rmse"] - measured["current.rmse"]
        if worse > tolerance.loss_tolerance:
            return False, f"hold-out RMSE {measured['full.rmse']:.4f} is {worse:.4f} above the current generation's"
        return True, "not worse than the current generation"
    auc_drop = measured["current.auc"] - measured["full.auc"]
    loss_rise = measured["full.log_loss"] - measured["current.log_loss"]
    if auc_drop > tolerance.auc_tolerance:
        return False, f"hold-out AUC {measured['full.auc']:.4f} is {auc_drop:.4f} below the current generation's"
    if loss_rise > tolerance.loss_tolerance:
        return (
            False,
            f"hold-out log loss {measured['full.log_loss']:.4f} is {loss_rise:.4f} above the current generation's",
        )
    return True, "not worse than the current generation"
