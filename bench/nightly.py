"""The nightly job on local[2] at growing sizes: wall time, scaling, and the driver's peak memory, per engine.

One random-effect type (entities: 10% of the events) and a fixed effect, 20 features each, at
250k, 1M and 4M events on Spark's Delta, and on delta-rs at the sizes given (``--delta-rs-sizes``).
Each size's stream is generated once and ingested into each engine's tables (one process per
size); then every (engine, size) runs the whole job (read, coordinate descent, validation,
publication) in a fresh process of its own, so that its peak memory is its own: the Python
driver's peak resident set (``getrusage``) and the JVM's (``VmHWM`` of the driver's java child
process), each also at the job's start (after the session's start), so the job's own growth shows.
Last, on the largest Spark-Delta size, the random-effect step runs alone twice on the same sample
of entities: grouped by entity bucket and with one entity per pandas call.

    python bench/nightly.py [--sizes 250000,1000000,4000000 --delta-rs-sizes 1000000 --sample-entities 20000]
    python bench/nightly.py --quick     # tiny sizes, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import Stopwatch, StoreProfile, emit, jvm_peak_rss_mb, jvm_pid, python_peak_rss_mb

HERE = Path(__file__).resolve()


def settings(tables: Path, engine: str, *extra: str):
    return common.engine_settings(tables, engine, "nightly.holdout_hours=1", *extra)


def tables_of(folder: Path, engine: str) -> Path:
    return folder / engine / "tables"


def prepare(folder: Path, events: int, entities: int, engines: list[str]) -> dict:
    """Generate the stream as parquet, then ingest it into each engine's tables, one file per micro-batch."""
    from jobs.runtime.session import spark_session
    from jobs.simulate.spec import RandomEffectSpec, StreamSpec
    from jobs.simulate.writers import generate
    from jobs.storage.ingest import ingest_batch
    from jobs.storage.schemas import create_tables
    from jobs.storage.store import open_store

    spec = StreamSpec(
        random_effects=(RandomEffectSpec("per_member", "member_id", "member", entities=entities, features=20),),
        events=events,
        slices=8,  # the first slice introduces every entity, so it must hold at least as many events
        global_features=20,
        drift=0.02,
        new_entity_rate=0.01,
        format="parquet",
        seed=5,
    )
    with Stopwatch() as watch:
        truth = generate(spec, folder / "stream")
    report: dict = {"generate_seconds": watch.seconds}
    spark = spark_session(settings(folder, engines[0]).spark)
    for engine in engines:
        config = settings(tables_of(folder, engine), engine)
        store = open_store(spark, config.storage)
        create_tables(store, config.model)
        with StoreProfile() as profile, Stopwatch() as watch:
            for batch_id, path in enumerate(sorted(truth.landing.glob("part-*.parquet"))):
                ingest_batch(store, config, spark.read.parquet(str(path)), batch_id)
        report[f"ingest_seconds.{engine}"] = watch.seconds
        report[f"ingest_store_seconds.{engine}"] = profile.summary()
    return report


def run_job(folder: Path, engine: str) -> dict:
    """The whole nightly job on the ingested tables, with the driver's memory at its start and its peak."""
    from jobs.nightly_retrain import run_nightly
    from jobs.runtime.session import spark_session
    from jobs.storage.store import open_store

    config = settings(tables_of(folder, engine), engine)
    spark = spark_session(config.spark)
    store = open_store(spark, config.storage)
    spark.range(1).count()  # the session is up: what the job adds starts here
    jvm = jvm_pid()
    at_start = {"python_mb": python_peak_rss_mb(), "jvm_mb": jvm_peak_rss_mb(jvm)}
    started = time.perf_counter()
    with StoreProfile() as profile:
        report = run_nightly(spark, store, config)
    seconds = time.perf_counter() - started
    rows = report.training_rows + report.holdout_rows
    return {
        "status": report.status,
        "events": rows,
        "entities": report.entities.get("per_member"),
        "wall_seconds": seconds,
        "events_per_second": rows / seconds,
        "stage_seconds": report.seconds,
        "store_seconds": profile.summary(),
        "holdout_auc": report.validation.get("full.auc"),
        "python_peak_rss_mb": python_peak_rss_mb(),
        "jvm_peak_rss_mb": jvm_peak_rss_mb(jvm),
        "peak_rss_at_job_start": at_start,
    }


