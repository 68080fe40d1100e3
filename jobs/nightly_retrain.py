"""The nightly batch job: retrain the fixed effect and the random effects, validate, publish a generation.

    python -m jobs.nightly_retrain --config conf/local.yaml [--set key=value ...] [--force-publish]
    spark-submit jobs/nightly_retrain.py --config conf/cluster.yaml

1. Read the events up to the *cutoff* (the last micro-batch ingested) within the window.
2. Coordinate descent: fit the fixed effect with the random effects' scores as offset, then
   each random-effect type with the fixed effect and the other types as offset; repeat.
3. Validate on the hold-out (the last hours of the window) against the current generation.
4. Publish generation g+1 (priors first, the fixed effect last: the commit point), each
   write guarded so a rerun of the same night publishes nothing twice.

docs/nightly.md describes the job; docs/math.md the random-effect objective.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.config import Config, RandomEffectConfig, load_config
from jobs.faults import crash_point
from jobs.fixed_effect import FixedEffectModel, fit_fixed_effect
from jobs.model import (
    Generation,
    current_generation,
    fixed_effect_score,
    priors_of,
    random_effect_score,
    score_column,
    with_game_scores,
)
from jobs.random_effects import coefficient_arrays, coefficient_records, random_effect_rows, update_random_effect
from jobs.schemas import FEATURES, SCORE_COEFFICIENT, bag_column, table_schemas
from jobs.spark import spark_session
from jobs.tables import Guard, TableStore, open_store
from lambda_learner import metrics
from udfs.random_effects import UpdateKernel

LOG = logging.getLogger("lambda_learner.nightly")


@dataclass
class NightlyReport:
    """What a run did; ``status`` is published, kept (the gate said no), already_published or empty_window."""

    status: str
    generation: int | None = None
    cutoff_batch_id: int | None = None
    training_rows: int = 0
    holdout_rows: int = 0
    entities: dict[str, int] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


def run_nightly(
    spark: SparkSession, store: TableStore, config: Config, *, force_publish: bool = False
) -> NightlyReport:
    """One nightly run on the tables in ``store``."""
    seconds: dict[str, float] = {}
    for name, schema in table_schemas(config.model).items():
        store.create(name, schema)
    events = store.read("events")
    cutoff = events.agg(F.max("batch_id")).first()[0]
    if cutoff is None:
        LOG.info("no events yet: nothing to train")
        return NightlyReport("empty_window", reason="the events table is empty")
    current = current_generation(store)
    if current is not None and current.cutoff_batch_id >= cutoff:
        LOG.info("generation %d already covers batch %d", current.number, cutoff)
        return NightlyReport("already_published", current.number, cutoff, reason="no batch since the last generation")

    with _stage("read", seconds):
        training, holdout = _window(events.where(F.col("batch_id") <= cutoff), config)
        training_rows, holdout_rows = training.count(), holdout.count()
        LOG.info("cutoff batch %d: %d training rows, %d hold-out rows", cutoff, training_rows, holdout_rows)
    if training_rows == 0:
        return NightlyReport("empty_window", None, cutoff, reason="no training events in the window")

    with _stage("train", seconds):
        fixed_effect, coefficients = _coordinate_descent(training, config)
        entities = {name: frame.count() for name, frame in coefficients.items()}
        LOG.info("trained random effects: %s", entities)

    with _stage("validate", seconds):
        validation, publish, reason = _validate(holdout, config, store, current, fixed_effect, coefficients)
    if force_publish or config.nightly.force_publish:
        publish, reason = True, f"forced ({reason})" if reason else "forced"
    number = _next_generation_number(store, config, current)
    report = NightlyReport(
        "published" if publish else "kept",
        number if publish else (None if current is None else current.number),
        cutoff,
        training_rows,
        holdout_rows,
        entities,
        validation,
        reason,
        seconds,
    )
    crash_point("nightly:before_publish")
    with _stage("publish", seconds):
        if publish:
            _publish(store, config, number, cutoff, fixed_effect, coefficients)
        _record(store, config, report)
    training.unpersist()
    return report


def _window(events: DataFrame, config: Config) -> tuple[DataFrame, DataFrame]:
    """Training and hold-out rows of the window, which ends at the newest event time."""
    newest = events.agg(F.max("event_time")).first()[0]
    start = newest - timedelta(days=config.nightly.window_days)
    holdout_start = newest - timedelta(hours=config.nightly.holdout_hours)
    keyed = events.where(F.col("event_time") > F.lit(start)).withColumn("row_key", F.xxhash64("event_id", "batch_id"))
    if config.nightly.holdout_hours > 0:
        training = keyed.where(F.col("event_time") <= F.lit(holdout_start))
        holdout = keyed.where(F.col("event_time") > F.lit(holdout_start))
    else:
        training, holdout = keyed, keyed.limit(0)
    return training.persist(), holdout


def _coordinate_descent(training: DataFrame, config: Config) -> tuple[FixedEffectModel | None, dict[str, DataFrame]]:
    """Alternate fits of the fixed effect and each random-effect type, each with the others' scores as offset."""
    model = config.model
    random_effects = model.random_effects
    spark = training.sparkSession
    coefficients = {
        r.name: spark.createDataFrame([], "entity_id string, coefficients " + _COEFFICIENTS_DDL) for r in random_effects
    }
    scored = training.select("*", *[F.lit(0.0).alias(score_column(r)) for r in random_effects])
    fixed_effect: FixedEffectModel | None = None
    for number in range(1, config.nightly.passes + 1):
        if model.fixed_effect.source == "train":
            offset = sum((F.col(score_column(r)) for r in random_effects), F.lit(0.0))
            rows = _fixed_effect_rows(scored, model.fixed_effect.feature_bag, offset)
            fixed_effect = fit_fixed_effect(rows, model.task, model.fixed_effect)
            LOG.info("pass %d: fixed effect fitted (%d coefficients)", number, len(fixed_effect.means))
        scored = _materialised(scored.withColumn("score_fixed", fixed_effect_score(model, fixed_effect)))
        for random_effect in random_effects:
            others = [F.col(score_column(r)) for r in random_effects if r.name != random_effect.name]
            offset = sum(others, F.col("score_fixed"))
            coefficients[random_effect.name] = _fit_random_effect(
                scored, random_effect, offset, coefficients[random_effect.name], config
            )
            scores = random_effect_score(
                scored, random_effect, coefficients[random_effect.name], config.nightly.buckets
            )
            scored = _materialised(
                scored.drop(score_column(random_effect))
                .join(scores.withColumnRenamed("score", score_column(random_effect)), "row_key", "left")
                .fillna(0.0, [score_column(random_effect)])
            )
            LOG.info("pass %d: %s fitted", number, random_effect.name)
    scored.unpersist()
    return fixed_effect, coefficients


