"""The rebase after a publication: seconds to rebuild the state from the priors and replay K batches in one pass.

The nearline job applies ``--before`` micro-batches of 500 events (one random-effect type, 20
features); the nightly job publishes generation 1 on them (cutoff: the last of them). Then, per K
in 1, 10, 50, on its own copy of those tables: K more batches are ingested (``ingest_batch``) and
recorded as finished without touching the state, as if the nearline job had applied them while
the nightly job ran, before its publication; then one more batch goes through
``NearlineUpdater.process``: it sees the new generation and rebases, replaying the K batches
before applying itself. The metrics row's ``seconds.rebase``, ``replayed_batches`` and
``replayed_rows`` are reported; each K runs ``--repeats`` times (the least counts: the machine is
shared), after one untimed rebase that warms the code paths.

    python bench/rebase.py [--ks 1,10,50 --events-per-batch 500 --engines delta-rs,spark-delta]
    python bench/rebase.py --quick     # tiny sizes, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from common import ENGINES, Stopwatch, emit, engine_settings, step_seconds

from jobs.nearline_update import LAST_WRITE, NearlineUpdater
from jobs.nightly_retrain import run_nightly
from jobs.runtime.session import spark_session
from jobs.simulate.spec import RandomEffectSpec, StreamSpec
from jobs.simulate.writers import generate
from jobs.storage.ingest import ingest_batch
from jobs.storage.schemas import RE_STATE
from jobs.storage.store import open_store
from jobs.streaming.sequence import DIRECT, BatchTicket

NIGHTLY = ("nightly.holdout_hours=0", "nightly.passes=1")


def published(spark, engine: str, tables: Path, files: list[Path]) -> dict:
    """The nearline job on ``files``, then generation 1 published on them."""
    config = engine_settings(tables, engine, *NIGHTLY)
    updater = NearlineUpdater(config)
    with Stopwatch() as nearline:
        for stream_batch_id, path in enumerate(files):
            updater.process(spark.read.text(str(path)), stream_batch_id)
    with Stopwatch() as nightly:
        report = run_nightly(spark, open_store(spark, config.storage), config)
    if report.status != "published":
        raise RuntimeError(f"the nightly job did not publish: {report.status} ({report.reason})")
    return {
        "nearline_seconds": nearline.seconds,
        "nightly_seconds": nightly.seconds,
        "generation": report.generation,
        "cutoff_batch_id": report.cutoff_batch_id,
    }


def rebase_after(spark, engine: str, tables: Path, replayed: list[Path], batch: Path, first: int) -> dict:
    """Ingest ``replayed`` as batches ``first``, ... (finished, state untouched), then process ``batch``: a rebase."""
    config = engine_settings(tables, engine, *NIGHTLY)
    store = open_store(spark, config.storage)
    app_id = config.nearline.app_id
    ticket = None
    for batch_id, path in enumerate(replayed, start=first):
        ticket = BatchTicket(DIRECT, batch_id, batch_id, datetime.now(UTC))
        ingest_batch(store, config, spark.read.text(str(path)), batch_id, ticket.guard(app_id), ticket.ingested)
    if ticket is not None:
        # Finished as far as the batch sequence knows (the nearline job applied them before the publication).
        empty = spark.createDataFrame([], RE_STATE)
        store.append(LAST_WRITE, empty, guard=ticket.guard(app_id, generation=None))
    updater = NearlineUpdater(config)
    with Stopwatch() as watch:
        values = updater.process(spark.read.text(str(batch)), first + len(replayed))
    return {
        "end_to_end_seconds": watch.seconds,
        "rebase_seconds": values.get("seconds.rebase"),
        "replayed_batches": values.get("replayed_batches"),
        "replayed_rows": values.get("replayed_rows"),
        "step_seconds": step_seconds(values),
        "entities_updated": values.get("entities_updated.per_member"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,10,50", help="batches to replay, comma-separated")
    parser.add_argument("--events-per-batch", type=int, default=500)
    parser.add_argument("--entities", type=int, default=500)
    parser.add_argument("--before", type=int, default=4, help="batches the published generation is trained on")
    parser.add_argument("--repeats", type=int, default=2, help="rebases per K (the least counts)")
    parser.add_argument("--engines", default="delta-rs,spark-delta", help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.ks, args.events_per_batch, args.entities, args.before, args.repeats = "1,3", 100, 50, 2, 1
    ks = sorted(int(k) for k in args.ks.split(","))
    engines = args.engines.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-rebase-"))
    report: dict = {"events_per_batch": args.events_per_batch, "entities": args.entities, "features": 20}
    try:
        spec = StreamSpec(
            random_effects=(RandomEffectSpec("per_member", "member_id", "member", args.entities, features=20),),
            events=args.events_per_batch * (args.before + ks[-1] + 1),
            slices=args.before + ks[-1] + 1,
            global_features=20,
            drift=0.05,
            new_entity_rate=0.01,
            seed=23,
        )
        files = sorted(generate(spec, work / "stream").landing.glob("part-*"))
        before, after = files[: args.before], files[args.before :]
        spark = spark_session(engine_settings(work / "none", engines[0]).spark)
        for engine in engines:
            base = work / f"{engine}-published"
            report[engine] = {"setup": published(spark, engine, base, before)}
            runs: dict[int, list[dict]] = {k: [] for k in ks}
            # One untimed rebase warms its code paths; then every K once per repeat, interleaved.
            schedule = [("warm", ks[0])] + [(repeat, k) for repeat in range(args.repeats) for k in ks]
            for repeat, k in schedule:
                tables = work / f"{engine}-{k}-{repeat}"
                shutil.copytree(base, tables)
                run = rebase_after(spark, engine, tables, after[:k], after[k], args.before)
                shutil.rmtree(tables, ignore_errors=True)
                if repeat == "warm":
                    report[engine]["warm"] = run
                else:
                    runs[k].append(run)
                emit(f"{engine}/K={k}/{repeat}", run, sys.stderr)
            for k, measured in runs.items():
                best = min(measured, key=lambda run: run["rebase_seconds"])
                report[engine][f"K={k}"] = {**best, "rebase_seconds_all_runs": [r["rebase_seconds"] for r in measured]}
            smallest = report[engine][f"K={ks[0]}"]["rebase_seconds"]
            report[engine]["ratio_to_smallest_k"] = {
                f"K={k}": report[engine][f"K={k}"]["rebase_seconds"] / smallest for k in ks[1:]
            }
            emit(f"{engine}/ratio_to_smallest_k", report[engine]["ratio_to_smallest_k"], sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
