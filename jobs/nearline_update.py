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
import time
from collections.abc import Sequence
from datetime import date, datetime, timedelta

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.game.fixed_effect import FixedEffect
from jobs.game.generation import Generation, current_generation
from jobs.game.incremental import Update, apply_events, priors_as_state, upserted
from jobs.runtime.cli import Job, job_parser, run_job
from jobs.runtime.errors import ConfigError, StateRestoredError
from jobs.runtime.faults import crash_point
from jobs.runtime.settings import Config
from jobs.runtime.timing import timed
from jobs.storage.delta_rs import DeltaRsStore
from jobs.storage.ingest import Ingested, ingest_batch
from jobs.storage.parsing import typed_raw_schema
from jobs.storage.schemas import RE_STATE, create_tables, metrics_row
from jobs.storage.store import TableStore, open_store
from jobs.streaming.runner import StoppableBatches, is_connect, run_until_stopped, start
from jobs.streaming.sequence import DIRECT, BatchSequence, BatchTicket
from jobs.streaming.source import batch_input, read_batches

LOG = logging.getLogger("lambda_learner.nearline")
QUERY_NAME = "lambda-learner-nearline"
# Each batch writes quarantine first (the ledger of batch numbers), then events and metrics, the state last.
LEDGER, LAST_WRITE = "quarantine", "re_state"