_COEFFICIENTS_DDL = "array<struct<name: string, term: string, mean: double, variance: double>>"


def _fixed_effect_rows(frame: DataFrame, bag: str, offset) -> DataFrame:
    features = F.coalesce(F.col(bag_column(bag)), F.array().cast(FEATURES))
    return frame.select(
        "label",
        "weight",
        offset.alias("offset"),
        features.getField("name").alias("names"),
        features.getField("term").alias("terms"),
        features.getField("value").alias("values"),
    )


def _fit_random_effect(
    frame: DataFrame, random_effect: RandomEffectConfig, offset, previous: DataFrame, config: Config
) -> DataFrame:
    """A batch fit (delta 0: L2, no prior), warm-started from the last pass: ``(entity_id, coefficients, rows)``."""
    rows = random_effect_rows(frame, random_effect, offset, config.nightly.seed)
    kernel = UpdateKernel(
        config.model.task,
        random_effect.penalty,
        delta=0.0,
        max_rows_per_entity=random_effect.max_rows_per_entity,
        min_rows=random_effect.min_rows,
    )
    updated = update_random_effect(rows, coefficient_arrays(previous), kernel, config.nightly.buckets)
    return _materialised(updated.select("entity_id", coefficient_records(updated).alias("coefficients"), "rows"))


def _materialised(frame: DataFrame) -> DataFrame:
    """Computed once and kept: later steps read it several times, and its lineage stops growing."""
    return frame.localCheckpoint(eager=True)


