"""Running a streaming query whose micro-batches are written by ``foreachBatch``, until it is told to stop.

A stop signal (SIGTERM, SIGINT) lets the running micro-batch finish; a batch Spark starts after
the signal is refused before it writes anything (Spark commits nothing for it, the next start
redoes it), so a stop never cuts a batch in half.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from pyspark.errors import StreamingQueryException
from pyspark.sql import DataFrame
from pyspark.sql.streaming import StreamingQuery

from jobs.runtime.errors import QueryFailedError
from jobs.runtime.settings import StreamConfig

LOG = logging.getLogger("lambda_learner.streaming")

BatchFunction = Callable[[DataFrame, int], object]


class StopRequestedError(Exception):
    """A micro-batch refused because the job is stopping: Spark commits nothing, the next start redoes it."""


class StoppableBatches:
    """A ``foreachBatch`` function that can be told to refuse the batches that start after a stop request."""

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


def start(source: DataFrame, batches: StoppableBatches, stream: StreamConfig, name: str) -> StreamingQuery:
    """Start the query: one checkpoint, the configured trigger, ``batches`` per micro-batch."""
    writer = source.writeStream.foreachBatch(batches).option("checkpointLocation", stream.checkpoint)
    if stream.trigger == "available_now":
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=stream.processing_time)
    return writer.queryName(name).start()


def run_until_stopped(query: StreamingQuery, batches: StoppableBatches) -> None:
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
            if batches.stop_requested():
                query.stop()
    failure = query.exception()
    if failure is not None and not (stopping and StopRequestedError.__name__ in str(failure)):
        raise QueryFailedError(f"the query {query.name} failed: {failure}")
