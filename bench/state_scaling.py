"""One nearline micro-batch against live states of growing size, on both Delta engines: seconds per step.

A micro-batch of 10k events over 2k entities (one random-effect type, 20 features) is applied
to a live state of 20k, 200k and 2M entities, on delta-rs and on Spark's Delta with and without
deletion vectors (``storage.deletion_vectors``), all in one run. Each state is written directly
with the store: synthetic ``re_state`` rows (an intercept and a few name-term coefficients with
variances) whose entity ids are the generator's, so the batch's entities are among them, in a
scrambled order, so that every file of the state holds some of them (``--rows-per-file`` rows a
file). The state is recorded as written by batch 0 of the nearline job; batches 1, 2, ... are then
timed one after the other (distinct events over the same entities) through
``NearlineUpdater.process``. After them, the state read alone (the one scan of ``re_state`` a batch
makes) is timed on the same tables.

The figure of a state size is the least end-to-end time of its batches (the machine is shared:
the least disturbed run); ratios are against the smallest state on the same engine.

    python bench/state_scaling.py [--sizes 20000,200000,2000000] [--engines delta-rs,spark-delta,spark-delta-dv]
    python bench/state_scaling.py --quick     # tiny sizes, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from common import (
    ENGINES,
    Stopwatch,
    StoreProfile,
    emit,
    engine_settings,
    last_commit,
    python_peak_rss_mb,
    step_seconds,
    table_detail,
)
from pyspark.sql import functions as F

from jobs.nearline_update import LAST_WRITE, LEDGER, NearlineUpdater, batch_state
from jobs.runtime.session import spark_session
from jobs.simulate.spec import RandomEffectSpec, StreamSpec
from jobs.simulate.writers import generate
from jobs.storage.schemas import COEFFICIENTS, QUARANTINE, RE_STATE, create_tables
from jobs.storage.store import open_store
from jobs.streaming.sequence import DIRECT, BatchTicket

# Entity number of state row i: (i * SCRAMBLE) mod size, a permutation (SCRAMBLE is a prime dividing no size
# of the form 2^a 5^b) that spreads consecutive entities, the batch's among them, over every file.
SCRAMBLE = 1_000_003


def state_rows(spark, low: int, high: int, size: int, coefficients: int, width: int):
    """re_state rows ``low`` to ``high`` of a state of ``size`` entities: intercept + ``coefficients`` features."""
    number = (F.col("id") * F.lit(SCRAMBLE)) % F.lit(size)

    def coefficient(index: int, name: str, term: str):
        return F.struct(
            F.lit(name).alias("name"),
            F.lit(term).alias("term"),
            (F.randn(2 * index + low) * 0.5).alias("mean"),
            (F.lit(0.02) + F.rand(2 * index + 1 + low) * 0.5).alias("variance"),
        )

    records = [coefficient(0, "intercept", "intercept")]
    records += [coefficient(j + 1, "m", str(j)) for j in range(coefficients)]
    return spark.range(low, high, numPartitions=1).select(
        F.lit("per_member").alias("re_type"),
        F.format_string(f"member-%0{width}d", number).alias("entity_id"),
        F.lit(None).cast("long").alias("generation"),
        F.array(*records).cast(COEFFICIENTS).alias("coefficients"),
        F.lit(0).cast("long").alias("last_batch_id"),
        (F.lit(1) + (F.col("id") % 7)).cast("long").alias("updates"),
        (F.lit(5) + (F.col("id") % 50)).cast("long").alias("rows"),
        F.current_timestamp().alias("updated_at"),
    )


def build_state(spark, config, size: int, rows_per_file: int, coefficients: int, width: int) -> dict:
    """The tables, with a live state of ``size`` entities recorded as batch 0's write (one file per chunk)."""
    store = open_store(spark, config.storage)
    create_tables(store, config.model, deletion_vectors=config.storage.deletion_vectors)
    app_id = config.nearline.app_id
    ticket = BatchTicket(DIRECT, 0, 0, datetime.now(UTC))
    with Stopwatch() as watch:
        # Batch 0 as the nearline job records it: the ledger's guarded commit first, the state's last.
        store.append(LEDGER, spark.createDataFrame([], QUARANTINE), guard=ticket.guard(app_id))
        lows = list(range(0, size, rows_per_file))
        for low in lows:
            frame = state_rows(spark, low, min(low + rows_per_file, size), size, coefficients, width)
            guard = ticket.guard(app_id, generation=None) if low == lows[-1] else None
            store.append(LAST_WRITE, frame.select(*RE_STATE.fieldNames()), guard=guard)
    return {"build_seconds": watch.seconds, **table_detail(spark, store.location(LAST_WRITE))}


def raw_batch(spark, path: Path):
    return spark.read.text(str(path))


