"""The nearline job: exactly-once incremental updates of the random effects on every micro-batch.

    python -m jobs.nearline_update --config conf/local.yaml [--set key=value ...]
    spark-submit jobs/nearline_update.py --config conf/cluster.yaml

Structured Streaming reads the configured source; ``foreachBatch`` runs, per micro-batch:
parse (rejects to quarantine), append the valid events, update each random-effect type
in turn (the fixed effect plus the other types' scores as offset) with the sequential
Bayesian update in the batched solver, then record the batch's metrics and merge the
new state. Every write is guarded by the Delta transaction ``(nearline.app_id, batch_id)``
and computed from the state as it was before the batch, so a batch replayed after a
crash writes nothing twice and the same thing once.

When the nightly job has published a new generation, the next batch rebuilds the state
from its priors, replays the events ingested after its cutoff (in batch order, with the
new fixed effect) and then applies itself, all in one guarded overwrite. docs/nearline.md.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from pyspark.errors import StreamingQueryException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery

from jobs.config import Config, load_config
from jobs.events import TEXT_COLUMN, typed_raw_schema
from jobs.faults import crash_point
from jobs.fixed_effect import FixedEffectModel
from jobs.ingest import ingest_batch
from jobs.model import Generation, current_generation, fixed_effect_score, priors_of, random_effect_score, score_column
from jobs.random_effects import coefficient_arrays, coefficient_records, random_effect_rows, update_random_effect
from jobs.schemas import RE_STATE, table_schemas
from jobs.spark import spark_session
from jobs.tables import Guard, TableStore, open_store
from udfs.random_effects import UpdateKernel

LOG = logging.getLogger("lambda_learner.nearline")
# Sample keys for the row cap: a fixed seed, so a replayed batch keeps the same rows.
ROW_CAP_SEED = 29


@dataclass
class Update:
    """One batch's events applied to a state: the new state rows of the entities it touched, and its figures."""

    state: DataFrame
    values: dict[str, float] = field(default_factory=dict)


def apply_events(
    events: DataFrame,
    state: DataFrame,
    config: Config,
    fixed_effect: FixedEffectModel | None,
    generation: int | None,
    batch_id: int,
) -> Update:
    """Update each random-effect type in turn on ``events`` (events-table rows) from ``state`` (re_state rows).

    Type k's offset is the fixed effect plus the updated scores of the types before it and the
    current scores of the types after it. The same function serves live batches, the replay of a
    rebase and offline references.
    """
    buckets = config.nearline.buckets
    random_effects = config.model.random_effects
    scored = events.withColumn("row_key", F.xxhash64("event_id", "batch_id")).withColumn(
        "score_fixed", fixed_effect_score(config.model, fixed_effect)
    )
    current = {r.name: state.where(F.col("re_type") == r.name) for r in random_effects}
    # The first type's current scores are never an offset: every other type's are.
    for random_effect in random_effects[1:]:
        scored = _with_scores(scored, random_effect, current[random_effect.name], buckets)
    values: dict[str, float] = {}
    updated_types = []
    for position, random_effect in enumerate(random_effects):
        others = [F.col(score_column(r)) for r in random_effects if r.name != random_effect.name]
        rows = random_effect_rows(scored, random_effect, sum(others, F.col("score_fixed")), ROW_CAP_SEED)
        kernel = UpdateKernel(
            config.model.task, random_effect.penalty, random_effect.delta, random_effect.max_rows_per_entity
        )
        updated = update_random_effect(rows, coefficient_arrays(current[random_effect.name]), kernel, buckets)
        updated = updated.localCheckpoint(eager=True)
        values |= _type_figures(updated, random_effect.name, position, len(random_effects))
        updated_types.append(_as_state(updated, random_effect.name, generation, batch_id))
        if position < len(random_effects) - 1:
            scored = _with_scores(scored.drop(score_column(random_effect)), random_effect, updated_types[-1], buckets)
    new_state = state.limit(0)
    for frame in updated_types:
        new_state = new_state.unionByName(frame)
    return Update(new_state, values)


def _with_scores(frame: DataFrame, random_effect, coefficients: DataFrame, buckets: int | None) -> DataFrame:
    column = score_column(random_effect)
    scores = random_effect_score(frame, random_effect, coefficients, buckets).withColumnRenamed("score", column)
    return frame.join(scores, "row_key", "left").fillna(0.0, [column]).localCheckpoint(eager=True)


