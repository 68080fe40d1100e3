"""Incremental updates of the random effects on events, from a state of live coefficients.

The same function serves live micro-batches, the one-pass replay of a rebase and offline references.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.game.fixed_effect import FixedEffectScorer
from jobs.game.generation import Generation, priors_of
from jobs.game.model import Coordinates
from jobs.game.random_effect import (
    GROUP,
    RandomEffectModel,
    coefficient_projection,
    coefficient_records,
    updated_scores,
)
from jobs.runtime.settings import Config
from jobs.storage.schemas import RE_STATE
from jobs.storage.store import TableStore
from udfs.entity_kernels import FAILURE_REASONS, UPDATE_FIELDS, DriverCoordinate, ddl, update_totals, updated_on_driver

# Sample keys for the row cap: a fixed seed, so a replayed batch keeps the same rows.
ROW_CAP_SEED = 29
# The column tagging each collected row with its random-effect type, on the driver path.
TYPE = "_re_type"


@dataclass
class Update:
    """Events applied to a state: the new state rows of the entities they touched, and their figures."""

    state: DataFrame
    values: dict[str, float] = field(default_factory=dict)


def apply_events(
    events: DataFrame,
    state: DataFrame,
    config: Config,
    fixed_effect: FixedEffectScorer,
    generation: int | None,
    batch_id: int,
    *,
    in_batches: bool = False,
    on_driver: bool = False,
    buckets: int | None = None,
) -> Update:
    """Update each random-effect type in turn on ``events`` (events-table rows) from ``state`` (re_state rows).

    Type k's offset is the fixed effect, plus each earlier type's score of the row right after its update,
    plus each later type's score before any update. ``in_batches``: ``events`` span several micro-batches,
    applied per entity in batch order in one pass (a rebase's replay); ``batch_id`` is the last of them.
    ``on_driver``: the kernels run on the driver on the same groups (a small batch; the same result).
    ``buckets``: the entity buckets of the kernels' calls (``NearlineConfig.buckets_for`` the batch's size), or
    ``nearline.entity_buckets``.
    """
    coordinates = Coordinates.of(config, buckets or config.nearline.buckets, ROW_CAP_SEED)
    random_effects = coordinates.random_effects
    keyed = events.withColumn("row_key", F.xxhash64("event_id", "batch_id"))
    scored = coordinates.fixed_effect.with_score(keyed, fixed_effect)
    current = {r.name: state.where(F.col("re_type") == r.name) for r in random_effects}
    if on_driver:
        updated_by_type = _updated_on_driver(scored, current, coordinates)
    else:
        updated_by_type = _updated_on_executors(scored, current, coordinates, in_batches)
    values = {"updated_on_driver": float(on_driver)}
    new_state = state.limit(0)
    for position, (random_effect, (updated, totals)) in enumerate(zip(random_effects, updated_by_type, strict=True)):
        values |= _type_figures(totals, random_effect.name, position, len(random_effects))
        new_state = new_state.unionByName(_as_state(updated, random_effect.name, generation, batch_id))
    return Update(new_state, values)


def _updated_on_executors(
    scored: DataFrame, current: dict[str, DataFrame], coordinates: Coordinates, in_batches: bool
) -> list[tuple[DataFrame, dict[str, float]]]:
    """Each type's updated entities (``UPDATE_FIELDS``) and their totals, type after type, grouped in Spark."""
    random_effects = coordinates.random_effects
    # The first type's current scores are never an offset: every other type's are.
    for random_effect in random_effects[1:]:
        scored = _materialised(random_effect.with_score(scored, RandomEffectModel(current[random_effect.name])))
    updated_by_type = []
    for position, random_effect in enumerate(random_effects):
        offset = coordinates.offset_for(random_effect.score_column)
        updated = _materialised(
            random_effect.update(scored, offset, current[random_effect.name], in_batches=in_batches)
        )
        updated_by_type.append((updated, _totals_in_spark(updated)))
        if position < len(random_effects) - 1:
            # The kernel scored every row right after its own batch's update: no second pass over the rows.
            scores = updated_scores(updated).withColumnRenamed("score", random_effect.score_column)
            joined = scored.drop(random_effect.score_column).join(scores, "row_key", "left")
            scored = _materialised(joined.fillna(0.0, [random_effect.score_column]))
    return updated_by_type