def _validate(
    holdout: DataFrame,
    config: Config,
    store: TableStore,
    current: Generation | None,
    fixed_effect: FixedEffectModel | None,
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


def _publish(
    store: TableStore,
    config: Config,
    number: int,
    cutoff: int,
    fixed_effect: FixedEffectModel | None,
    coefficients: dict[str, DataFrame],
) -> None:
    """Priors first, the fixed effect last (the commit point); each replaces what a crashed run left of ``number``."""
    spark = store.spark
    guard = publication_guard(config, number, cutoff)
    where = f"generation = {number}"
    priors = None
    for random_effect in config.model.random_effects:
        frame = coefficients[random_effect.name].select(
            F.lit(random_effect.name).alias("re_type"),
            "entity_id",
            F.lit(number).cast("long").alias("generation"),
            F.lit(cutoff).cast("long").alias("cutoff_batch_id"),
            "coefficients",
            F.col("rows").cast("long").alias("rows"),
            F.current_timestamp().alias("trained_at"),
        )
        priors = frame if priors is None else priors.unionByName(frame)
    if priors is not None:
        store.overwrite("re_priors", priors, guard=guard, where=where)
    crash_point("nightly:between_priors_and_fixed_effect")
    if fixed_effect is None:
        rows = [(*SCORE_COEFFICIENT, 1.0, 0.0)]
    else:
        rows = list(
            zip(fixed_effect.names, fixed_effect.terms, fixed_effect.means, fixed_effect.variances, strict=True)
        )
    frame = spark.createDataFrame(rows, "name string, term string, mean double, variance double").select(
        F.lit(number).cast("long").alias("generation"),
        "name",
        "term",
        "mean",
        "variance",
        F.lit(cutoff).cast("long").alias("cutoff_batch_id"),
        F.current_timestamp().alias("trained_at"),
    )
    store.overwrite("fixed_effect", frame, guard=guard, where=where)
    LOG.info("published generation %d (cutoff batch %d)", number, cutoff)


def _next_generation_number(store: TableStore, config: Config, current: Generation | None) -> int:
    """One above any generation ever published: a rolled-back number (rows deleted) is not reused.

    The publication guard's version remembers the last number even after its rows are gone.
    """
    recorded = store.transaction_version("fixed_effect", config.nightly.app_id)
    last = max(0 if current is None else current.number, 0 if recorded is None else recorded >> 32)
    return last + 1


def publication_guard(config: Config, number: int, cutoff: int) -> Guard:
    """One version per (generation, cutoff): a rerun on the same data is a no-op, a rerun on newer data replaces."""
    return Guard(config.nightly.app_id, (number << 32) | cutoff)


def _record(store: TableStore, config: Config, report: NightlyReport) -> None:
    values = {"training_rows": float(report.training_rows), "holdout_rows": float(report.holdout_rows)}
    values |= {f"entities.{name}": float(count) for name, count in report.entities.items()}
    values |= {key: float(value) for key, value in report.validation.items()}
    values |= {f"seconds.{stage}": value for stage, value in report.seconds.items()}
    row = (
        store.spark.createDataFrame(
            [("nightly", f"nightly-{report.cutoff_batch_id}", report.cutoff_batch_id, report.generation)],
            "job string, run_id string, batch_id long, generation long",
        )
        .withColumn("status", F.lit(report.status))
        .withColumn("values", _map_literal(values))
        .withColumn("note", F.lit(report.reason))
        .withColumn("recorded_at", F.current_timestamp())
    )
    published = report.status == "published"
    guard = publication_guard(config, report.generation, report.cutoff_batch_id) if published else None
    store.append("metrics", row, guard=guard)


def _map_literal(values: dict[str, float]):
    return F.create_map(*[F.lit(item) for pair in values.items() for item in pair]).cast("map<string, double>")


@contextmanager
def _stage(name: str, seconds: dict[str, float]) -> Iterator[None]:
    started = time.perf_counter()
    LOG.info("stage %s", name)
    yield
    seconds[name] = time.perf_counter() - started
    LOG.info("stage %s done in %.1f s", name, seconds[name])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Retrain the fixed and random effects; publish a model generation.")
    parser.add_argument("--config", default=None, help="environment file over conf/base.yaml (e.g. conf/local.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value override")
    parser.add_argument("--force-publish", action="store_true", help="publish even if the gate says no")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    config = load_config(args.config, args.overrides)
    spark = spark_session(config.spark)
    report = run_nightly(spark, open_store(spark, config.storage), config, force_publish=args.force_publish)
    print(json.dumps(asdict(report), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