def _as_state(updated: DataFrame, re_type: str, generation: int | None, batch_id: int) -> DataFrame:
    """The updated entities as re_state rows; a failed update keeps its prior's coefficients and counts."""
    converged = F.col("converged")
    return updated.select(
        F.lit(re_type).alias("re_type"),
        "entity_id",
        F.lit(generation).cast("long").alias("generation"),
        coefficient_records(updated).alias("coefficients"),
        F.lit(batch_id).cast("long").alias("last_batch_id"),
        (F.col("updates") + converged.cast("long")).alias("updates"),
        (F.col("total_rows") + F.when(converged, F.col("rows")).otherwise(0)).alias("rows"),
        F.current_timestamp().alias("updated_at"),
    )


def _type_figures(updated: DataFrame, re_type: str, position: int, types: int) -> dict[str, float]:
    totals = updated.agg(
        F.count("*").alias("entities"),
        F.sum((~F.col("had_prior")).cast("long")).alias("new"),
        F.sum((~F.col("converged")).cast("long")).alias("failed"),
        F.sum("loss_before").alias("loss_before"),
        F.sum("loss_after").alias("loss_after"),
        F.sum("rows").alias("rows"),
    ).first()
    figures = {
        f"entities_updated.{re_type}": float(totals.entities),
        f"new_entities.{re_type}": float(totals.new or 0),
        f"failed_updates.{re_type}": float(totals.failed or 0),
    }
    rows = float(totals.rows or 0)
    # The first type's loss before is the whole model's before the batch; the last type's after, after it.
    if position == 0 and rows:
        figures["loss_before"] = totals.loss_before / rows
    if position == types - 1 and rows:
        figures["loss_after"] = totals.loss_after / rows
    return figures


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


class StopRequestedError(Exception):
    """A micro-batch refused because the job is stopping: Spark commits nothing, the next start redoes it."""


class NearlineUpdater:
    """The body of ``foreachBatch``: one micro-batch, applied to the tables at most once."""

    def __init__(self, store: TableStore, config: Config):
        self.store = store
        self.config = config
        for name, schema in table_schemas(config.model).items():
            store.create(name, schema)
        self._lock = threading.Lock()
        self._busy = False
        self._stopping = False

    def __call__(self, raw: DataFrame, batch_id: int) -> None:
        with self._lock:
            if self._stopping:
                raise StopRequestedError(f"batch {batch_id} left for the next start")
            self._busy = True
        try:
            self.process(raw, batch_id)
        finally:
            with self._lock:
                self._busy = False

    def stop_requested(self) -> bool:
        """From now on refuse new batches; True once no batch is running."""
        with self._lock:
            self._stopping = True
            return not self._busy

    def process(self, raw: DataFrame, batch_id: int) -> dict[str, float]:
        config, store = self.config, self.store
        guard = Guard(config.nearline.app_id, batch_id)
        if store.applied("re_state", guard):
            # The state merge is the batch's last write: a replay after it has nothing left to do.
            LOG.info("batch %d was applied before a restart; nothing to do", batch_id)
            return {}
        seconds: dict[str, float] = {}
        crash_point("nearline:before_writes", batch_id)
        with _timed("ingest", seconds):
            ingested = ingest_batch(store, config, raw, batch_id)
        generation = current_generation(store)
        # The state is still as it was before this batch: its merge is the batch's last write.
        state = store.read("re_state")
        based_on = state.agg(F.max("generation")).first()[0]
        # A new generation, or an older one current again after a rollback.
        rebase = generation is not None and generation.number != based_on
        with _timed("update", seconds):
            if rebase:
                state, update = self._rebase(generation, ingested.events, batch_id)
            else:
                update = apply_events(
                    ingested.events, state, config, _fixed_effect(generation), _number(generation), batch_id
                )
        values = {
            "rows_in": float(ingested.valid + ingested.quarantined),
            "rows_valid": float(ingested.valid),
            "rows_quarantined": float(ingested.quarantined),
            **update.values,
        }
        status = "rebased" if rebase else "updated"
        with _timed("write", seconds):
            values |= {f"seconds.{step}": value for step, value in seconds.items()}
            self._record(batch_id, _number(generation), status, values, guard)
            crash_point("nearline:after_metrics", batch_id)
            if rebase:
                store.overwrite("re_state", _state_columns(state), guard=guard)
            else:
                store.merge("re_state", _state_columns(update.state), ["re_type", "entity_id"], guard=guard)
            crash_point("nearline:after_state_merge", batch_id)
        LOG.info(
            "batch %d: %s, %d valid, %d quarantined, %s, %.1f s",
            batch_id,
            status,
            ingested.valid,
            ingested.quarantined,
            {key: round(value, 4) for key, value in update.values.items()},
            sum(seconds.values()),
        )
        return values

    def _rebase(self, generation: Generation, events: DataFrame, batch_id: int) -> tuple[DataFrame, Update]:
        """The state rebuilt from the generation's priors, the batches since its cutoff replayed, then this batch."""
        config, store = self.config, self.store
        state = priors_as_state(store, config, generation).localCheckpoint(eager=True)
        since_cutoff = store.read("events").where(
            (F.col("batch_id") > generation.cutoff_batch_id) & (F.col("batch_id") < batch_id)
        )
        replayed = sorted(row.batch_id for row in since_cutoff.select("batch_id").distinct().collect())
        LOG.info("rebasing on generation %d: replaying batches %s", generation.number, replayed)
        for replayed_id in [*replayed, batch_id]:
            batch = events if replayed_id == batch_id else since_cutoff.where(F.col("batch_id") == replayed_id)
            update = apply_events(batch, state, config, generation.fixed_effect, generation.number, replayed_id)
            state = _upserted(state, update.state).localCheckpoint(eager=True)
        update.values["replayed_batches"] = float(len(replayed))
        return state, update

    def _record(self, batch_id: int, generation: int | None, status: str, values: dict, guard: Guard) -> None:
        row = self.store.spark.createDataFrame(
            [("nearline", f"batch-{batch_id}", batch_id, generation, status, values, None)],
            "job string, run_id string, batch_id long, generation long, status string, "
            "values map<string, double>, note string",
        ).withColumn("recorded_at", F.current_timestamp())
        self.store.append("metrics", row, guard=guard)


