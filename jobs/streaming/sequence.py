"""One sequence of micro-batch numbers for every stream that ever wrote a set of tables.

Spark numbers a query's micro-batches from 0 in each checkpoint: a new checkpoint (a backfill,
a lost checkpoint, a change of source) starts again at 0. The tables number batches with one
sequence across every checkpoint, and every guarded write of a batch records which stream (the
query id Spark keeps in its checkpoint) and which of its batches it was. A batch Spark replays
after a crash gets the number it had; a new batch, the next number.

The first write of every batch (its ``ledger`` table) is where the numbers are looked up, and it
claims the batch's number (:meth:`BatchTicket.claim`): a second stream on the same tables that took
the same number is refused there, at commit, with ``ConcurrentWriterError`` (``jobs.storage.store``),
before it writes anything of its batch. Its last write (its ``last`` table) tells whether a batch
was finished. A new stream refuses to start while another stream's batch is half written: that
batch is its own stream's to finish (its checkpoint holds its data). If that checkpoint is lost,
the operator names the batch (the job's ``lost_batch`` setting) and the new stream's first ticket
carries it as ``unfinished``: the job finishes it from what the tables hold before its own batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from jobs.runtime.errors import ConfigError, HalfWrittenBatchError
from jobs.storage.store import Guard, GuardedCommit, TableStore

LOG = logging.getLogger("lambda_learner.streaming")
# The stream id of batches fed to a job directly (tests, replays), without a streaming query.
DIRECT = "direct"


@dataclass(frozen=True)
class BatchTicket:
    """A micro-batch's place in the tables' sequence, and the time it was first ingested."""

    stream_id: str
    stream_batch_id: int
    sequence: int
    ingested: datetime
    # A half-written batch of a stream whose checkpoint is lost, which this batch's job finishes first.
    unfinished: BatchTicket | None = None
    # A number just handed out (not a batch begun before a restart or a retry): see ``Guard.fresh``.
    fresh: bool = False

    def guard(self, app_id: str, **facts: object) -> Guard:
        """The guard of one of this batch's writes: the sequence number as version, the batch's identity as facts."""
        identity = {"stream": self.stream_id, "stream_batch": self.stream_batch_id, "ingested": self.ingested_ms}
        return Guard(app_id, self.sequence, {**identity, **facts}, fresh=self.fresh)

    def claim(self, app_id: str, **facts: object) -> Guard:
        """The guard of the batch's first write, to its ledger table: it takes the number, checked at commit against
        a second stream that took the same one."""
        return dataclasses.replace(self.guard(app_id, **facts), claim=True)

    @property
    def ingested_ms(self) -> int:
        return int(self.ingested.timestamp() * 1000)

    @classmethod
    def of(cls, commit: GuardedCommit) -> BatchTicket:
        """The ticket a guarded commit recorded (one written without a stream's facts: a program's ``direct`` one)."""
        facts, number = commit.guard.facts, commit.guard.version
        ingested = datetime.fromtimestamp(facts["ingested"] / 1000, tz=UTC) if "ingested" in facts else _now()
        return cls(facts.get("stream", DIRECT), int(facts.get("stream_batch", number)), number, ingested)


class BatchSequence:
    """Hands out each micro-batch's ticket; remembers the last one it gave, so a lookup happens once per process.

    ``setting`` is the config key of ``app_id``, named when tables written under another app id are refused.
    ``lost_batch`` (its config key ``lost_setting``; None where a job cannot finish a batch from its tables)
    is the half-written batch of a lost checkpoint the operator lets this stream finish.
    """

    def __init__(
        self,
        app_id: str,
        setting: str,
        ledger: str,
        last: str,
        checkpoint: str,
        stream_id: str | None = None,
        *,
        lost_setting: str | None = None,
        lost_batch: int | None = None,
    ):
        self.app_id, self.setting, self.ledger, self.last = app_id, setting, ledger, last
        self.checkpoint = checkpoint
        self.stream_id = stream_id
        self.lost_setting, self.lost_batch = lost_setting, lost_batch
        self._previous: BatchTicket | None = None

    def ticket(self, store: TableStore, stream_batch_id: int) -> BatchTicket:
        previous = self._previous
        if previous is not None and stream_batch_id == previous.stream_batch_id + 1:
            ticket = BatchTicket(previous.stream_id, stream_batch_id, previous.sequence + 1, _now(), fresh=True)
        elif previous is not None and stream_batch_id == previous.stream_batch_id:
            ticket = dataclasses.replace(previous, fresh=False)  # a retry: its writes may be half done
        else:
            ticket = self._look_up(store, stream_batch_id)
        self._previous = ticket
        return ticket

    def _look_up(self, store: TableStore, stream_batch_id: int) -> BatchTicket:
        stream_id = self.stream_id or self._checkpoint_stream_id(store)
        latest = store.last_guarded_commit(self.ledger, self.app_id)
        if latest is None:
            self._refuse_another_app_id(store)
            return BatchTicket(stream_id, stream_batch_id, 0, _now(), fresh=True)
        recorded = BatchTicket.of(latest)
        if (recorded.stream_id, recorded.stream_batch_id) == (stream_id, stream_batch_id):
            LOG.info(
                "batch %d of stream %s is batch %d, begun before a restart",
                stream_batch_id,
                stream_id,
                recorded.sequence,
            )
            return recorded
        finished = store.transaction_version(self.last, self.app_id)
        if recorded.stream_id != stream_id and (finished is None or finished < recorded.sequence):
            if self.lost_setting is not None and self.lost_batch == recorded.sequence:
                LOG.warning(
                    "batch %d (batch %d of stream %s, whose checkpoint is lost) is finished by stream %s from the "
                    "tables (%s)",
                    recorded.sequence,
                    recorded.stream_batch_id,
                    recorded.stream_id,
                    stream_id,
                    self.lost_setting,
                )
                return BatchTicket(
                    stream_id, stream_batch_id, recorded.sequence + 1, _now(), unfinished=recorded, fresh=True
                )
            way_out = (
                f"; if that checkpoint is lost, start this one with --set {self.lost_setting}={recorded.sequence}: "
                "it finishes that batch from what the tables hold of it"
                if self.lost_setting is not None
                else ""
            )
            raise HalfWrittenBatchError(
                f"batch {recorded.sequence} (batch {recorded.stream_batch_id} of stream {recorded.stream_id}) was "
                f"begun but not finished, and this is stream {stream_id}: start the job again with the checkpoint "
                f"of stream {recorded.stream_id} so that it finishes that batch, then start this one{way_out} "
                "(docs/operations.md)"
            )
        if recorded.stream_id != stream_id:
            own = next(
                (BatchTicket.of(c) for c in store.guarded_commits(self.ledger, self.app_id) if _stream(c) == stream_id),
                None,
            )
            if own is not None and own.stream_batch_id == stream_batch_id:
                return own  # finished before a restart; another stream wrote since
            LOG.info("stream %s continues the tables' sequence after stream %s", stream_id, recorded.stream_id)
        return BatchTicket(stream_id, stream_batch_id, recorded.sequence + 1, _now(), fresh=True)

    def _refuse_another_app_id(self, store: TableStore) -> None:
        """A sequence begun under another app id is not begun again: its numbers would collide with the old ones."""
        other = next((c for c in store.guarded_commits(self.last, None) if _stream(c) is not None), None)
        if other is not None:
            raise ConfigError(
                f"config key '{self.setting}' is {self.app_id!r}, but the batches in table {self.last!r} were "
                f"written under app id {other.guard.app_id!r} (batch {other.guard.version}): set it back, or "
                "write to new tables (storage.root) to start a new sequence (docs/operations.md)"
            )

    def _checkpoint_stream_id(self, store: TableStore) -> str:
        """The query id Spark keeps in the checkpoint's ``metadata`` file, read through Spark (any file system).

        Spark writes that file when the query starts, before its first batch.
        """
        line = store.spark.read.text(f"{self.checkpoint.rstrip('/')}/metadata").first()
        return str(json.loads(line.value)["id"])


def _stream(commit: GuardedCommit) -> str | None:
    return commit.guard.facts.get("stream")


def _now() -> datetime:
    return datetime.now(UTC)