def run_size(spark, engine: str, folder: Path, size: int, batches: list[Path], args, width: int) -> dict:
    """Build a state of ``size`` entities, then time each batch through the nearline updater."""
    # The job refuses a delta-rs state past its ceiling (storage.delta_rs_max_state_entities): this bench measures it.
    unlimited = ("storage.delta_rs_max_state_entities=1000000000",) if engine == "delta-rs" else ()
    config = engine_settings(folder / "tables", engine, *unlimited)
    report = {"state": build_state(spark, config, size, args.rows_per_file, args.coefficients, width), "batches": []}
    store = open_store(spark, config.storage)
    updater = NearlineUpdater(config)
    for stream_batch_id, path in enumerate(batches, start=1):
        with StoreProfile() as profile, Stopwatch() as watch:
            values = updater.process(raw_batch(spark, path), stream_batch_id)
        merge = last_commit(spark, store.location(LAST_WRITE), "delta-rs" if engine == "delta-rs" else "spark")
        steps = step_seconds(values)
        # The metrics row is written inside the write step, so it cannot hold that step's time: the rest is it
        # (the metrics append and the state merge) plus the batch's bookkeeping (ticket, guards, generation).
        steps["write_and_bookkeeping"] = watch.seconds - sum(steps.values())
        report["batches"].append(
            {
                "end_to_end_seconds": watch.seconds,
                "step_seconds": steps,
                "store_seconds": profile.summary(),
                "entities_updated": values.get("entities_updated.per_member"),
                "new_entities": values.get("new_entities.per_member"),
                "merge": merge,
            }
        )
    # The state read alone, on the last batch's events: the one scan of re_state a batch makes.
    events = store.read("events", where=f"batch_id = {len(batches)}")
    with Stopwatch() as watch:
        read = batch_state(store, config, events).count()
    report["state_read"] = {"seconds": watch.seconds, "entities": read}
    report["state_after"] = table_detail(spark, store.location(LAST_WRITE))
    best = min(report["batches"], key=lambda batch: batch["end_to_end_seconds"])
    report["seconds"] = best["end_to_end_seconds"]
    report["best_step_seconds"] = best["step_seconds"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,200000,2000000", help="live-state entities, comma-separated")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--events", type=int, default=10_000, help="events per micro-batch")
    parser.add_argument("--entities", type=int, default=2_000, help="entities the batches touch")
    parser.add_argument("--batches", type=int, default=2, help="timed micro-batches per state (the least counts)")
    parser.add_argument("--rows-per-file", type=int, default=100_000, help="rows per file of the built state")
    parser.add_argument("--coefficients", type=int, default=5, help="name-term coefficients per entity (+ intercept)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.events, args.entities, args.batches, args.rows_per_file = "200,400", 200, 50, 1, 100
    sizes = sorted(int(size) for size in args.sizes.split(","))
    engines = args.engines.split(",")
    if sizes[0] < args.entities:
        parser.error("every state must hold the batches' entities: --sizes must be >= --entities")
    work = Path(tempfile.mkdtemp(prefix="bench-state-"))
    report: dict = {
        "events_per_batch": args.events,
        "entities_per_batch": args.entities,
        "features": 20,
        "coefficients_per_entity": args.coefficients + 1,
        "rows_per_file": args.rows_per_file,
        "batches_per_state": args.batches,
    }
    try:
        spec = StreamSpec(
            random_effects=(RandomEffectSpec("per_member", "member_id", "member", args.entities, features=20),),
            events=args.events * (args.batches + 1),
            slices=args.batches + 1,
            global_features=20,
            drift=0.05,
            new_entity_rate=0.0,  # every batch's entities are among the state's
            seed=13,
        )
        files = sorted(generate(spec, work / "stream").landing.glob("part-*"))
        warm, batches = files[0], files[1:]
        # The generator's id width (jobs.simulate.population): the state's ids must be the batches' ids.
        width = max(6, len(str(args.entities + spec.events)))
        config = engine_settings(work / "none", engines[0])
        spark = spark_session(config.spark)
        for engine in engines:
            if not args.quick:
                # One untimed batch on the smallest state warms the engine's code paths and the Python workers.
                run_size(spark, engine, work / f"warm-{engine}", sizes[0], [warm], args, width)
            report[engine] = {}
            for size in sizes:
                folder = work / f"{engine}-{size}"
                report[engine][str(size)] = run_size(spark, engine, folder, size, batches, args, width)
                report[engine][str(size)]["python_peak_rss_mb"] = python_peak_rss_mb()
                emit(f"{engine}/{size}", report[engine][str(size)], sys.stderr)
                shutil.rmtree(folder, ignore_errors=True)
            smallest = report[engine][str(sizes[0])]
            report[engine]["ratio_to_smallest"] = {
                str(size): {
                    "end_to_end": report[engine][str(size)]["seconds"] / smallest["seconds"],
                    **{
                        step: value / smallest["best_step_seconds"][step]
                        for step, value in report[engine][str(size)]["best_step_seconds"].items()
                        if smallest["best_step_seconds"].get(step)
                    },
                    "state_read": report[engine][str(size)]["state_read"]["seconds"]
                    / smallest["state_read"]["seconds"],
                }
                for size in sizes[1:]
            }
            emit(f"{engine}/ratio_to_smallest", report[engine]["ratio_to_smallest"], sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