def _upserted(state: DataFrame, updates: DataFrame) -> DataFrame:
    """``state`` with the rows of ``updates`` in place of (or beside) its own."""
    kept = state.join(updates.select("re_type", "entity_id"), ["re_type", "entity_id"], "left_anti")
    return kept.unionByName(updates.select(*RE_STATE.fieldNames()))


def _state_columns(frame: DataFrame) -> DataFrame:
    return frame.select(*RE_STATE.fieldNames())


def _fixed_effect(generation: Generation | None) -> FixedEffectModel | None:
    return None if generation is None else generation.fixed_effect


def _number(generation: Generation | None) -> int | None:
    return None if generation is None else generation.number


@contextmanager
def _timed(step: str, seconds: dict[str, float]) -> Iterator[None]:
    started = time.perf_counter()
    yield
    seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - started


def read_stream(spark: SparkSession, config: Config) -> DataFrame:
    """The configured source as a streaming frame: JSON text in a ``value`` column, or typed columns."""
    stream = config.stream
    reader = spark.readStream.options(**stream.options)
    if stream.max_files_per_trigger is not None:
        reader = reader.option("maxFilesPerTrigger", stream.max_files_per_trigger)
    if stream.source == "kafka":
        return reader.format("kafka").load().select(F.col("value").cast("string").alias(TEXT_COLUMN))
    if stream.source == "delta":
        return reader.format("delta").load(stream.path)
    typed = stream.format == "parquet"
    if stream.source == "autoloader":
        reader = reader.format("cloudFiles").option("cloudFiles.format", "parquet" if typed else "text")
    else:
        reader = reader.format("parquet" if typed else "text")
    if typed:
        reader = reader.schema(typed_raw_schema(config.model))
    return reader.load(stream.path)


def start(spark: SparkSession, updater: NearlineUpdater) -> StreamingQuery:
    """Start the query: one checkpoint, the configured trigger, the updater per micro-batch."""
    config = updater.config
    writer = (
        read_stream(spark, config)
        .writeStream.foreachBatch(updater)
        .option("checkpointLocation", config.stream.checkpoint)
    )
    if config.stream.trigger == "available_now":
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=config.stream.processing_time)
    return writer.queryName("lambda-learner-nearline").start()


def run_until_stopped(query: StreamingQuery, updater: NearlineUpdater) -> None:
    """Wait for the query; on SIGTERM or SIGINT let the running batch finish, then stop."""
    signalled = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: signalled.set())
    stopping = False
    while query.isActive:
        try:
            query.awaitTermination(0.2)
        except StreamingQueryException:
            break  # judged below: a batch refused while stopping is not a failure
        if signalled.is_set() and query.isActive:
            if not stopping:
                LOG.info("stop requested: finishing the running batch, then stopping")
                stopping = True
            if updater.stop_requested():
                query.stop()
    failure = query.exception()
    if failure is not None and not (stopping and StopRequestedError.__name__ in str(failure)):
        raise RuntimeError(f"the nearline query failed: {failure}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Update the random effects on every micro-batch of the stream.")
    parser.add_argument("--config", default=None, help="environment file over conf/base.yaml (e.g. conf/local.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value override")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    config = load_config(args.config, args.overrides)
    spark = spark_session(config.spark)
    updater = NearlineUpdater(open_store(spark, config.storage), config)
    run_until_stopped(start(spark, updater), updater)
    return 0


if __name__ == "__main__":
    sys.exit(main())
