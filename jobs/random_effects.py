"""Random effects on Spark: the rows and coefficients frames the kernels take, grouped by entity bucket.

Both jobs update random effects the same way: ``cogroup`` each entity's rows with its
current coefficients (only entities that have rows), then the update kernel solves a
whole bucket of entities per pandas call (``udfs.random_effects``).
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from jobs.config import RandomEffectConfig
from jobs.schemas import COEFFICIENTS, FEATURES, bag_column
from udfs.random_effects import COEFFICIENT_FIELDS, SCORE_FIELDS, UPDATE_FIELDS, ScoreKernel, UpdateKernel, ddl

GROUP = "_group"


def entity_group(entity: Column, buckets: int | None) -> Column:
    """The group key: ``hash(entity) mod buckets`` (whole entities per call), or the entity itself."""
    if buckets is None:
        return entity
    return F.pmod(F.xxhash64(entity), F.lit(buckets))


def random_effect_rows(events: DataFrame, random_effect: RandomEffectConfig, offset: Column, seed: int) -> DataFrame:
    """One row per event for one random-effect type: the kernel's row fields (``udfs.random_effects.ROW_FIELDS``).

    ``events`` needs ``row_key`` (unique per row) besides the events-table columns.
    """
    bag = F.coalesce(F.col(bag_column(random_effect.feature_bag)), F.array().cast(FEATURES))
    return events.select(
        F.col(random_effect.entity_column).alias("entity_id"),
        F.col("row_key"),
        F.xxhash64(F.col("event_id"), F.lit(seed)).alias("sample_key"),
        F.col("label"),
        F.col("weight"),
        offset.cast("double").alias("offset"),
        # A field of an array of structs is an array (GetArrayStructFields): no lambda per element.
        bag.getField("name").alias("names"),
        bag.getField("term").alias("terms"),
        bag.getField("value").alias("values"),
    )


def scoring_rows(frame: DataFrame, random_effect: RandomEffectConfig, draw_group: Column | None = None) -> DataFrame:
    """Rows to score for one random-effect type: entity, ``row_key``, the bag's arrays (and a draw group)."""
    bag = F.coalesce(F.col(bag_column(random_effect.feature_bag)), F.array().cast(FEATURES))
    columns = [
        F.col(random_effect.entity_column).alias("entity_id"),
        F.col("row_key"),
        bag.getField("name").alias("names"),
        bag.getField("term").alias("terms"),
        bag.getField("value").alias("values"),
    ]
    if draw_group is not None:
        columns.append(draw_group.cast("string").alias("draw_group"))
    return frame.select(*columns)


def coefficient_arrays(table: DataFrame) -> DataFrame:
    """``(entity_id, coefficients[, updates, rows])`` as the kernels' parallel arrays (``COEFFICIENT_FIELDS``)."""
    coefficients = F.coalesce(F.col("coefficients"), F.array().cast(COEFFICIENTS))

    def count(column: str) -> Column:
        return F.coalesce(F.col(column), F.lit(0)).cast("long") if column in table.columns else F.lit(0).cast("long")

    return table.select(
        F.col("entity_id"),
        coefficients.getField("name").alias("names"),
        coefficients.getField("term").alias("terms"),
        coefficients.getField("mean").alias("means"),
        coefficients.getField("variance").alias("variances"),
        count("updates").alias("updates"),
        count("rows").alias("total_rows"),
    )


def coefficient_records(arrays: DataFrame) -> Column:
    """The kernels' parallel arrays back into an array of coefficient records."""
    # Zipped structs take the record's field names by position in the cast: no lambda per coefficient.
    return F.arrays_zip(F.col("names"), F.col("terms"), F.col("means"), F.col("variances")).cast(COEFFICIENTS)


def update_random_effect(
    rows: DataFrame, coefficients: DataFrame, kernel: UpdateKernel, buckets: int | None
) -> DataFrame:
    """Each entity with rows, updated from its current coefficients (``UPDATE_FIELDS``)."""
    return _cogrouped(rows, coefficients, buckets).applyInPandas(_two_arguments(kernel), ddl(UPDATE_FIELDS))


MEAN_SCORES = ScoreKernel()


def score_random_effect(
    rows: DataFrame, coefficients: DataFrame, buckets: int | None, kernel: ScoreKernel = MEAN_SCORES
) -> DataFrame:
    """Each row's score under its entity's coefficients (``SCORE_FIELDS``); rows may carry a ``draw_group``."""
    return _cogrouped(rows, coefficients, buckets).applyInPandas(_two_arguments(kernel), ddl(SCORE_FIELDS))


def _two_arguments(kernel):
    """A plain two-argument function: Spark passes the group key to callables it counts three arguments on."""
    return lambda group_rows, group_coefficients: kernel(group_rows, group_coefficients)


def _cogrouped(rows: DataFrame, coefficients: DataFrame, buckets: int | None):
    # Only the entities of this batch: the kernel should not receive the whole table.
    needed = coefficients.select(*[name for name, _ in COEFFICIENT_FIELDS]).join(
        rows.select("entity_id").distinct(), "entity_id", "left_semi"
    )
    rows = rows.withColumn(GROUP, entity_group(F.col("entity_id"), buckets))
    needed = needed.withColumn(GROUP, entity_group(F.col("entity_id"), buckets))
    return rows.groupBy(GROUP).cogroup(needed.groupBy(GROUP))
