"""Random effects on Spark: per-entity linear models updated and scored by entity bucket.

Both jobs update random effects the same way: ``cogroup`` each entity's rows with its
current coefficients (only entities that have rows), then the update kernel solves a
whole bucket of entities per pandas call (``udfs.entity_kernels``). :class:`RandomEffect`
is one random-effect type as a coordinate: ``fit`` (the nightly batch fit, no prior) and
``update`` (the nearline sequential Bayesian update) on rows with an offset.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from jobs.runtime.settings import RandomEffectConfig
from jobs.storage.schemas import COEFFICIENTS, bag_arrays
from udfs.entity_kernels import COEFFICIENT_FIELDS, SCORE_FIELDS, UPDATE_FIELDS, ScoreKernel, UpdateKernel, ddl

GROUP = "_group"
MEAN_SCORES = ScoreKernel()


def score_column(random_effect: RandomEffectConfig) -> str:
    """The column holding one random-effect type's score of each row."""
    return f"score_{random_effect.name}"


@dataclass(frozen=True)
class RandomEffectModel:
    """One type's coefficients: ``(entity_id, coefficients)`` rows (more columns may ride along)."""

    coefficients: DataFrame


@dataclass(frozen=True)
class RandomEffect:
    """One random-effect type as a coordinate of the GAME model.

    ``buckets``: entities are grouped into this many pandas calls (None: one entity per call,
    the slow baseline). ``seed`` keys the per-entity row sample (a replay keeps the same rows).
    """

    config: RandomEffectConfig
    task: str
    buckets: int | None
    seed: int

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def score_column(self) -> str:
        return score_column(self.config)

    def fit(self, frame: DataFrame, offset: Column, previous: RandomEffectModel | None = None) -> RandomEffectModel:
        """A batch fit (delta 0: L2, no prior) of every entity with at least ``min_rows`` rows, warm-started.

        The coefficients frame has ``(entity_id, coefficients, rows)`` and is materialised.
        """
        kernel = UpdateKernel(
            self.task,
            self.config.penalty,
            delta=0.0,
            max_rows_per_entity=self.config.max_rows_per_entity,
            min_rows=self.config.min_rows,
        )
        start = previous.coefficients if previous is not None else None
        updated = self.updated(self._capped(self.rows(frame, offset)), start, kernel)
        fitted = updated.select("entity_id", coefficient_records(updated).alias("coefficients"), "rows")
        return RandomEffectModel(fitted.localCheckpoint(eager=True))

    def update(self, frame: DataFrame, offset: Column, current: DataFrame, *, in_batches: bool = False) -> DataFrame:
        """The sequential Bayesian update (the type's ``delta``) of each entity with rows: ``UPDATE_FIELDS``.

        ``in_batches``: the rows span several micro-batches (their ``batch_id``), applied one after the
        other in batch order, each with the previous one's posterior as prior, all in one pass.
        """
        return self.updated(self.rows(frame, offset, in_batches=in_batches), current, self.update_kernel)

    @property
    def update_kernel(self) -> UpdateKernel:
        """The nearline update's kernel: the sequential Bayesian update with the type's ``delta``."""
        return UpdateKernel(self.task, self.config.penalty, self.config.delta, self.config.max_rows_per_entity)

    def with_score(
        self,
        frame: DataFrame,
        model: RandomEffectModel,
        kernel: ScoreKernel = MEAN_SCORES,
        draw_group: Column | None = None,
    ) -> DataFrame:
        """``frame`` with this type's score of each row (0 for an entity without coefficients)."""
        column = self.score_column
        if kernel.thompson:
            # What a coefficient no update has touched is believed to be: the prior the update starts from.
            kernel = replace(kernel, prior_variance=1.0 / self.config.penalty)
        scores = self.scores(frame, model.coefficients, kernel, draw_group).withColumnRenamed("score", column)
        return frame.drop(column).join(scores, "row_key", "left").fillna(0.0, [column])

    def rows(self, frame: DataFrame, offset: Column, *, in_batches: bool = False) -> DataFrame:
        """One row per event for this type: the kernel's row fields (``udfs.entity_kernels.ROW_FIELDS``).

        ``frame`` needs ``row_key`` (unique per row) besides the events-table columns; with ``in_batches``,
        each row keeps its ``batch_id``.
        """
        batches = [F.col("batch_id")] if in_batches else []
        # Events from before this type existed (a migration added it) have no entity of it.
        return frame.where(F.col(self.config.entity_column).isNotNull()).select(
            F.col(self.config.entity_column).alias("entity_id"),
            F.col("row_key"),
            F.xxhash64(F.col("event_id"), F.lit(self.seed)).alias("sample_key"),
            F.col("label"),
            F.col("weight"),
            offset.cast("double").alias("offset"),
            *bag_arrays(self.config.feature_bag),
            *batches,
        )

    def updated(self, rows: DataFrame, current: DataFrame | None, kernel: UpdateKernel) -> DataFrame:
        """Each entity with rows, updated from its current coefficients (``UPDATE_FIELDS``)."""
        grouped = self._cogrouped(rows, coefficient_arrays(current, rows))
        return grouped.applyInPandas(_two_arguments(kernel), ddl(UPDATE_FIELDS))

    def scores(
        self,
        frame: DataFrame,
        coefficients: DataFrame,
        kernel: ScoreKernel = MEAN_SCORES,
        draw_group: Column | None = None,
    ) -> DataFrame:
        """``(row_key, score)`` of each row under its entity's coefficients; rows may carry a draw group."""
        columns = [
            F.col(self.config.entity_column).alias("entity_id"),
            F.col("row_key"),
            *bag_arrays(self.config.feature_bag),
        ]
        if draw_group is not None:
            columns.append(draw_group.cast("string").alias("draw_group"))
        rows = frame.select(*columns)
        grouped = self._cogrouped(rows, coefficient_arrays(coefficients, rows))
        return grouped.applyInPandas(_two_arguments(kernel), ddl(SCORE_FIELDS)).select("row_key", "score")

    def _capped(self, rows: DataFrame) -> DataFrame:
        """Each entity's rows beyond ``max_rows_per_entity`` dropped in Spark, before any group reaches pandas.

        The rows kept are the ones the kernel would keep (smallest sample keys): a hot entity with millions
        of rows in the window never fills an executor's memory. Partitioned by the group key first, so the
        window and the cogroup after it share one shuffle.
        """
        grouped = rows.withColumn(GROUP, entity_group(F.col("entity_id"), self.buckets)).repartition(GROUP)
        order = Window.partitionBy(GROUP, "entity_id").orderBy("sample_key", "row_key")
        ranked = grouped.withColumn("_rank", F.row_number().over(order))
        return ranked.where(F.col("_rank") <= self.config.max_rows_per_entity).drop("_rank")

    def grouped(self, frame: DataFrame) -> DataFrame:
        """``frame`` (rows or coefficients, by ``entity_id``) with the group key its entities are solved in."""
        return (
            frame if GROUP in frame.columns else frame.withColumn(GROUP, entity_group(F.col("entity_id"), self.buckets))
        )

    def _cogrouped(self, rows: DataFrame, coefficients: DataFrame):
        return self.grouped(rows).groupBy(GROUP).cogroup(self.grouped(coefficients).groupBy(GROUP))


