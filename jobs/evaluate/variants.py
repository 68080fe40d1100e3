"""Predict, then learn: variants of the model, each on its own copy of the tables, scored step by step.

Every variant starts from the same first generation (trained by the nightly job on the first files),
then walks the steps in order: step n is scored by the model as the variant had it after step n-1
(a step is never scored by a model that learnt from it), then learnt from:

- by the nearline job (``nearline``), one micro-batch per step;
- by a nightly run (``retrain_every``) whenever a retraining boundary passes (its events ingested
  by the nearline job first, the only way events enter the tables);
- or not at all (the stale model, the fixed effect alone).

Scoring happens at the end, in one Spark job per generation: before each step the coefficients of
the step's entities are snapshotted (a small checkpoint), and the step's events are scored against
their own snapshot, the entity ids tagged with the step. The score of an event is exactly what the
scoring job's means would have given at that moment, without a scoring job per step.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import reduce
from pathlib import Path

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.evaluate.streams import Steps
from jobs.game.generation import Generation, current_generation, priors_of
from jobs.game.model import with_game_scores
from jobs.runtime.settings import Config
from jobs.storage.store import TableStore, open_store

LOG = logging.getLogger("lambda_learner.evaluate")
# A tagged entity id: the step, this separator, the entity id.
TAG = "#"


@dataclass(frozen=True)
class Jobs:
    """The jobs an evaluation runs, handed in by its entry point.

    ``nearline(config)`` returns the function applying one micro-batch (``NearlineUpdater(config).process``);
    ``nightly(spark, store, config)`` trains and publishes a generation (``run_nightly(..., force_publish=True)``).
    """

    nearline: Callable[[Config], Callable[[DataFrame, int], object]]
    nightly: Callable[[SparkSession, TableStore, Config], object]


@dataclass(frozen=True)
class Variant:
    """One way of keeping the model: its name, its tables, its steps and how it learns from them."""

    name: str
    config: Config
    steps: Steps
    nearline: bool = False
    retrain_every: int | None = None  # a nightly run at every multiple of this from the origin (unit: steps.length)
    random_effects: bool = True  # False: scored by the fixed effect alone


def evaluation_config(config: Config, root: Path) -> Config:
    """The settings with tables (and the stream checkpoint) under ``root``; a nightly run trains on all it has."""
    return replace(
        config,
        storage=replace(config.storage, root=str(root)),
        stream=replace(config.stream, checkpoint=str(root / "_checkpoint")),
        nightly=replace(config.nightly, holdout_hours=0.0, window_days=3650.0),
    )


def with_delta(config: Config, delta: float) -> Config:
    random_effects = tuple(replace(r, delta=delta) for r in config.model.random_effects)
    return replace(config, model=replace(config.model, random_effects=random_effects))


def first_generation(spark: SparkSession, config: Config, root: Path, raw: DataFrame, jobs: Jobs) -> Config:
    """Tables under ``root`` holding ``raw`` (one micro-batch, batch 0) and the first generation trained on it."""
    shutil.rmtree(root, ignore_errors=True)
    base = evaluation_config(config, root)
    jobs.nearline(base)(raw, 0)
    jobs.nightly(spark, open_store(spark, base.storage), base)
    if current_generation(open_store(spark, base.storage), base.model) is None:
        raise RuntimeError("the nightly job published no first generation")
    return base


def copy_tables(base: Config, root: Path, settings: Config) -> Config:
    """A copy of the base tables (the first generation) under ``root``, with ``settings``."""
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(base.storage.root, root)
    return evaluation_config(settings, root)


def prior_entities(spark: SparkSession, config: Config) -> dict[str, set[str]]:
    """Per random-effect type (by its entity column), the entities the current generation has a prior for."""
    store = open_store(spark, config.storage)
    generation = current_generation(store, config.model)
    return {
        r.entity_column: {row.entity_id for row in priors_of(store, generation.number, r).select("entity_id").collect()}
        for r in config.model.random_effects
    }


@dataclass(frozen=True)
class _Scoring:
    """How the events of one step are scored: by a generation's priors, or by a snapshot of the live state."""

    step: int
    generation: Generation
    snapshot: DataFrame | None  # re_type, entity_id, coefficients, step


