"""Coordinate descent over the GAME model's coordinates, as Photon-ML trains GAME models.

Each pass fits every coordinate in turn (the fixed effect, then each random-effect type) with the
sum of the other coordinates' current scores as its offset, then rescores the training rows with
what it fitted. Every coordinate is the same kind of thing: ``fit(frame, offset, previous)``
returns a model, ``with_score(frame, model)`` adds that model's score column.
"""

from __future__ import annotations

import logging
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.game.model import Coordinates

LOG = logging.getLogger("lambda_learner.nightly")


def coordinate_descent(training: DataFrame, coordinates: Coordinates, passes: int) -> dict[str, Any]:
    """The fitted model of each coordinate (by name: ``fixed`` and each random-effect type) after ``passes``."""
    everything = [coordinates.fixed_effect, *coordinates.random_effects]
    names = ["fixed", *[r.name for r in coordinates.random_effects]]
    models: dict[str, Any] = dict.fromkeys(names)
    scored = training.select("*", *[F.lit(0.0).alias(column) for column in coordinates.score_columns])
    for number in range(1, passes + 1):
        for name, coordinate in zip(names, everything, strict=True):
            offset = coordinates.offset_for(coordinate.score_column)
            models[name] = coordinate.fit(scored, offset, models[name])
            # Computed once and kept: later fits read it several times, and its lineage stops growing.
            rescored = coordinate.with_score(scored.drop(coordinate.score_column), models[name])
            scored = rescored.localCheckpoint(eager=True)
            LOG.info("pass %d: %s fitted", number, name)
    return models
