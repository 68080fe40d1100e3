"""What one guarded commit costs on each Delta engine: the floor under a micro-batch's four writes.

A nearline micro-batch commits four times (quarantine, events, metrics, the state's merge), each a
guarded write that first reads the table's guards. This bench times those store calls alone, with no
job around them, on tables of the micro-batch bench's sizes: a guarded append of ``--rows`` rows, the
guard's check (``applied``), a table's version, and a guarded merge of ``--rows`` rows into a state of
``--state`` rows. Each call is timed ``--repeats`` times (after one untimed warm-up); the median counts.

    python bench/delta_commits.py [--rows 1000 --state 20000 --repeats 7]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import ENGINES, ROOT
from pyspark.sql import DataFrame

from jobs.runtime.config import load_config
from jobs.runtime.session import spark_session
from jobs.storage.store import Guard, TableStore, open_store

SCHEMA = "entity_id string, batch_id long, value double"


def one_round(store: TableStore, appended: DataFrame, merged: DataFrame, batch: int) -> dict[str, float]:
    """Each store call of a micro-batch's writes once, timed: the guard's check, an append, a version, a merge."""
    guard, seconds = Guard("bench", batch), {}
    calls = {
        "applied": lambda: store.applied("log", guard),
        "append": lambda: store.append("log", appended, guard=guard),
        "version": lambda: store.version("log"),
        "merge": lambda: store.merge("state", merged, ["entity_id"], guard=guard),
    }
    for kind, call in calls.items():
        started = time.perf_counter()
        call()
        seconds[kind] = time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000, help="rows per append and per merge")
    parser.add_argument("--state", type=int, default=20_000, help="rows of the table merged into")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of each kind (the median counts)")
    parser.add_argument("--engines", default="delta-rs,spark-delta", help="comma-separated")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-delta-commits-"))
    report: dict = {"rows": args.rows, "state_rows": args.state, "repeats": args.repeats, "engines": {}}
    try:
        configs = {
            engine: load_config(ROOT / "conf" / "local.yaml", [f"storage.root={work / engine}", *ENGINES[engine]])
            for engine in args.engines.split(",")
        }
        spark = spark_session(next(iter(configs.values())).spark)

        def rows(count: int, batch: int, offset: int = 0):
            return spark.createDataFrame(
                [(f"e{offset + i}", batch, float(i)) for i in range(count)], SCHEMA
            ).localCheckpoint(eager=True)

        for engine, config in configs.items():
            store = open_store(spark, config.storage)
            schema = rows(1, 0).schema
            store.create("log", schema)
            store.create("state", schema)
            store.append("state", rows(args.state, 0))
            figures: dict[str, list[float]] = {"append": [], "applied": [], "version": [], "merge": []}
            for batch in range(args.repeats + 1):
                appended, merged = rows(args.rows, batch), rows(args.rows, batch, offset=batch * 7)
                seconds = one_round(store, appended, merged, batch)
                if batch:  # the first round warms the engine up
                    for kind, value in seconds.items():
                        figures[kind].append(value)
            medians = {kind: statistics.median(values) for kind, values in figures.items()}
            report["engines"][engine] = {
                "median_seconds": medians,
                # What a micro-batch's four guarded writes cost at the least: three appends and a merge.
                "four_guarded_writes_seconds": 3 * medians["append"] + medians["merge"],
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
