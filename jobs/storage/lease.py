"""A lease on a set of tables: one run of a job at a time, without a lock service.

The holder writes a row (job name, holder, expiry) to the ``leases`` table and renews its expiry
from a background thread while it runs. Another run finds the row unexpired and waits for it to
expire or be released, a bounded time (``wait_minutes``), saying so in the log, then refuses with
one clear message. A run killed with ``kill -9`` stops renewing: a scheduler's retry started at
once waits for its lease to expire (at most ``minutes``) and runs.

Every write of the row is a compare-and-set: taken only from the holder that was read (or if there
was no row), renewed and released only by its holder. Two runs racing for an expired lease: the
second's write finds the row changed and leaves it (or Delta fails one of two concurrent commits),
and each reads the row back to see who holds it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType

from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType, TimestampType

from jobs.runtime.errors import ConcurrentRunError
from jobs.runtime.faults import crash_point
from jobs.storage.store import TableStore, utc_from_millis

LOG = logging.getLogger("lambda_learner.lease")
LEASES = StructType(
    [
        StructField("job", StringType(), False),
        StructField("holder", StringType(), False),
        StructField("host", StringType()),
        StructField("acquired_at", TimestampType()),
        StructField("expires_at", TimestampType()),
    ]
)
TABLE = "leases"


@dataclass(frozen=True)
class Holder:
    """The lease's row as read: who holds it, since and until when (UTC)."""

    holder: str
    host: str | None
    acquired_at: datetime
    expires_at: datetime


class TableLease:
    """Held from ``__enter__`` to ``__exit__`` by one run of ``job``; renewed every third of ``minutes``.

    ``wait_minutes`` (default ``minutes``: enough for a killed run's lease to expire) is how long a run
    waits for another's lease before it refuses.
    """

    def __init__(self, store: TableStore, job: str, minutes: float, wait_minutes: float | None = None):
        self.store, self.job = store, job
        self.duration = timedelta(minutes=minutes)
        self.wait = timedelta(minutes=minutes if wait_minutes is None else wait_minutes)
        self.holder = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewal: threading.Thread | None = None
        self._acquired_at: datetime | None = None

    def __enter__(self) -> TableLease:
        self.store.create(TABLE, LEASES)
        current = self._free_or_refused()
        crash_point(f"lease:{self.job}:before_take")
        now = datetime.now(UTC)
        self._acquired_at = now
        # Taken from the holder read (a row that appeared since is another run's): checked at commit.
        taken_from = "FALSE" if current is None else f"t.holder = '{current.holder}'"
        try:
            self._write(now, taken_from)
        except Exception as error:  # a concurrent commit won the race
            raise ConcurrentRunError(f"another {self.job} run took the lease at the same time: {error}") from None
        if not self.held():
            raise ConcurrentRunError(f"another {self.job} run took the lease at the same time")
        self._renewal = threading.Thread(target=self._renew, name=f"{self.job}-lease", daemon=True)
        self._renewal.start()
        crash_point(f"lease:{self.job}:taken")
        LOG.info("%s lease taken by %s until %s", self.job, self.holder, (now + self.duration).isoformat())
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._renewal is not None:
            self._renewal.join()
        self._write(datetime.now(UTC) - self.duration, self._own)  # released: expired at once

    def held(self) -> bool:
        current = self._current()
        return current is not None and current.holder == self.holder

    def check(self) -> None:
        """Refuse to go on if the lease is no longer this run's (it expired unrenewed and another run took it)."""
        current = self._current()
        if current is None or current.holder != self.holder:
            taken = "nobody" if current is None else f"holder {current.holder} on {current.host}"
            raise ConcurrentRunError(
                f"this {self.job} run ({self.holder}) lost its lease on these tables, now held by {taken}: it "
                "stops before writing (its renewals failed for longer than the lease lasts)"
            )

    @property
    def _own(self) -> str:
        return f"t.holder = '{self.holder}'"

    def _free_or_refused(self) -> Holder | None:
        """The lease's row once it is free (expired, released or this run's), waiting at most ``wait``."""
        deadline = datetime.now(UTC) + self.wait
        while True:
            current, now = self._current(), datetime.now(UTC)
            if current is None or current.holder == self.holder or current.expires_at <= now:
                return current
            since, until = current.acquired_at.isoformat(), current.expires_at.isoformat()
            held = f"another {self.job} run (holder {current.holder} on {current.host}, since {since})"
            if now >= deadline:
                raise ConcurrentRunError(
                    f"{held} holds these tables until {until}; waited {self.wait.total_seconds():g} s: wait for it "
                    "to finish, or, if it was killed, until its lease expires"
                )
            LOG.warning("%s holds these tables until %s: waiting (until %s at most)", held, until, deadline.isoformat())
            time.sleep(max(0.5, min((current.expires_at - now).total_seconds(), (deadline - now).total_seconds())))

    def _renew(self) -> None:
        while not self._stop.wait(self.duration.total_seconds() / 3):
            try:
                self._write(datetime.now(UTC), self._own)  # renewed only if still this run's
            except Exception:  # a failed renewal is retried at the next tick; the run goes on meanwhile
                LOG.exception("renewing the %s lease failed", self.job)

    def _current(self) -> Holder | None:
        # Epoch milliseconds: PySpark hands timestamps back naive, in the driver's OS time zone.
        rows = (
            self.store.read(TABLE)
            .where(F.col("job") == self.job)
            .select("holder", "host", F.unix_millis("acquired_at"), F.unix_millis("expires_at"))
            .collect()
        )
        if not rows:
            return None
        holder, host, acquired, expires = rows[0]
        return Holder(holder, host, utc_from_millis(acquired), utc_from_millis(expires))

    def _write(self, now: datetime, matched_if: str) -> None:
        row = (self.job, self.holder, socket.gethostname(), self._acquired_at, now + self.duration)
        self.store.merge(TABLE, self.store.spark.createDataFrame([row], LEASES), ["job"], matched_if=matched_if)
