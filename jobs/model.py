"""A GAME model on Spark: the fixed effect plus the random effects, scored over event frames.

A published *generation* lives in two tables: ``fixed_effect`` (written last: the newest
generation there is the current one) and ``re_priors``. The nearline job's live random
effects are in ``re_state``. Frames to score carry the events-table columns and a ``row_key``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from jobs.config import Config, ModelConfig, RandomEffectConfig
from jobs.fixed_effect import FixedEffectModel
from jobs.random_effects import MEAN_SCORES, coefficient_arrays, score_random_effect, scoring_rows
from jobs.schemas import bag_column
from jobs.tables import TableStore
from udfs.random_effects import ScoreKernel


@dataclass(frozen=True)
class Generation:
    """A published model generation: its number, its data cutoff and its fixed effect."""

    number: int
    cutoff_batch_id: int
    fixed_effect: FixedEffectModel


def current_generation(store: TableStore) -> Generation | None:
    """The newest generation in ``fixed_effect``, or None before the first nightly run."""
    newest = store.read("fixed_effect").agg(F.max("generation")).first()[0]
    return None if newest is None else load_generation(store, newest)


def load_generation(store: TableStore, number: int) -> Generation:
    rows = store.read("fixed_effect").where(F.col("generation") == number).orderBy("name", "term").collect()
    if not rows:
        raise LookupError(f"generation {number} is not in the fixed_effect table")
    model = FixedEffectModel(
        names=tuple(row.name for row in rows),
        terms=tuple(row.term for row in rows),
        means=tuple(row.mean for row in rows),
        variances=tuple(row.variance for row in rows),
    )
    return Generation(number, rows[0].cutoff_batch_id, model)


def fixed_effect_score(model: ModelConfig, fixed_effect: FixedEffectModel | None) -> Column:
    """The fixed effect's score of an event: the outside score column, or the trained model's."""
    if model.fixed_effect.source == "score_column":
        return F.col(model.fixed_effect.score_column)
    if fixed_effect is None:
        return F.lit(0.0)
    return fixed_effect.score(F.col(bag_column(model.fixed_effect.feature_bag)))


def random_effect_score(
    frame: DataFrame,
    random_effect: RandomEffectConfig,
    coefficients: DataFrame,
    buckets: int | None,
    kernel: ScoreKernel = MEAN_SCORES,
    draw_group: Column | None = None,
) -> DataFrame:
    """``(row_key, score)``: each row's score under its entity's coefficients (0 for an entity without)."""
    rows = scoring_rows(frame, random_effect, draw_group)
    return score_random_effect(rows, coefficient_arrays(coefficients), buckets, kernel).select("row_key", "score")


def priors_of(store: TableStore, generation: int, random_effect: RandomEffectConfig) -> DataFrame:
    """``(entity_id, coefficients)`` of one random-effect type in a generation's priors."""
    priors = store.read("re_priors")
    return priors.where((F.col("generation") == generation) & (F.col("re_type") == random_effect.name)).select(
        "entity_id", "coefficients"
    )


def score_column(random_effect: RandomEffectConfig) -> str:
    return f"score_{random_effect.name}"


def with_game_scores(
    frame: DataFrame,
    config: Config,
    fixed_effect: FixedEffectModel | None,
    coefficients: dict[str, DataFrame],
    buckets: int | None,
    kernel: ScoreKernel = MEAN_SCORES,
    draw_group: Column | None = None,
) -> DataFrame:
    """``frame`` with ``score_fixed``, one ``score_<type>`` per random-effect type, and ``score`` (their sum).

    ``kernel`` scores with the means or with Thompson draws (one per ``draw_group`` value and entity).
    """
    scored = frame.withColumn("score_fixed", fixed_effect_score(config.model, fixed_effect))
    total = F.col("score_fixed")
    for random_effect in config.model.random_effects:
        column = score_column(random_effect)
        scores = random_effect_score(
            frame, random_effect, coefficients[random_effect.name], buckets, kernel, draw_group
        )
        scored = scored.join(scores.withColumnRenamed("score", column), "row_key", "left").fillna(0.0, [column])
        total = total + F.col(column)
    return scored.withColumn("score", total)
