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

import logging
import sys
from collections.abc import Sequence

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.game.fixed_effect import FixedEffect
from jobs.game.generation import Generation, current_generation
from jobs.game.incremental import Update, apply_events, priors_as_state, upserted
from jobs.runtime.cli import Job, job_parser, run_job
from jobs.runtime.faults import crash_point
from jobs.runtime.settings import Config
from jobs.runtime.timing import timed
from jobs.storage.ingest import ingest_batch
from jobs.storage.parsing import typed_raw_schema
from jobs.storage.schemas import RE_STATE, metrics_row, table_schemas
from jobs.storage.store import Guard, TableStore, open_store
from jobs.streaming.runner import StoppableBatches, run_until_stopped, start
from jobs.streaming.source import read_stream

LOG = logging.getLogger("lambda_learner.nearline")
QUERY_NAME = "lambda-learner-nearline"


class NearlineUpdater:
    """The body of ``foreachBatch``: one micro-batch, applied to the tables at most once.

    It holds settings only (it is pickled to the server on Spark Connect): each batch opens the
    store on the batch's own session.
    """

    def __init__(self, config: Config):
        self.config = config
        self._created = False

    def __call__(self, raw: DataFrame, batch_id: int) -> None:
        self.process(raw, batch_id)

    def store(self, spark: SparkSession) -> TableStore:
        """The tables, created on first use."""
        store = open_store(spark, self.config.storage)
        if not self._created:
            for name, schema in table_schemas(self.config.model).items():
                store.create(name, schema)
            self._created = True
        return store

    def process(self, raw: DataFrame, batch_id: int) -> dict[str, float]:
        config, store = self.config, self.store(raw.sparkSession)
        guard = Guard(config.nearline.app_id, batch_id)
        if store.applied("re_state", guard):
            # The state merge is the batch's last write: a replay after it has nothing left to do.
            LOG.info("batch %d was applied before a restart; nothing to do", batch_id)
            return {}
        seconds: dict[str, float] = {}
        crash_point("nearline:before_writes", batch_id)
        with timed("ingest", seconds):
            ingested = ingest_batch(store, config, raw, batch_id)
        generation = current_generation(store, config.model)
        # The state is still as it was before this batch: its merge is the batch's last write.
        state = store.read("re_state")
        based_on = state.agg(F.max("generation")).first()[0]
        # A new generation, or an older one current again after a rollback.
        rebase = generation is not None and generation.number != based_on
        with timed("update", seconds):
            if rebase:
                state, update = self._rebase(store, generation, ingested.events, batch_id)
            else:
                fixed_effect = FixedEffect(config.model.task, config.model.fixed_effect).initial()
                number = None
                if generation is not None:
                    fixed_effect, number = generation.fixed_effect, generation.number
                update = apply_events(ingested.events, state, config, fixed_effect, number, batch_id)
        values = {
            "rows_in": float(ingested.valid + ingested.quarantined),
            "rows_valid": float(ingested.valid),
            "rows_quarantined": float(ingested.quarantined),
            **update.values,
        }
        status = "rebased" if rebase else "updated"
        number = None if generation is None else generation.number
        with timed("write", seconds):
            values |= {f"seconds.{step}": value for step, value in seconds.items()}
            row = metrics_row(store.spark, "nearline", f"batch-{batch_id}", batch_id, number, status, values, None)
            store.append("metrics", row, guard=guard)
            crash_point("nearline:after_metrics", batch_id)
            if rebase:
                store.overwrite("re_state", state.select(*RE_STATE.fieldNames()), guard=guard)
            else:
                store.merge(
                    "re_state", update.state.select(*RE_STATE.fieldNames()), ["re_type", "entity_id"], guard=guard
                )
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

    def _rebase(
        self, store: TableStore, generation: Generation, events: DataFrame, batch_id: int
    ) -> tuple[DataFrame, Update]:
        """The state rebuilt from the generation's priors, the batches since its cutoff replayed, then this batch."""
        config = self.config
        state = priors_as_state(store, config, generation).localCheckpoint(eager=True)
        since_cutoff = store.read("events").where(
            (F.col("batch_id") > generation.cutoff_batch_id) & (F.col("batch_id") < batch_id)
        )
        replayed = sorted(row.batch_id for row in since_cutoff.select("batch_id").distinct().collect())
        LOG.info("rebasing on generation %d: replaying batches %s", generation.number, replayed)
        for replayed_id in [*replayed, batch_id]:
            batch = events if replayed_id == batch_id else since_cutoff.where(F.col("batch_id") == replayed_id)
            update = apply_events(batch, state, config, generation.fixed_effect, generation.number, replayed_id)
            state = upserted(state, update.state).localCheckpoint(eager=True)
        update.values["replayed_batches"] = float(len(replayed))
        return state, update


def run_nearline(spark: SparkSession, config: Config) -> None:
    """Start the query and run it until it ends (available-now) or is told to stop."""
    batches = StoppableBatches(NearlineUpdater(config))
    source = read_stream(spark, config.stream, typed_raw_schema(config.model))
    run_until_stopped(start(source, batches, config.stream, QUERY_NAME), batches)


def _nearline(job: Job) -> int:
    run_nearline(job.spark, job.config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("Update the random effects on every micro-batch of the stream.", "nearline_update")
    return run_job(parser, _nearline, argv)


if __name__ == "__main__":
    sys.exit(main())