def run_variant(spark: SparkSession, variant: Variant, jobs: Jobs, first_batch_id: int = 1) -> pd.DataFrame:
    """Every step's events scored before the variant learnt from them: step, label, weight, score, entity ids."""
    config, steps = variant.config, variant.steps
    store = open_store(spark, config.storage)
    generation = current_generation(store, config.model)
    update = jobs.nearline(config) if variant.nearline or variant.retrain_every else None
    live, batch_id, plan = False, first_batch_id, []
    for index, step in enumerate(steps.numbers):
        events = steps.events.where(F.col("step") == step)
        plan.append(_Scoring(step, generation, _snapshot(store, config, generation, events, step) if live else None))
        if index + 1 == len(steps.numbers):
            break  # nothing is scored after the last step: nothing to learn from it
        retrain = variant.retrain_every is not None and steps.retrains_between(
            step, steps.numbers[index + 1], variant.retrain_every
        )
        if variant.nearline or retrain:
            update(steps.raw(step), batch_id)
            batch_id += 1
            live = variant.nearline
        if retrain:
            jobs.nightly(spark, store, config)
            generation = current_generation(store, config.model)
            live = False  # the next step is scored by the new priors, where the nearline job's rebase starts
        if index % 20 == 19:
            LOG.info("%s: %d of %d steps", variant.name, index + 1, len(steps.numbers))
    return _scores(store, variant, plan)


def _live_coefficients(store: TableStore, config: Config, generation: Generation) -> list[DataFrame]:
    """Per type: the live state, else the generation's prior (as the scoring job reads them)."""
    frames = []
    for r in config.model.random_effects:
        state = store.read("re_state").where(F.col("re_type") == r.name).select("entity_id", "coefficients")
        priors = priors_of(store, generation.number, r).select("entity_id", "coefficients")
        live = state.unionByName(priors.join(state.select("entity_id"), "entity_id", "left_anti"))
        frames.append(live.withColumn("re_type", F.lit(r.name)))
    return frames


def _snapshot(store: TableStore, config: Config, generation: Generation, events: DataFrame, step: int) -> DataFrame:
    """The live coefficients of the entities of ``events``, as they are now."""
    parts = []
    for r, live in zip(config.model.random_effects, _live_coefficients(store, config, generation), strict=True):
        needed = events.select(F.col(r.entity_column).alias("entity_id")).distinct()
        parts.append(live.join(needed, "entity_id"))
    if not parts:
        return None
    snapshot = reduce(DataFrame.unionByName, parts).withColumn("step", F.lit(step))
    return snapshot.localCheckpoint(eager=True)


def _scores(store: TableStore, variant: Variant, plan: list[_Scoring]) -> pd.DataFrame:
    config = variant.config
    entities = [r.entity_column for r in config.model.random_effects]
    groups: dict[tuple[int, bool], list[_Scoring]] = {}
    for scoring in plan:
        groups.setdefault((scoring.generation.number, scoring.snapshot is not None), []).append(scoring)
    frames = []
    for (number, live), group in groups.items():
        events = variant.steps.events.where(F.col("step").isin([s.step for s in group]))
        events = events.select("*", *[F.col(column).alias(f"_entity_{column}") for column in entities])
        if live:
            tag = F.concat_ws(TAG, F.col("step").cast("string"), F.col("entity_id"))
            snapshots = reduce(DataFrame.unionByName, [s.snapshot for s in group])
            snapshots = snapshots.withColumn("entity_id", tag)
            coefficients = {
                r.name: snapshots.where(F.col("re_type") == r.name).select("entity_id", "coefficients")
                for r in config.model.random_effects
            }
            for column in entities:
                events = events.withColumn(column, F.concat_ws(TAG, F.col("step").cast("string"), F.col(column)))
        else:
            coefficients = {
                r.name: priors_of(store, number, r).select("entity_id", "coefficients")
                for r in config.model.random_effects
            }
            if not variant.random_effects:
                coefficients = {name: frame.limit(0) for name, frame in coefficients.items()}
        scored = with_game_scores(
            events, config, group[0].generation.fixed_effect, coefficients, config.nearline.buckets
        )
        columns = [F.col(f"_entity_{column}").alias(column) for column in entities]
        frames.append(scored.select("step", "label", "weight", "score", *columns).toPandas())
    scores = pd.concat(frames, ignore_index=True)
    return scores.sort_values("step", kind="stable").reset_index(drop=True)