def entity_group(entity: Column, buckets: int | None) -> Column:
    """The group key: ``hash(entity) mod buckets`` (whole entities per call), or the entity itself."""
    if buckets is None:
        return entity
    return F.pmod(F.xxhash64(entity), F.lit(buckets))


def coefficient_arrays(table: DataFrame | None, rows: DataFrame) -> DataFrame:
    """The coefficients of ``rows``' entities as the kernels' parallel arrays (``COEFFICIENT_FIELDS``).

    ``table`` has ``(entity_id, coefficients[, updates, rows])``; None stands for no coefficients at all.
    Only the entities of ``rows``: the kernels should not receive the whole table.
    """
    if table is None:
        table = rows.sparkSession.createDataFrame([], f"entity_id string, coefficients {COEFFICIENTS.simpleString()}")
    needed = coefficient_projection(table).join(rows.select("entity_id").distinct(), "entity_id", "left_semi")
    return needed.select(*[name for name, _ in COEFFICIENT_FIELDS])


def coefficient_projection(table: DataFrame) -> DataFrame:
    """Every entity of ``table`` (``entity_id, coefficients[, updates, rows]``) as ``COEFFICIENT_FIELDS``."""
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


def updated_scores(updated: DataFrame) -> DataFrame:
    """``(row_key, score)``: each updated row's score under its entity's coefficients right after its own batch."""
    pairs = F.explode(F.arrays_zip(F.col("row_keys").alias("row_key"), F.col("row_scores").alias("score")))
    return updated.select(pairs.alias("pair")).select("pair.row_key", "pair.score")


def coefficient_records(arrays: DataFrame) -> Column:
    """The kernels' parallel arrays back into an array of coefficient records."""
    # Zipped structs take the record's field names by position in the cast: no lambda per coefficient.
    return F.arrays_zip(F.col("names"), F.col("terms"), F.col("means"), F.col("variances")).cast(COEFFICIENTS)


def _two_arguments(kernel):
    """A plain two-argument function: Spark passes the group key to callables it counts three arguments on."""
    return lambda group_rows, group_coefficients: kernel(group_rows, group_coefficients)