class NearlineUpdater:
    """The body of ``foreachBatch``: one micro-batch, applied to the tables at most once.

    It holds settings only (it is pickled to the server on Spark Connect): each batch opens the
    store on the batch's own session. Batches are numbered by the tables' sequence
    (``jobs.streaming.sequence``): a new checkpoint continues it, a replayed batch keeps its number.
    ``stream_id`` names the stream of the batches fed to :meth:`process` (default ``direct``: fed by a
    program, not a query); None reads it from ``stream.checkpoint``, where Spark keeps its query's id.
    """

    def __init__(self, config: Config, stream_id: str | None = DIRECT):
        self.config = config
        self.sequence = BatchSequence(
            config.nearline.app_id,
            "nearline.app_id",
            LEDGER,
            LAST_WRITE,
            config.stream.checkpoint,
            stream_id=stream_id,
            lost_setting="nearline.finish_lost_batch",
            lost_batch=config.nearline.finish_lost_batch,
        )
        self._created = False
        # The current generation as of a version of the fixed_effect table: read again when the table changes.
        self._generation: tuple[int, Generation | None] | None = None
        self._newest_event: datetime | None = None
        self._retained_before: date | None = None

    def __call__(self, raw: DataFrame, batch_id: int) -> None:
        self.process(raw, batch_id)

    def store(self, spark: SparkSession) -> TableStore:
        """The tables, created on first use."""
        store = open_store(spark, self.config.storage)
        if not self._created:
            create_tables(store, self.config.model, deletion_vectors=self.config.storage.deletion_vectors)
            _check_state_size(store, self.config)
            self._created = True
        return store

    def process(self, raw: DataFrame, stream_batch_id: int) -> dict[str, float]:
        """Apply one micro-batch (Spark's ``stream_batch_id``); its figures, or {} if it was applied before."""
        config, store = self.config, self.store(raw.sparkSession)
        ticket = self.sequence.ticket(store, stream_batch_id)
        batch_id, app_id = ticket.sequence, config.nearline.app_id
        if ticket.unfinished is not None:
            self._finish_from_tables(store, ticket.unfinished, ticket.stream_id)
        if store.applied(LAST_WRITE, ticket.guard(app_id)):
            # The state write is the batch's last: a replay after it has nothing left to do.
            LOG.info("batch %d was applied before a restart; nothing to do", batch_id)
            return {}
        seconds: dict[str, float] = {}
        crash_point("nearline:before_writes", batch_id)
        with timed("ingest", seconds):
            events = batch_input(raw, config.stream, typed_raw_schema(config.model))
            ingested = ingest_batch(store, config, events, batch_id, ticket.claim(app_id), ticket.ingested)
        return self._apply(store, ticket, ingested, seconds, None)

    def _apply(
        self, store: TableStore, ticket: BatchTicket, ingested: Ingested, seconds: dict[str, float], note: str | None
    ) -> dict[str, float]:
        """Update the state on a batch's ingested events; write the batch's metrics, then its state."""
        config = self.config
        batch_id, app_id = ticket.sequence, config.nearline.app_id
        generation = self._current_generation(store)
        based_on, restored = state_generation(store, app_id)
        if restored is not None and generation is None:
            raise StateRestoredError(
                f"table {LAST_WRITE!r} was restored to an earlier version ({restored}) and there is no generation to "
                "rebuild it from: batches the guards count as applied are missing from it; empty it instead, or "
                "start from nothing (docs/operations.md, 'Reset the live model')"
            )
        # A new generation, an older one current again after a rollback, or a state restored to an earlier version.
        rebase = generation is not None and (restored is not None or generation.number != based_on)
        with timed("update", seconds):
            if rebase:
                state, update = self._rebase(store, generation, ingested.events, batch_id)
            else:
                fixed_effect = FixedEffect(config.model.task, config.model.fixed_effect).initial()
                number = None
                if generation is not None:
                    fixed_effect, number = generation.fixed_effect, generation.number
                on_driver = on_the_driver(config, ingested.valid)
                state = batch_state(store, config, ingested.events, materialised=not on_driver)
                update = apply_events(
                    ingested.events,
                    state,
                    config,
                    fixed_effect,
                    number,
                    batch_id,
                    on_driver=on_driver,
                    buckets=config.nearline.buckets_for(ingested.valid),
                )
        values = {
            "rows_in": float(ingested.valid + ingested.quarantined),
            "rows_valid": float(ingested.valid),
            "rows_quarantined": float(ingested.quarantined),
            "files_unreadable": float(ingested.unreadable_files),
            **update.values,
        }
        status = "rebased" if rebase else "updated"
        number = None if generation is None else generation.number
        with timed("write", seconds):
            values |= {f"seconds.{step}": value for step, value in seconds.items()}
            run_id = f"{ticket.stream_id}/{ticket.stream_batch_id}"
            row = metrics_row(store.spark, "nearline", run_id, batch_id, number, status, values, note)
            store.append("metrics", row, guard=ticket.guard(app_id))
            crash_point("nearline:after_metrics", batch_id)
            guard = ticket.guard(app_id, generation=number)
            if rebase:
                store.overwrite(LAST_WRITE, state.select(*RE_STATE.fieldNames()), guard=guard)
            else:
                store.merge(
                    LAST_WRITE, update.state.select(*RE_STATE.fieldNames()), ["re_type", "entity_id"], guard=guard
                )
            crash_point("nearline:after_state_merge", batch_id)
        self._retain(store, ingested.last_event)
        LOG.info(
            "batch %d (%s): %s, %d valid, %d quarantined, %s, %.1f s",
            batch_id,
            run_id,
            status,
            ingested.valid,
            ingested.quarantined,
            {key: round(value, 4) for key, value in update.values.items()},
            sum(seconds.values()),
        )
        return values

    def _finish_from_tables(self, store: TableStore, lost: BatchTicket, stream_id: str) -> None:
        """A half-written batch of a lost checkpoint, finished as its own stream's replay would have finished it.

        Its events are the ones it appended (none if it stopped before appending them: the source read
        again brings those), its quarantine rows stay as they are; its metrics row notes who finished it.
        """
        app_id = self.config.nearline.app_id
        if store.applied(LAST_WRITE, lost.guard(app_id)):
            return
        number = lost.sequence
        events = store.read("events", where=f"batch_id = {number}").localCheckpoint(eager=True)
        quarantined = store.read("quarantine", where=f"batch_id = {number}").count()
        ingested = Ingested(events, events.count(), quarantined, None, None)
        note = f"finished from the tables by stream {stream_id}: the checkpoint of stream {lost.stream_id} was lost"
        LOG.warning("batch %d: %d appended events, %d quarantined; %s", number, ingested.valid, quarantined, note)
        self._apply(store, lost, ingested, {}, note)

    def _current_generation(self, store: TableStore) -> Generation | None:
        version = store.version("fixed_effect")
        if self._generation is None or self._generation[0] != version:
            self._generation = (version, current_generation(store, self.config.model))
        return self._generation[1]

    def _retain(self, store: TableStore, newest: datetime | None) -> None:
        """Drop the event-date partitions older than ``events.retention_days`` before the newest event seen.

        Judged by event time, not the clock, so a replay of old files keeps what it ingests. At most once
        per day of newest event (and once per start); deleting twice changes nothing.
        """
        if newest is not None and (self._newest_event is None or newest > self._newest_event):
            self._newest_event = newest
        if self._newest_event is None:
            return
        before = (self._newest_event - timedelta(days=self.config.events.retention_days)).date()
        if self._retained_before is None or before > self._retained_before:
            store.delete("events", f"event_date < '{before.isoformat()}'")
            self._retained_before = before
            LOG.info("events before %s dropped (retention %g days)", before, self.config.events.retention_days)

    def _rebase(
        self, store: TableStore, generation: Generation, events: DataFrame, batch_id: int
    ) -> tuple[DataFrame, Update]:
        """The state rebuilt from the generation's priors, then every batch after its cutoff applied, in one pass.

        The batches after the cutoff (this one included) are applied per entity in batch order, each with
        the previous one's posterior as prior, exactly as batch after batch would (docs/nearline.md says
        what that means with several random-effect types). A batch the generation already covers
        (ingested, then published before its state was written) is in the priors: it is not applied again.
        """
        config, started = self.config, time.perf_counter()
        state = priors_as_state(store, config, generation).localCheckpoint(eager=True)
        cutoff = generation.cutoff_batch_id
        earlier = store.read("events", where=f"batch_id > {cutoff} AND batch_id < {batch_id}")
        replayed = earlier.groupBy("batch_id").count().orderBy("batch_id").collect()
        LOG.info(
            "rebasing on generation %d (cutoff batch %d): replaying %d batches, %d events, in one pass",
            generation.number,
            cutoff,
            len(replayed),
            sum(row["count"] for row in replayed),
        )
        if batch_id > cutoff:
            earlier = earlier.unionByName(events)
        update = apply_events(
            earlier, state, config, generation.fixed_effect, generation.number, batch_id, in_batches=True
        )
        state = upserted(state, update.state).localCheckpoint(eager=True)
        seconds = time.perf_counter() - started
        LOG.info("rebased on generation %d in %.1f s", generation.number, seconds)
        update.values |= {
            "replayed_batches": float(len(replayed)),
            "replayed_rows": float(sum(row["count"] for row in replayed)),
            "seconds.rebase": seconds,
        }
        return state, update


