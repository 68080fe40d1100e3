"""The nightly job on local[2]: wall time and events per second, scaling, and the random-effect step's grouping.

One random-effect type (100k entities at 1M events) and a fixed effect, 20 features each.
Every size runs the whole job (read, coordinate descent, validation, publication) on a
fresh copy of the tables; then the random-effect step runs alone twice on the same rows,
grouped by entity bucket and with one entity per pandas call. One entity per call costs
milliseconds per entity, so that comparison runs on a sample of entities (both ways).

    python bench/nightly.py [--events 1000000 --small-events 250000] [--sample-entities 4000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common
from pyspark.sql import functions as F

from jobs.game.random_effect import RandomEffect
from jobs.game.training_data import training_window
from jobs.nightly_retrain import run_nightly
from jobs.runtime.session import spark_session
from jobs.simulate.spec import RandomEffectSpec, StreamSpec
from jobs.simulate.writers import generate
from jobs.storage.ingest import ingest_batch
from jobs.storage.schemas import table_schemas
from jobs.storage.store import open_store


def settings(folder: Path, *extra: str):
    return common.settings(folder / "tables", "nightly.holdout_hours=1", *extra)


def prepare(spark, folder: Path, events: int, entities: int) -> dict:
    """Generate the stream as parquet and ingest it, one file per micro-batch."""
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
    started = time.perf_counter()
    truth = generate(spec, folder / "stream")
    generated = time.perf_counter() - started
    config = settings(folder)
    store = open_store(spark, config.storage)
    for name, schema in table_schemas(config.model).items():
        store.create(name, schema)
    started = time.perf_counter()
    for batch_id, path in enumerate(sorted(truth.landing.glob("part-*.parquet"))):
        ingest_batch(store, config, spark.read.parquet(str(path)), batch_id)
    return {"generate_seconds": generated, "ingest_seconds": time.perf_counter() - started}


def run_job(spark, folder: Path) -> dict:
    config = settings(folder)
    store = open_store(spark, config.storage)
    started = time.perf_counter()
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
        "holdout_auc": report.validation.get("full.auc"),
    }


def random_effect_step(spark, folder: Path, sample_entities: int) -> dict:
    """The random-effect fit alone on one sample of entities, bucketed and one entity per call."""
    config = settings(folder)
    store = open_store(spark, config.storage)
    training, _ = training_window(store.read("events"), config)
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
        started = time.perf_counter()
        fitted = variant.fit(rows, F.lit(0.0)).coefficients
        timings[label] = {"seconds": time.perf_counter() - started, "entities": fitted.count()}
    training.unpersist()
    return {
        "sample_entities": sample_entities,
        "rows": rows.count(),
        **timings,
        "ratio_one_entity_per_call_over_buckets": timings["one_entity_per_call"]["seconds"]
        / timings["buckets"]["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--small-events", type=int, default=250_000)
    parser.add_argument("--entities-per-event", type=float, default=0.1, help="entities = events x this")
    parser.add_argument("--sample-entities", type=int, default=20_000, help="entities in the grouping comparison")
    parser.add_argument("--keep", action="store_true", help="keep the generated tables")
    args = parser.parse_args()
    config = settings(Path(tempfile.gettempdir()))
    spark = spark_session(config.spark)
    work = Path(tempfile.mkdtemp(prefix="bench-nightly-"))
    report: dict = {"master": config.spark.master, "features": 20}
    try:
        for size in (args.small_events, args.events):
            folder = work / str(size)
            report[str(size)] = {"prepare": prepare(spark, folder, size, int(size * args.entities_per_event))}
            report[str(size)] |= run_job(spark, folder)
            print(json.dumps({str(size): report[str(size)]}), file=sys.stderr)
        small, large = report[str(args.small_events)], report[str(args.events)]
        report["scaling"] = {
            "data_ratio": args.events / args.small_events,
            "time_ratio": large["wall_seconds"] / small["wall_seconds"],
        }
        report["random_effect_step"] = random_effect_step(spark, work / str(args.events), args.sample_entities)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