def _updated_on_driver(
    scored: DataFrame, current: dict[str, DataFrame], coordinates: Coordinates
) -> list[tuple[DataFrame, dict[str, float]]]:
    """What :func:`_updated_on_executors` returns, computed on the driver from two collects.

    Every type's rows (their offset the fixed effect's score alone) and coefficients are collected
    with their group keys; then the kernels run group by group as Spark would call them, and each
    offset adds the other types' scores in :meth:`Coordinates.offset_for`'s order: the same doubles.
    """
    spark, random_effects = scored.sparkSession, coordinates.random_effects
    fixed = coordinates.fixed_effect.score_column
    rows = _collected({r.name: r.grouped(r.rows(scored, F.col(fixed))) for r in random_effects})
    coefficients = _collected({r.name: r.grouped(coefficient_projection(current[r.name])) for r in random_effects})
    updated_by_type = updated_on_driver(
        rows,
        coefficients,
        [DriverCoordinate(r.name, r.score_column, r.update_kernel) for r in random_effects],
        coordinates.offset_for,
        type_column=TYPE,
        key=GROUP,
        fixed_column=fixed,
    )
    schema = ddl(UPDATE_FIELDS)
    return [(spark.createDataFrame(updated, schema), update_totals(updated)) for updated in updated_by_type]


def _collected(frames: dict[str, DataFrame]):
    """Frames of one schema by random-effect type, each row tagged with its type (``TYPE``), as one pandas frame."""
    tagged = [frame.withColumn(TYPE, F.lit(name)) for name, frame in frames.items()]
    return reduce(DataFrame.unionByName, tagged).toPandas()


def priors_as_state(store: TableStore, config: Config, generation: Generation) -> DataFrame:
    """The generation's priors as re_state rows: where a rebase starts, before any replayed batch."""
    state = store.spark.createDataFrame([], RE_STATE)
    for random_effect in config.model.random_effects:
        state = state.unionByName(
            priors_of(store, generation.number, random_effect).select(
                F.lit(random_effect.name).alias("re_type"),
                "entity_id",
                F.lit(generation.number).cast("long").alias("generation"),
                "coefficients",
                F.lit(generation.cutoff_batch_id).cast("long").alias("last_batch_id"),
                F.lit(0).cast("long").alias("updates"),
                F.lit(0).cast("long").alias("rows"),
                F.current_timestamp().alias("updated_at"),
            )
        )
    return state


def upserted(state: DataFrame, updates: DataFrame) -> DataFrame:
    """``state`` with the rows of ``updates`` in place of (or beside) its own."""
    kept = state.join(updates.select("re_type", "entity_id"), ["re_type", "entity_id"], "left_anti")
    return kept.unionByName(updates.select(*RE_STATE.fieldNames()))


def _materialised(frame: DataFrame) -> DataFrame:
    return frame.localCheckpoint(eager=True)


def _as_state(updated: DataFrame, re_type: str, generation: int | None, batch_id: int) -> DataFrame:
    """The updated entities as re_state rows; a failed batch of an entity leaves its coefficients and counts."""
    return updated.select(
        F.lit(re_type).alias("re_type"),
        "entity_id",
        F.lit(generation).cast("long").alias("generation"),
        coefficient_records(updated).alias("coefficients"),
        F.lit(batch_id).cast("long").alias("last_batch_id"),
        (F.col("updates") + F.col("converged_batches")).alias("updates"),
        (F.col("total_rows") + F.col("converged_rows")).alias("rows"),
        F.current_timestamp().alias("updated_at"),
    )


def _totals_in_spark(updated: DataFrame) -> dict[str, float]:
    """What :func:`_type_figures` needs of one type's updated entities, summed by Spark (pandas: ``update_totals``)."""
    return (
        updated.agg(
            F.count("*").alias("entities"),
            F.sum((~F.col("had_prior")).cast("long")).alias("new"),
            F.sum(F.col("batches") - F.col("converged_batches")).alias("failed"),
            F.sum("loss_before").alias("loss_before"),
            F.sum("loss_after").alias("loss_after"),
            F.sum("rows").alias("rows"),
            *[F.sum((F.col("failure") == reason).cast("long")).alias(reason) for reason in FAILURE_REASONS],
        )
        .first()
        .asDict()
    )


def _type_figures(totals: dict[str, float], re_type: str, position: int, types: int) -> dict[str, float]:
    figures = {
        f"entities_updated.{re_type}": float(totals["entities"]),
        f"new_entities.{re_type}": float(totals["new"] or 0),
        f"failed_updates.{re_type}": float(totals["failed"] or 0),
    }
    figures |= {f"failures.{re_type}.{reason}": float(totals[reason]) for reason in FAILURE_REASONS if totals[reason]}
    rows = float(totals["rows"] or 0)
    # The first type's loss before is the whole model's before the batch; the last type's after, after it.
    if position == 0 and rows:
        figures["loss_before"] = totals["loss_before"] / rows
    if position == types - 1 and rows:
        figures["loss_after"] = totals["loss_after"] / rows
    return figures