def _check_state_size(store: TableStore, config: Config) -> None:
    """Refuse, at start, a live state larger than the delta-rs engine serves at the speed of a small one."""
    if not isinstance(store, DeltaRsStore):
        return
    entities, ceiling = store.row_count(LAST_WRITE), config.storage.delta_rs_max_state_entities
    if entities > ceiling:
        raise ConfigError(
            f"config key 'storage.backend' is delta-rs, but the live state holds {entities} entity states, more than "
            f"storage.delta_rs_max_state_entities ({ceiling}), the largest measured to batch at the cost of a small "
            "one: delta-rs merges on the driver, in time and memory that grow with the state; use storage.backend "
            "spark-delta, or raise the limit knowing the cost (docs/performance.md)"
        )


def on_the_driver(config: Config, valid_events: int) -> bool:
    """Whether a batch of this many valid events is updated on the driver (``nearline.driver_max_rows``).

    Not with one entity per call: that setting is the per-call baseline of the executors' path.
    """
    small = valid_events <= config.nearline.driver_max_rows
    return small and config.nearline.buckets is not None and bool(config.model.random_effects)


def batch_state(store: TableStore, config: Config, events: DataFrame, *, materialised: bool = True) -> DataFrame:
    """The live state of the entities ``events`` touch, every type's, read in one scan (and kept, if ``materialised``).

    The state grows with every entity ever seen; a batch touches a few thousand: everything after
    this reads those only. A frame read once (the driver's path collects it) need not be kept.
    """
    keys = None
    for random_effect in config.model.random_effects:
        pairs = events.select(
            F.lit(random_effect.name).alias("re_type"), F.col(random_effect.entity_column).alias("entity_id")
        )
        keys = pairs if keys is None else keys.unionByName(pairs)
    state = store.read(LAST_WRITE)
    if keys is None:
        return state.limit(0)
    # A semi-join keeps each state row once however often its key repeats: no distinct (and no shuffle) needed.
    touched = state.join(F.broadcast(keys), ["re_type", "entity_id"], "left_semi")
    return touched.localCheckpoint(eager=True) if materialised else touched


def state_generation(store: TableStore, app_id: str) -> tuple[int | None, int | None]:
    """The generation the live state is on (recorded with its last write, unless someone wrote it since), and the
    table version of a RESTORE since its last write, if any: a restored state lacks batches its guards count."""
    last = store.last_guarded_commit(LAST_WRITE, app_id)
    if last is not None and last.table_version == store.version(LAST_WRITE):
        return last.guard.facts.get("generation"), None
    since = -1 if last is None else last.table_version
    restores = [c.version for c in store.history(LAST_WRITE) if c.version > since and c.operation == "RESTORE"]
    # Emptied or edited by hand (docs/operations.md): look at the rows.
    generation = store.read(LAST_WRITE).agg(F.max("generation")).first()[0]
    return generation, max(restores, default=None)


def run_nearline(spark: SparkSession, config: Config) -> None:
    """Start the query and run it until it ends (available-now) or is told to stop.

    On Spark Connect the updater itself is pickled to the server, where its batches run (a stop waits for the
    query to be between triggers); on a classic session it runs here, wrapped so that a stop refuses new batches.
    """
    updater = NearlineUpdater(config, stream_id=None)
    source = read_batches(spark, config.stream, typed_raw_schema(config.model))
    if is_connect(spark):
        run_until_stopped(start(source, updater, config.stream, QUERY_NAME))
        return
    batches = StoppableBatches(updater)
    run_until_stopped(start(source, batches, config.stream, QUERY_NAME), batches)


def _nearline(job: Job) -> int:
    run_nearline(job.spark, job.config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("Update the random effects on every micro-batch of the stream.", "nearline_update")
    return run_job(parser, _nearline, argv)


if __name__ == "__main__":
    sys.exit(main())
