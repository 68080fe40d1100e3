"""The body of the label join's ``foreachBatch``: one micro-batch joined and written exactly once.

Batches are numbered by the tables' sequence (``jobs.streaming.sequence``), as the nearline job's are: a
new checkpoint continues the numbers, a batch Spark replays keeps its own. Every write carries the Delta
transaction ``(label_join.app_id, batch number)``: the metrics row (the ledger of batch numbers), the
labelled events and the quarantine rows (each unless there are none) are appended, then the new state
replaces the old one. The state is the commit point: a batch whose state is in the table is skipped
whole, and until then the batch is computed from the state as it was before it, with the same
arrivals (Spark replays a batch with the same offsets), so a replay writes what the first attempt
would have written and the guard skips what it already wrote.
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession

from jobs.labels.join import join_batch
from jobs.labels.schemas import label_join_tables
from jobs.runtime.faults import crash_point
from jobs.runtime.settings import Config
from jobs.runtime.timing import timed
from jobs.storage.schemas import metrics_row
from jobs.storage.store import TableStore, open_store
from jobs.streaming.sequence import DIRECT, BatchSequence

LOG = logging.getLogger("lambda_learner.label_join")
JOB = "label_join"


class LabelJoiner:
    """One micro-batch of arrivals (impressions and clicks) joined against the pending state, at most once.

    It holds settings only (it is pickled to the server on Spark Connect): each batch opens the
    store on the batch's own session. ``stream_id`` as for the nearline job's ``NearlineUpdater``: None reads
    it from ``label_join.checkpoint``.
    """

    def __init__(self, config: Config, stream_id: str | None = DIRECT):
        self.config = config
        join = config.label_join
        self.sequence = BatchSequence(
            join.app_id,
            "label_join.app_id",
            join.metrics_table,
            join.pending_table,
            join.checkpoint,
            stream_id=stream_id,
        )
        self._created = False

    def __call__(self, arrivals: DataFrame, batch_id: int) -> None:
        self.process(arrivals, batch_id)

    def store(self, spark: SparkSession) -> TableStore:
        """The tables, created on first use."""
        store = open_store(spark, self.config.storage)
        if not self._created:
            join = self.config.label_join
            tables = label_join_tables(
                self.config.model, join.output_table, join.pending_table, join.quarantine_table, join.metrics_table
            )
            for name, schema in tables.items():
                store.create(name, schema)
            self._created = True
        return store

    def process(self, arrivals: DataFrame, stream_batch_id: int) -> dict[str, float]:
        """Join one micro-batch (Spark's ``stream_batch_id``); its figures, or {} if it was joined before."""
        join, store = self.config.label_join, self.store(arrivals.sparkSession)
        ticket = self.sequence.ticket(store, stream_batch_id)
        batch_id, guard = ticket.sequence, ticket.guard(join.app_id)
        if store.applied(join.pending_table, guard):
            LOG.info("batch %d was joined before a restart; nothing to do", batch_id)
            return {}
        crash_point("label_join:before_writes", batch_id)
        seconds: dict[str, float] = {}
        with timed("join", seconds):
            arrivals = arrivals.localCheckpoint(eager=True)
            # The state is as it was before this batch: replacing it is the batch's last write.
            joined = join_batch(arrivals, store.read(join.pending_table), self.config, batch_id, ticket.ingested)
        with timed("write", seconds):
            # The metrics row first: every batch writes it, so it is where the sequence looks numbers up.
            values = joined.values | {f"seconds.{step}": value for step, value in seconds.items()}
            run_id = f"{ticket.stream_id}/{ticket.stream_batch_id}"
            row = metrics_row(store.spark, JOB, run_id, batch_id, None, "joined", values, None)
            store.append(join.metrics_table, row, guard=ticket.claim(join.app_id))
            crash_point("label_join:after_metrics", batch_id)
            # An empty append is left out: a replay finds it empty again, and a commit costs (Spark's Delta most).
            if joined.values["labelled"]:
                store.append(join.output_table, joined.labelled.coalesce(1), guard=guard)
            crash_point("label_join:after_output", batch_id)
            if joined.values["quarantined"]:
                store.append(join.quarantine_table, joined.quarantined.coalesce(1), guard=guard)
            crash_point("label_join:after_quarantine", batch_id)
            store.overwrite(join.pending_table, joined.state.coalesce(1), guard=guard)
            crash_point("label_join:after_state", batch_id)
        LOG.info(
            "batch %d: %d impressions, %d clicks in; %d positives, %d negatives out; %d quarantined; "
            "%d pending, %d clicks waiting; %.1f s",
            batch_id,
            values["impressions_in"],
            values["clicks_in"],
            values["positives"],
            values["negatives"],
            values["quarantined"],
            values["pending_impressions"],
            values["waiting_clicks"],
            sum(seconds.values()),
        )
        return values
