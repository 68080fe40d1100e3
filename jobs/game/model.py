"""The GAME model on Spark: its coordinates (the fixed effect and each random-effect type) and their summed score.

Frames to score carry the events-table columns and a ``row_key`` (unique per row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from jobs.game.fixed_effect import FixedEffect, FixedEffectScorer
from jobs.game.random_effect import MEAN_SCORES, RandomEffect, RandomEffectModel
from jobs.runtime.settings import Config
from udfs.entity_kernels import ScoreKernel


@dataclass(frozen=True)
class Coordinates:
    """Every coordinate of the configured model: the fixed effect first, then the random-effect types in order."""

    fixed_effect: FixedEffect
    random_effects: tuple[RandomEffect, ...]

    @classmethod
    def of(cls, config: Config, buckets: int | None, seed: int) -> Coordinates:
        model = config.model
        return cls(
            FixedEffect(model.task, model.fixed_effect),
            tuple(RandomEffect(r, model.task, buckets, seed) for r in model.random_effects),
        )

    @property
    def score_columns(self) -> list[str]:
        return [self.fixed_effect.score_column, *[r.score_column for r in self.random_effects]]

    def offset_for(self, coordinate: str, column: Callable[[str], Any] = F.col) -> Any:
        """The sum of every other coordinate's score column: the offset that coordinate is fitted with.

        ``column`` gives a score column by name: a Spark column by default, or numpy arrays of the same
        rows, summed in the same order (so the same doubles come out).
        """
        others = [column(name) for name in self.score_columns if name != coordinate]
        return sum(others[1:], others[0]) if others else F.lit(0.0)


def with_game_scores(
    frame: DataFrame,
    config: Config,
    fixed_effect: FixedEffectScorer | None,
    coefficients: dict[str, DataFrame],
    buckets: int | None,
    kernel: ScoreKernel = MEAN_SCORES,
    draw_group: Column | None = None,
) -> DataFrame:
    """``frame`` with ``score_fixed``, one ``score_<type>`` per random-effect type, and ``score`` (their sum).

    ``fixed_effect`` None scores as the fixed effect before any training. ``kernel`` scores with the
    means or with Thompson draws (one per ``draw_group`` value and entity).
    """
    coordinates = Coordinates.of(config, buckets, seed=0)
    model = fixed_effect if fixed_effect is not None else coordinates.fixed_effect.initial()
    scored = coordinates.fixed_effect.with_score(frame, model)
    for random_effect in coordinates.random_effects:
        coefficients_of_type = RandomEffectModel(coefficients[random_effect.name])
        scored = random_effect.with_score(scored, coefficients_of_type, kernel, draw_group)
    total = sum((F.col(c) for c in coordinates.score_columns[1:]), F.col(coordinates.score_columns[0]))
    return scored.withColumn("score", total)
