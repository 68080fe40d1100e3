"""delta-rs against Spark's Delta, side by side in one run: a 100k-event nearline batch and the nightly on 250k events.

The nearline part is bench/nearline.py's batch on each engine: a stream of two micro-batches
of 100k events over 20k entities (one random-effect type, 20 features); the first builds each
engine's state, the second is timed on a fresh copy of those tables, ``--repeats`` times per
engine, the engines interleaved (the median counts), with the seconds spent in the table store
by method. The nightly part is bench/nightly.py's job on 250k events, each engine's run in a
fresh process of its own (wall time, the driver's peak memory).

    python bench/engines.py [--events 100000 --entities 20000 --nightly-events 250000 --repeats 3]
    python bench/engines.py --quick     # tiny sizes, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import nightly
from common import ENGINES, Stopwatch, StoreProfile, emit, engine_settings, last_commit, step_seconds

from jobs.nearline_update import LAST_WRITE, NearlineUpdater
from jobs.runtime.session import spark_session
from jobs.simulate.spec import RandomEffectSpec, StreamSpec
from jobs.simulate.writers import generate
from jobs.storage.store import open_store


def nearline(work: Path, engines: list[str], events: int, entities: int, repeats: int) -> dict:
    spec = StreamSpec(
        random_effects=(RandomEffectSpec("per_member", "member_id", "member", entities, features=20),),
        events=2 * events,
        slices=2,
        global_features=20,
        drift=0.05,
        new_entity_rate=0.01,
        seed=13,
    )
    first, second = sorted(generate(spec, work / "stream").landing.glob("part-*"))
    spark = spark_session(engine_settings(work / "none", engines[0]).spark)
    report: dict = {"events": events, "entities": entities, "features": 20}
    for engine in engines:
        NearlineUpdater(engine_settings(work / engine, engine)).process(spark.read.text(str(first)), 0)
    runs: dict[str, list[dict]] = {engine: [] for engine in engines}
    for attempt in range(repeats):
        for engine in engines:
            tables = work / f"{engine}-{attempt}"
            shutil.copytree(work / engine, tables)
            config = engine_settings(tables, engine)
            updater = NearlineUpdater(config)
            with StoreProfile() as profile, Stopwatch() as watch:
                values = updater.process(spark.read.text(str(second)), 1)
            steps = step_seconds(values)
            # The metrics row is written inside the write step: what is left of the batch's time is that step
            # (metrics append, state merge) and the batch's bookkeeping (ticket, guards, generation, retention).
            steps["write_and_bookkeeping"] = watch.seconds - sum(steps.values())
            location = open_store(spark, config.storage).location(LAST_WRITE)
            run = {
                "end_to_end_seconds": watch.seconds,
                "step_seconds": steps,
                "store_seconds": profile.summary(),
                "merge": last_commit(spark, location, "delta-rs" if engine == "delta-rs" else "spark"),
                "entities_updated": values.get("entities_updated.per_member"),
            }
            runs[engine].append(run)
            emit(f"nearline/{engine}/{attempt}", run, sys.stderr)
            shutil.rmtree(tables, ignore_errors=True)
    for engine, measured in runs.items():
        median = sorted(measured, key=lambda run: run["end_to_end_seconds"])[len(measured) // 2]
        report[engine] = {**median, "end_to_end_seconds_all_runs": [run["end_to_end_seconds"] for run in measured]}
    if "delta-rs" in runs:
        base = report["delta-rs"]
        report["ratio_over_delta_rs"] = {
            engine: {
                "end_to_end": statistics.median(r["end_to_end_seconds"] for r in runs[engine])
                / statistics.median(r["end_to_end_seconds"] for r in runs["delta-rs"]),
                **{
                    step: report[engine]["step_seconds"][step] / value
                    for step, value in base["step_seconds"].items()
                    if value and step in report[engine]["step_seconds"]
                },
            }
            for engine in engines
            if engine != "delta-rs"
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events per nearline micro-batch")
    parser.add_argument("--entities", type=int, default=20_000)
    parser.add_argument("--nightly-events", type=int, default=250_000)
    parser.add_argument("--repeats", type=int, default=3, help="timed nearline batches per engine (the median counts)")
    parser.add_argument("--engines", default="delta-rs,spark-delta", help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.events, args.entities, args.nightly_events, args.repeats = 1000, 200, 4000, 1
    engines = args.engines.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    report: dict = {}
    try:
        report["nearline"] = nearline(work / "nearline", engines, args.events, args.entities, args.repeats)
        emit("nearline", report["nearline"].get("ratio_over_delta_rs"), sys.stderr)
        # The nightly job in processes of their own (bench/nightly.py's): each engine's memory is its own.
        folder = work / "nightly"
        shared = ["--folder", str(folder), "--entities-per-event", "0.1"]
        spark_engines = sorted({"spark-delta" if engine.startswith("spark-delta") else engine for engine in engines})
        prepared = nightly.child(
            "--child", "prepare", *shared, "--events", str(args.nightly_events), "--engine", ",".join(spark_engines)
        )
        report["nightly"] = {"events": args.nightly_events, "prepare": prepared}
        for engine in spark_engines:
            report["nightly"][engine] = nightly.child("--child", "run", *shared, "--engine", engine)
            emit(f"nightly/{engine}", report["nightly"][engine], sys.stderr)
        if {"delta-rs", "spark-delta"} <= set(spark_engines):
            report["nightly"]["ratio_spark_delta_over_delta_rs"] = (
                report["nightly"]["spark-delta"]["wall_seconds"] / report["nightly"]["delta-rs"]["wall_seconds"]
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
