"""What the Spark benchmarks share: settings, the two Delta engines as variants, commit metrics, memory peaks."""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from pathlib import Path

from jobs.runtime.config import load_config
from jobs.runtime.settings import Config

ROOT = Path(__file__).resolve().parents[1]

# The engines (and Spark Delta's two layouts of the live state) benches compare, as config overrides.
ENGINES: dict[str, tuple[str, ...]] = {
    "delta-rs": ("storage.backend=delta-rs",),
    "spark-delta": ("storage.backend=spark-delta", "storage.deletion_vectors=false"),
    "spark-delta-dv": ("storage.backend=spark-delta", "storage.deletion_vectors=true"),
}


def settings(tables: Path, *extra: str) -> Config:
    """conf/local.yaml with one random-effect type (per_member), tables under ``tables``, 8 shuffle partitions."""
    return load_config(
        ROOT / "conf" / "local.yaml",
        [
            f"storage.root={tables}",
            "model.random_effects=[{name: per_member, entity_column: member_id, feature_bag: member}]",
            "spark.shuffle_partitions=8",
            *extra,
        ],
    )


def engine_settings(tables: Path, engine: str, *extra: str) -> Config:
    """:func:`settings` on one of :data:`ENGINES`."""
    return settings(tables, *ENGINES[engine], *extra)


def step_seconds(values: dict[str, float]) -> dict[str, float]:
    """The ``seconds.<step>`` figures of a metrics row, by step."""
    return {key.split(".", 1)[1]: value for key, value in values.items() if key.startswith("seconds.")}


# A MERGE's operation metrics by the name each engine records them under: (Spark's Delta, delta-rs).
MERGE_METRICS = {
    "files_removed": ("numTargetFilesRemoved", "num_target_files_removed"),
    "files_added": ("numTargetFilesAdded", "num_target_files_added"),
    "deletion_vectors_added": ("numTargetDeletionVectorsAdded", None),
    "rows_copied": ("numTargetRowsCopied", "num_target_rows_copied"),
    "rows_updated": ("numTargetRowsUpdated", "num_target_rows_updated"),
    "bytes_removed": ("numTargetBytesRemoved", None),
    "bytes_added": ("numTargetBytesAdded", None),
    "execution_ms": ("executionTimeMs", "execution_time_ms"),
    "scan_ms": ("scanTimeMs", "scan_time_ms"),
    "rewrite_ms": ("rewriteTimeMs", "rewrite_time_ms"),
}


def last_commit(spark, location: str, engine: str) -> dict:
    """A table's latest commit: its operation and, for a MERGE, what it rewrote (``MERGE_METRICS``)."""
    if engine == "delta-rs":
        from deltalake import DeltaTable

        entry = DeltaTable(location).history(1)[0]
        operation, metrics, position = entry.get("operation"), entry.get("operationMetrics") or {}, 1
    else:
        row = spark.sql(f"DESCRIBE HISTORY delta.`{location}` LIMIT 1").first()
        operation, metrics, position = row["operation"], row["operationMetrics"] or {}, 0
    figures = {"operation": operation}
    for label, names in MERGE_METRICS.items():
        if names[position] is not None and names[position] in metrics:
            figures[label] = _number(metrics[names[position]])
    return figures


def table_detail(spark, location: str) -> dict:
    """Files and bytes of a table's current snapshot (any engine's table: Spark's Delta reads both)."""
    row = spark.sql(f"DESCRIBE DETAIL delta.`{location}`").first()
    return {"files": row["numFiles"], "bytes": row["sizeInBytes"]}


def _number(value: str):
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def python_peak_rss_mb() -> float:
    """This process's peak resident set since it started (getrusage), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def jvm_pid() -> int | None:
    """The Spark driver's JVM: the java process whose parent is this process."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its closing parenthesis.
        command = stat[stat.index("(") + 1 : stat.rindex(")")]
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        if parent == me and command == "java":
            return int(entry.name)
    return None


def jvm_peak_rss_mb(pid: int | None) -> float | None:
    """A process's peak resident set (VmHWM in /proc/<pid>/status), in MiB."""
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


class Stopwatch:
    """Wall seconds of a block: ``with Stopwatch() as watch: ...; watch.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *_) -> None:
        self.seconds = time.perf_counter() - self.started


def emit(label: str, figures: dict, stream) -> None:
    """One intermediate figure as a JSON line (on stderr: stdout holds the final report only)."""
    print(json.dumps({label: figures}, default=str), file=stream, flush=True)


class StoreProfile:
    """Seconds spent in the table store's methods while active, by method (outermost calls only).

    The stores' methods are wrapped for the duration of the ``with`` block; a method called by
    another store method (``merge`` -> ``applied`` -> ``transaction_version``) counts in its caller.
    Calls from every thread count (a lease's renewals too). Lazy reads cost little here: their
    scans run where the frame is used.
    """

    METHODS = (
        "exists",
        "schema",
        "partition_columns",
        "create",
        "read",
        "append",
        "overwrite",
        "merge",
        "delete",
        "version",
        "history",
        "last_guarded_commit",
        "transaction_version",
        "applied",
    )

    def __enter__(self) -> StoreProfile:
        from jobs.storage.delta_rs import DeltaRsStore
        from jobs.storage.spark_delta import SparkDeltaStore
        from jobs.storage.store import TableStore

        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._local = threading.local()
        self._saved = []
        for cls in (TableStore, DeltaRsStore, SparkDeltaStore):
            for name in self.METHODS:
                if name in cls.__dict__:
                    self._saved.append((cls, name, cls.__dict__[name]))
                    setattr(cls, name, self._wrapped(name, cls.__dict__[name]))
        return self

    def __exit__(self, *_) -> None:
        for cls, name, method in reversed(self._saved):
            setattr(cls, name, method)

    def _wrapped(self, name: str, method):
        profile = self

        def timed(*args, **kwargs):
            local = profile._local
            local.depth = getattr(local, "depth", 0) + 1
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                local.depth -= 1
                if local.depth == 0:
                    profile.seconds[name] = profile.seconds.get(name, 0.0) + time.perf_counter() - started
                    profile.calls[name] = profile.calls.get(name, 0) + 1

        return timed

    def summary(self) -> dict:
        """Seconds and calls by method, the costliest first."""
        order = sorted(self.seconds, key=self.seconds.get, reverse=True)
        return {name: {"seconds": round(self.seconds[name], 3), "calls": self.calls[name]} for name in order}


class JvmCalls:
    """Commands this process sent to the JVM through py4j while active (every thread), and their seconds.

    Each is a round trip: building a plan column by column, reading a setting, starting a job. The count
    does not depend on the machine's speed, so it compares variants where seconds are noisy.
    """

    def __enter__(self) -> JvmCalls:
        from py4j.clientserver import ClientServerConnection

        self.calls, self.seconds = 0, 0.0
        self._lock = threading.Lock()
        self._original = ClientServerConnection.send_command
        original, counter = self._original, self

        def counted(connection, command, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(connection, command, *args, **kwargs)
            finally:
                with counter._lock:
                    counter.calls += 1
                    counter.seconds += time.perf_counter() - started

        ClientServerConnection.send_command = counted
        return self

    def __exit__(self, *_) -> None:
        from py4j.clientserver import ClientServerConnection

        ClientServerConnection.send_command = self._original
