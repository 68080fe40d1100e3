"""Running a streaming query whose micro-batches are written by ``foreachBatch``, until it is told to stop.

On a classic session the batch function runs in this process: wrapped in :class:`StoppableBatches`, a stop signal
(SIGTERM, SIGINT) lets the running micro-batch finish, and a batch Spark starts after the signal is refused before
it writes anything (Spark commits nothing for it, the next start redoes it), so a stop never cuts a batch in half.

On Spark Connect (Databricks standard access mode and serverless) the function is pickled to the server and runs
in a Python process there: nothing in this process sees a batch begin or end, and a lock cannot be pickled. The
bare function goes to the server, and a stop signal waits until the query is between triggers
(``query.status["isTriggerActive"]`` false) or the trigger running at the signal has ended, then stops the query.
A stop that lands as a trigger begins cuts that batch short, which is safe: every write of a batch is guarded, and
the next start redoes it.

A Kafka source that finds the offsets it was to read next deleted (retention, or by hand) stops the query, as
Spark's default ``failOnDataLoss=true`` wants: :class:`DataLossError` says which setting skips the lost range.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Callable

from pyspark.errors import StreamingQueryException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.streaming import StreamingQuery
from pyspark.sql.utils import is_remote

from jobs.runtime.errors import QueryFailedError
from jobs.runtime.settings import StreamConfig

LOG = logging.getLogger("lambda_learner.streaming")

BatchFunction = Callable[[DataFrame, int], object]
# How often the query is asked whether it ended (a round trip to the server on Spark Connect).
POLL_SECONDS = 0.2
# How Spark's Kafka source says that offsets it was to read are gone: its error class (spark-sql-kafka-0-10's
# kafka-error-conditions.json), and the message's first words, which a task failure carries without the class.
KAFKA_DATA_LOSS = ("KAFKA_DATA_LOSS", "Some data may have been lost because they are not available in Kafka any more")
DATA_LOSS_SETTING = "stream.options.failOnDataLoss"
# "Reason: Could not read records in offset [150, 300) for topic partition t-0\nwith consumer group ...".
DATA_LOSS_REASON = re.compile(
    r"Reason:\s*(.{1,300}?)(?:\s+with consumer group\b|\.\s*$|\.\s*\n)", re.DOTALL | re.MULTILINE
)


class StopRequestedError(Exception):
    """A micro-batch refused because the job is stopping: Spark commits nothing, the next start redoes it."""


class DataLossError(QueryFailedError):
    """The query stopped because Kafka no longer holds offsets it had still to read."""


class StoppableBatches:
    """A ``foreachBatch`` function that can be told to refuse the batches that start after a stop request.

    For classic sessions only: on Spark Connect the function runs on the server (:func:`start` unwraps it).
    """

    def __init__(self, process: BatchFunction):
        self.process = process
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


def is_connect(spark: SparkSession) -> bool:
    """Whether ``spark`` is a Spark Connect session (Databricks standard access mode, serverless, ``spark.remote``)."""
    return is_remote() or type(spark).__module__.startswith("pyspark.sql.connect.")


def start(source: DataFrame, batches: BatchFunction, stream: StreamConfig, name: str) -> StreamingQuery:
    """Start the query: one checkpoint, the configured trigger, ``batches`` per micro-batch.

    On Spark Connect a :class:`StoppableBatches` is unwrapped: its function alone is pickled to the server.
    """
    if isinstance(batches, StoppableBatches) and is_connect(source.sparkSession):
        batches = batches.process
    writer = source.writeStream.foreachBatch(batches).option("checkpointLocation", stream.checkpoint)
    if stream.trigger == "available_now":
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=stream.processing_time)
    return writer.queryName(name).start()


def run_until_stopped(query: StreamingQuery, batches: StoppableBatches | None = None) -> None:
    """Wait for the query; on SIGTERM or SIGINT let the running batch finish, then stop.

    ``batches`` is the query's :class:`StoppableBatches` on a classic session; without it (and on Spark Connect,
    whatever is given) the stop waits for the query to be between triggers.
    """
    signalled = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: signalled.set())
    if _is_connect_query(query):
        batches = None
    stopping, stopped, running_at_signal = False, False, None
    while query.isActive:
        try:
            query.awaitTermination(POLL_SECONDS)
        except StreamingQueryException:
            break  # judged below: a batch refused while stopping is not a failure
        if signalled.is_set() and query.isActive:
            if not stopping:
                LOG.info("stop requested: finishing the running batch, then stopping")
                stopping, running_at_signal = True, _last_trigger(query)
            if batches.stop_requested() if batches is not None else _between_triggers(query, running_at_signal):
                query.stop()
                stopped = True
    failure = query.exception()
    if failure is None or (stopping and StopRequestedError.__name__ in str(failure)):
        return
    if stopped and batches is None:
        # Stopped by us between (or at the start of) triggers on the server: a batch cut short is redone at the
        # next start, guarded.
        LOG.warning("the query %s reported an error after it was stopped: %s", query.name, _first_line(failure))
        return
    error = query_failure(query.name, failure)
    LOG.error("%s", error)
    raise error


def query_failure(name: str | None, failure: BaseException | str) -> QueryFailedError:
    """The error a failed query raises: for lost Kafka offsets, one message naming the setting that skips them."""
    text = str(failure)
    if not any(marker in text for marker in KAFKA_DATA_LOSS):
        return QueryFailedError(f"the query {name} failed: {failure}")
    return DataLossError(
        f"the query {name} stopped: Kafka no longer holds offsets it had still to read (the topic's retention, or "
        f"someone, deleted them), and {DATA_LOSS_SETTING} is true (Spark's default), so nothing was skipped "
        "silently. To skip the lost range, start the job once with "
        f"--set {DATA_LOSS_SETTING}=false: it reads on from the earliest offset Kafka still has (Spark logs it), "
        "and that batch's metrics row counts fewer rows; then start it again without the setting "
        f"(docs/deploy.md, Kafka). Spark said: {_data_loss_reason(text)}"
    )


def _data_loss_reason(text: str) -> str:
    """Spark's reason for the lost offsets (which range of which partition), in one line."""
    reason = DATA_LOSS_REASON.search(text)
    if reason is not None:
        return " ".join(reason.group(1).split())
    return next((line.strip() for line in text.splitlines() if any(m in line for m in KAFKA_DATA_LOSS)), "")[:300]


def _first_line(failure: BaseException | str) -> str:
    lines = str(failure).strip().splitlines()
    return lines[0] if lines else type(failure).__name__


def _is_connect_query(query: StreamingQuery) -> bool:
    return type(query).__module__.startswith("pyspark.sql.connect.")


def _last_trigger(query: StreamingQuery) -> str | None:
    """When the query's latest finished trigger began (None before the first)."""
    progress = query.lastProgress
    return None if progress is None else progress["timestamp"]


def _between_triggers(query: StreamingQuery, running_at_signal: str | None) -> bool:
    """No trigger running, or the one running at the signal has finished (a backlog leaves no gap between them)."""
    return not query.status["isTriggerActive"] or _last_trigger(query) != running_at_signal
