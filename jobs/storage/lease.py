"""A lease on a set of tables: one run of a job at a time, without a lock service.

The holder writes a row (job name, holder, expiry) to the ``leases`` table and renews its expiry
from a background thread while it runs. Another run finds the row unexpired and refuses to start
with one clear message; a run killed with ``kill -9`` stops renewing, and the next run may start
once the lease has expired (``nightly.lease_minutes``). Two runs racing for an expired lease both
merge their row; Delta lets one commit win, and each reads the row back to see which.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType

from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType, TimestampType

from jobs.runtime.errors import ConcurrentRunError
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
    """Held from ``__enter__`` to ``__exit__`` by one run of ``job``; renewed every third of ``minutes``."""

    def __init__(self, store: TableStore, job: str, minutes: float):
        self.store, self.job = store, job
        self.duration = timedelta(minutes=minutes)
        self.holder = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewal: threading.Thread | None = None
        self._acquired_at: datetime | None = None

    def __enter__(self) -> TableLease:
        self.store.create(TABLE, LEASES)
        now = datetime.now(UTC)
        current = self._current()
        if current is not None and current.holder != self.holder and current.expires_at > now:
            since, until = current.acquired_at.isoformat(), current.expires_at.isoformat()
            raise ConcurrentRunError(
                f"another {self.job} run (holder {current.holder} on {current.host}, since {since}) holds these "
                f"tables until {until}; wait for it to finish, or, if it was killed, until its lease expires"
            )
        self._acquired_at = now
        try:
            self._write(now)
        except Exception as error:  # a concurrent commit won the race
            raise ConcurrentRunError(f"another {self.job} run took the lease at the same time: {error}") from None
        if not self.held():
            raise ConcurrentRunError(f"another {self.job} run took the lease at the same time")
        self._renewal = threading.Thread(target=self._renew, name=f"{self.job}-lease", daemon=True)
        self._renewal.start()
        LOG.info("%s lease taken by %s until %s", self.job, self.holder, (now + self.duration).isoformat())
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._renewal is not None:
            self._renewal.join()
        if self.held():
            self._write(datetime.now(UTC) - self.duration)  # released: expired at once

    def held(self) -> bool:
        current = self._current()
        return current is not None and current.holder == self.holder

    def _renew(self) -> None:
        while not self._stop.wait(self.duration.total_seconds() / 3):
            try:
                if self.held():
                    self._write(datetime.now(UTC))
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

    def _write(self, now: datetime) -> None:
        row = (self.job, self.holder, socket.gethostname(), self._acquired_at, now + self.duration)
        self.store.merge(TABLE, self.store.spark.createDataFrame([row], LEASES), ["job"])
