"""The fixed cost of a nearline micro-batch: small batches over a large live state, both engines in one run.

The default model (two random-effect types, per_member and per_item): a history of
``--history`` events over ``--entities`` members (and a tenth as many items), every one of
them in it, read as one micro-batch, builds the live state on each engine; then
``--batches`` micro-batches of ``--events`` new events each (one generated stream: no id
repeats the history's) over the same entities go through
each engine's nearline job, the engines interleaved batch
by batch. Per batch: wall time, the job's seconds per step (``seconds.*`` of its metrics row),
the seconds spent in the table store by method, the number of Spark jobs it ran (the
status tracker's job ids of the batch's job group) and the commands it sent to the JVM (py4j
round trips; with the jobs, counts that do not depend on the machine's speed). The first small batch of each engine
runs once before the timed ones (the first pandas UDF of a process starts the workers).

    python bench/micro_batch.py [--events 1000 --batches 5 --entities 20000 --history 100000]
    python bench/micro_batch.py --quick     # tiny sizes, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import ENGINES, ROOT, JvmCalls, Stopwatch, StoreProfile, emit, step_seconds

from jobs.nearline_update import LAST_WRITE, NearlineUpdater
from jobs.runtime.config import load_config
from jobs.runtime.session import spark_session
from jobs.runtime.settings import Config
from jobs.simulate.spec import RandomEffectSpec, StreamSpec
from jobs.simulate.writers import generate
from jobs.storage.store import open_store


def engine_config(tables: Path, engine: str) -> Config:
    """conf/local.yaml as a user runs it (both random-effect types), on ``engine``'s tables under ``tables``."""
    return load_config(ROOT / "conf" / "local.yaml", [f"storage.root={tables}", *ENGINES[engine]])


def stream_files(folder: Path, members: int, events: int, slices: int, start: str) -> list[Path]:
    """A stream of ``events`` over ``members`` members and a tenth as many items, ``slices`` files."""
    spec = StreamSpec(
        random_effects=(
            RandomEffectSpec("per_member", "member_id", "member", members, features=8),
            RandomEffectSpec("per_item", "item_id", "item", max(1, members // 10), features=8),
        ),
        events=events,
        slices=slices,
        global_features=10,
        drift=0.05,
        new_entity_rate=0.01,
        slice_minutes=10.0,
        start=start,
        seed=17,
    )
    return sorted(generate(spec, folder).landing.glob("part-*"))


def spark_jobs(spark, group: str) -> int:
    return len(spark.sparkContext.statusTracker().getJobIdsForGroup(group))


def run_batch(spark, updater: NearlineUpdater, files: list[Path], batch_id: int, label: str) -> dict:
    """One micro-batch of ``files`` through ``updater``: its figures, its store seconds and its Spark jobs."""
    group = f"bench-{label}-{batch_id}"
    spark.sparkContext.setJobGroup(group, group)
    with StoreProfile() as profile, JvmCalls() as jvm, Stopwatch() as watch:
        values = updater.process(spark.read.text([str(path) for path in files]), batch_id)
    spark.sparkContext.setJobGroup("bench-idle", "bench-idle")
    return {
        "end_to_end_seconds": watch.seconds,
        "step_seconds": step_seconds(values),
        "spark_jobs": spark_jobs(spark, group),
        "jvm_calls": jvm.calls,
        "jvm_call_seconds": round(jvm.seconds, 3),
        "store_seconds": profile.summary(),
        "rows_valid": values.get("rows_valid"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000, help="events per timed micro-batch")
    parser.add_argument("--batches", type=int, default=5, help="timed micro-batches per engine (the median counts)")
    parser.add_argument("--entities", type=int, default=20_000, help="members in the stream (items: a tenth)")
    parser.add_argument("--history", type=int, default=100_000, help="events of the batch that builds the state")
    parser.add_argument("--engines", default="delta-rs,spark-delta", help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.events, args.batches, args.entities, args.history = 200, 2, 500, 2000
    engines = args.engines.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-micro-batch-"))
    try:
        # One stream, so that every event id is new (a second stream of the same seed repeats the first one's ids,
        # and every small batch would be quarantined as duplicates): the history's slices, read as one batch, put
        # every member and item in the state; then the small batches, a slice each, over the same entities.
        history_slices = math.ceil(args.history / args.events)
        slices = history_slices + args.batches + 1
        files = stream_files(work / "stream", args.entities, args.events * slices, slices, "2026-11-01T00:00:00Z")
        history, small = files[:history_slices], files[history_slices:]
        configs = {engine: engine_config(work / engine, engine) for engine in engines}
        spark = spark_session(configs[engines[0]].spark)
        updaters = {engine: NearlineUpdater(config) for engine, config in configs.items()}
        report: dict = {"events_per_batch": args.events, "history_events": args.history, "engines": {}}
        for engine in engines:
            built = run_batch(spark, updaters[engine], history, 0, engine)
            state = open_store(spark, configs[engine].storage).read(LAST_WRITE).count()
            warm = run_batch(spark, updaters[engine], small[:1], 1, engine)
            report["engines"][engine] = {"state_entities": state, "history_batch": built, "warm_up_batch": warm}
            emit(f"{engine}/history", {"state_entities": state, **built}, sys.stderr)
        runs: dict[str, list[dict]] = {engine: [] for engine in engines}
        for offset, path in enumerate(small[1:], start=2):
            for engine in engines:
                run = run_batch(spark, updaters[engine], [path], offset, engine)
                runs[engine].append(run)
                emit(f"{engine}/batch {offset}", run, sys.stderr)
        for engine, measured in runs.items():
            median = sorted(measured, key=lambda run: run["end_to_end_seconds"])[len(measured) // 2]
            report["engines"][engine] |= {
                "median_end_to_end_seconds": statistics.median(run["end_to_end_seconds"] for run in measured),
                "median_batch": median,
                "end_to_end_seconds_all_batches": [round(run["end_to_end_seconds"], 3) for run in measured],
                "spark_jobs_all_batches": [run["spark_jobs"] for run in measured],
                "jvm_calls_all_batches": [run["jvm_calls"] for run in measured],
                "rows_valid_all_batches": [run["rows_valid"] for run in measured],
            }
        if {"delta-rs", "spark-delta"} <= set(engines):
            report["ratio_spark_delta_over_delta_rs"] = (
                report["engines"]["spark-delta"]["median_end_to_end_seconds"]
                / report["engines"]["delta-rs"]["median_end_to_end_seconds"]
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