def random_effect_step(folder: Path, engine: str, sample_entities: int) -> dict:
    """The random-effect fit alone on one sample of entities, bucketed and one entity per call."""
    from pyspark.sql import functions as F

    from jobs.game.random_effect import RandomEffect
    from jobs.game.training_data import ingested_batches, training_cutoff, training_data
    from jobs.runtime.session import spark_session
    from jobs.storage.store import open_store

    config = settings(tables_of(folder, engine), engine)
    spark = spark_session(config.spark)
    store = open_store(spark, config.storage)
    batches = ingested_batches(store, config.nearline.app_id)
    cutoff, anchor = training_cutoff(batches, config)
    training = training_data(store, batches, cutoff, anchor, config).training
    random_effect = config.model.random_effects[0]
    chosen = training.select("member_id").distinct().orderBy(F.xxhash64("member_id")).limit(sample_entities)
    rows = training.join(chosen, "member_id", "left_semi").withColumn("score_fixed", F.lit(0.0)).localCheckpoint()
    variants = {
        "buckets": RandomEffect(random_effect, config.model.task, 64, config.nightly.seed),
        "one_entity_per_call": RandomEffect(random_effect, config.model.task, None, config.nightly.seed),
    }
    # Warm the Python workers (imports, first calls) on a few entities before timing either way.
    few = rows.join(chosen.limit(50), "member_id", "left_semi")
    for variant in variants.values():
        variant.fit(few, F.lit(0.0)).coefficients.count()
    timings = {}
    for label, variant in variants.items():
        with Stopwatch() as watch:
            fitted = variant.fit(rows, F.lit(0.0)).coefficients
        timings[label] = {"seconds": watch.seconds, "entities": fitted.count()}
    training.unpersist()
    return {
        "sample_entities": sample_entities,
        "rows": rows.count(),
        **timings,
        "ratio_one_entity_per_call_over_buckets": timings["one_entity_per_call"]["seconds"]
        / timings["buckets"]["seconds"],
    }


def child(*arguments: str) -> dict:
    """One step in a fresh Python process (and so a fresh JVM): its JSON report, the last line it prints."""
    result = subprocess.run(
        [sys.executable, str(HERE), *arguments], stdout=subprocess.PIPE, stderr=sys.stderr, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="250000,1000000,4000000", help="events, comma-separated (Spark's Delta)")
    parser.add_argument("--delta-rs-sizes", default="1000000", help="the sizes also run on delta-rs ('' for none)")
    parser.add_argument("--entities-per-event", type=float, default=0.1, help="entities = events x this")
    parser.add_argument("--sample-entities", type=int, default=20_000, help="entities in the grouping comparison")
    parser.add_argument("--keep", action="store_true", help="keep the generated tables")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--child", choices=["prepare", "run", "grouping"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--events", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "prepare":
        engines = args.engine.split(",")
        print(json.dumps(prepare(args.folder, args.events, int(args.events * args.entities_per_event), engines)))
        return
    if args.child == "run":
        print(json.dumps(run_job(args.folder, args.engine)))
        return
    if args.child == "grouping":
        print(json.dumps(random_effect_step(args.folder, args.engine, args.sample_entities)))
        return
    if args.quick:
        args.sizes, args.delta_rs_sizes, args.sample_entities = "2000,4000", "2000", 100
    sizes = sorted(int(size) for size in args.sizes.split(","))
    delta_rs_sizes = {int(size) for size in args.delta_rs_sizes.split(",") if size}
    work = Path(tempfile.mkdtemp(prefix="bench-nightly-"))
    report: dict = {"features": 20, "entities_per_event": args.entities_per_event}
    try:
        for size in sorted(set(sizes) | delta_rs_sizes):
            folder = work / str(size)
            engines = [
                engine for engine, on in (("spark-delta", size in sizes), ("delta-rs", size in delta_rs_sizes)) if on
            ]
            shared = ["--folder", str(folder), "--entities-per-event", str(args.entities_per_event)]
            report[str(size)] = {
                "prepare": child("--child", "prepare", *shared, "--events", str(size), "--engine", ",".join(engines))
            }
            for engine in engines:
                report[str(size)][engine] = child("--child", "run", *shared, "--engine", engine)
            emit(str(size), report[str(size)], sys.stderr)
            if size == sizes[-1] and args.sample_entities:
                grouping = child(
                    "--child",
                    "grouping",
                    *shared,
                    "--engine",
                    "spark-delta",
                    "--sample-entities",
                    str(args.sample_entities),
                )
                report["random_effect_step"] = {"events": size, **grouping}
                emit("random_effect_step", report["random_effect_step"], sys.stderr)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        small, large = report[str(sizes[0])]["spark-delta"], report[str(sizes[-1])]["spark-delta"]
        report["scaling"] = {
            "engine": "spark-delta",
            "data_ratio": sizes[-1] / sizes[0],
            "time_ratio": large["wall_seconds"] / small["wall_seconds"],
            "python_peak_rss_ratio": large["python_peak_rss_mb"] / small["python_peak_rss_mb"],
            "jvm_peak_rss_ratio": large["jvm_peak_rss_mb"] / small["jvm_peak_rss_mb"],
        }
        both = [size for size in sizes if size in delta_rs_sizes]
        report["engines"] = {
            str(size): {
                "wall_ratio_delta_rs_over_spark_delta": report[str(size)]["delta-rs"]["wall_seconds"]
                / report[str(size)]["spark-delta"]["wall_seconds"],
                "python_peak_rss_mb": {
                    e: report[str(size)][e]["python_peak_rss_mb"] for e in ("spark-delta", "delta-rs")
                },
                "jvm_peak_rss_mb": {e: report[str(size)][e]["jvm_peak_rss_mb"] for e in ("spark-delta", "delta-rs")},
            }
            for size in both
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
