"""The nightly job's training data: the window of events it trains on, and the hold-out it validates on."""

from __future__ import annotations

from datetime import timedelta

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.runtime.settings import Config


def training_window(events: DataFrame, config: Config) -> tuple[DataFrame, DataFrame]:
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
