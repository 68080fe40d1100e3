"""Model generations: what the nightly job publishes and the nearline job rebases on.

A published generation lives in two tables: ``re_priors`` (written first) and ``fixed_effect``
(written last: the newest generation there is the current one, so that table is the commit point).
Rolling a generation back is deleting its rows; its number is never reused.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.game.fixed_effect import FixedEffect, FixedEffectScorer
from jobs.game.random_effect import RandomEffectModel
from jobs.runtime.errors import GenerationNotFoundError
from jobs.runtime.faults import crash_point
from jobs.runtime.settings import Config, ModelConfig, RandomEffectConfig
from jobs.storage.schemas import COEFFICIENT, FIXED_EFFECT, RE_PRIORS
from jobs.storage.store import Guard, TableStore


@dataclass(frozen=True)
class Generation:
    """A published model generation: its number, its data cutoff and its fixed effect."""

    number: int
    cutoff_batch_id: int
    fixed_effect: FixedEffectScorer


def current_generation(store: TableStore, model: ModelConfig) -> Generation | None:
    """The newest generation in ``fixed_effect``, or None before the first nightly run."""
    newest = store.read("fixed_effect").agg(F.max("generation")).first()[0]
    return None if newest is None else load_generation(store, model, newest)


def load_generation(store: TableStore, model: ModelConfig, number: int) -> Generation:
    rows = store.read("fixed_effect").where(F.col("generation") == number).collect()
    if not rows:
        raise GenerationNotFoundError(f"generation {number} is not in the fixed_effect table")
    coefficients = [(row.name, row.term, row.mean, row.variance) for row in rows]
    fixed_effect = FixedEffect(model.task, model.fixed_effect).from_coefficients(coefficients)
    return Generation(number, rows[0].cutoff_batch_id, fixed_effect)


def priors_of(store: TableStore, generation: int, random_effect: RandomEffectConfig) -> DataFrame:
    """``(entity_id, coefficients, rows)`` of one random-effect type in a generation's priors, one row per entity.

    Two publications of one generation (two nightly runs that raced past their lease) could leave an
    entity twice: the prior trained on more rows (then the later one) is kept, the same one every time.
    """
    priors = store.read("re_priors").where(
        (F.col("generation") == generation) & (F.col("re_type") == random_effect.name)
    )
    chosen = F.max_by(F.struct("coefficients", "rows"), F.struct("rows", "trained_at", "cutoff_batch_id"))
    return (
        priors.groupBy("entity_id").agg(chosen.alias("prior")).select("entity_id", "prior.coefficients", "prior.rows")
    )


def next_generation_number(store: TableStore, config: Config, current: Generation | None) -> int:
    """One above any generation ever published: a rolled-back number (rows deleted) is not reused.

    The publication guard's version remembers the last number even after its rows are gone.
    """
    recorded = store.transaction_version("fixed_effect", config.nightly.app_id)
    last = max(0 if current is None else current.number, 0 if recorded is None else recorded >> 32)
    return last + 1


def publication_guard(config: Config, number: int, cutoff: int) -> Guard:
    """One version per (generation, cutoff): a rerun on the same data is a no-op, a rerun on newer data replaces."""
    return Guard(config.nightly.app_id, (number << 32) | cutoff)


def publish(
    store: TableStore,
    config: Config,
    number: int,
    cutoff: int,
    fixed_effect: FixedEffectScorer,
    random_effects: dict[str, RandomEffectModel],
    report: dict | None = None,
) -> None:
    """Priors first, the fixed effect last (the commit point); each replaces what a crashed run left of ``number``.

    The commit point records ``report`` with its guard: a run killed before writing its metrics row leaves
    enough for the next run to write it.
    """
    spark = store.spark
    guard = publication_guard(config, number, cutoff)
    where = f"generation = {number}"
    priors = spark.createDataFrame([], RE_PRIORS)
    for random_effect in config.model.random_effects:
        priors = priors.unionByName(
            random_effects[random_effect.name].coefficients.select(
                F.lit(random_effect.name).alias("re_type"),
                "entity_id",
                F.lit(number).cast("long").alias("generation"),
                F.lit(cutoff).cast("long").alias("cutoff_batch_id"),
                "coefficients",
                F.col("rows").cast("long").alias("rows"),
                F.current_timestamp().alias("trained_at"),
            )
        )
    if config.model.random_effects:
        store.overwrite("re_priors", priors, guard=guard, where=where)
    crash_point("nightly:between_priors_and_fixed_effect")
    frame = spark.createDataFrame(fixed_effect.coefficient_rows(), COEFFICIENT).select(
        F.lit(number).cast("long").alias("generation"),
        "name",
        "term",
        "mean",
        "variance",
        F.lit(cutoff).cast("long").alias("cutoff_batch_id"),
        F.current_timestamp().alias("trained_at"),
    )
    committed = Guard(guard.app_id, guard.version, {"report": report} if report is not None else {})
    store.overwrite("fixed_effect", frame.select(*FIXED_EFFECT.fieldNames()), guard=committed, where=where)
