"""The whole system once, on the embedded default (local Spark, delta-rs tables): ``make demo``.

    python -m jobs.demo --out var/demo [--events 12000]

1. generate a drifting stream (two random-effect types, cold-start entities, a few bad events);
2. the nearline job drains the first third of it (no model generation yet: it learns from scratch);
3. the nightly job publishes generation 1;
4. the nearline job drains the second third, rebasing on generation 1 first;
5. the nightly job publishes generation 2;
6. the nearline job drains the last third, rebasing on generation 2;
7. score requests (Thompson-sampled top 3 items for a few members);
8. the chain from raw streams: impressions and clicks (with a tail of late clicks, duplicates and
   orphans) -> the label join -> the nearline job reading its output table -> the nightly job, once,
   then the rest of the streams through both jobs again (the nearline job rebasing);
9. print a short report of what is in the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from pyspark.sql import functions as F

from jobs.label_join import run_label_join
from jobs.nearline_update import run_nearline
from jobs.nightly_retrain import run_nightly
from jobs.runtime.cli import configure_logging
from jobs.runtime.config import load_config
from jobs.runtime.session import spark_session
from jobs.runtime.settings import Config
from jobs.score import read_requests, score_requests
from jobs.simulate.clicks import ClickSpec, generate_clicks
from jobs.simulate.spec import RandomEffectSpec, StreamSpec
from jobs.simulate.writers import deliver, generate
from jobs.storage.store import TableStore, open_store

LOG = logging.getLogger("lambda_learner.demo")
TABLES = ("events", "quarantine", "fixed_effect", "re_priors", "re_state", "metrics")


def run_demo(out: Path, events: int, slices: int = 12, engine: str = "delta-rs") -> dict:
    """The whole system once, on ``engine``'s tables (``delta-rs``, the embedded default, or ``spark-delta``)."""
    shutil.rmtree(out, ignore_errors=True)
    spec = StreamSpec(
        random_effects=(
            RandomEffectSpec("per_member", "member_id", "member", entities=300, features=5),
            RandomEffectSpec("per_item", "item_id", "item", entities=60, features=5),
        ),
        events=events,
        slices=slices,
        global_features=8,
        base_rate=0.2,
        drift=0.15,
        new_entity_rate=0.02,
        bad_event_rate=0.01,
        seed=42,
    )
    truth = generate(spec, out / "stream")
    landing = out / "landing"
    landing.mkdir()
    # The packaged defaults and conf/local.yaml's settings, so that an installed wheel runs it too.
    overrides = [
        "spark.master=local[2]",
        "spark.shuffle_partitions=4",
        "spark.conf.spark.driver.memory=6g",
        f"storage.backend={engine}",
        "stream.source=files",
        "stream.format=json",
        "stream.trigger=available_now",
        "stream.max_files_per_trigger=1",
        f"storage.root={out / 'tables'}",
        f"stream.path={landing}",
        f"stream.checkpoint={out / 'checkpoint'}",
        "nightly.holdout_hours=1",
        "nearline.entity_buckets=8",
        "nightly.entity_buckets=8",
    ]
    config = load_config(None, overrides)
    spark = spark_session(config.spark)
    store = open_store(spark, config.storage)
    files = sorted(truth.landing.glob("part-*"))
    thirds = [files[: slices // 3], files[slices // 3 : 2 * slices // 3], files[2 * slices // 3 :]]
    nightly = []
    for part, chunk in enumerate(thirds):
        if part:
            report = run_nightly(spark, store, config)
            nightly.append(report)
            LOG.info("nightly run %d: %s (generation %s)", part, report.status, report.generation)
        deliver(chunk, landing)
        run_nearline(spark, config)
        LOG.info("nearline: drained %d more files", len(chunk))
    recommendations = _recommend(spark, store, config, files[-1], out)
    report = _report(store, config, truth.summary(), nightly, recommendations)
    report["chain"] = _chain(spark, spec, out / "chain", overrides)
    return report


# The label join's settings in the chain: a 15-minute attribution window, 2 minutes of lateness.
CHAIN_WINDOW_MINUTES, CHAIN_LATENESS_MINUTES = 15, 2


def _chain(spark, spec: StreamSpec, out: Path, overrides: list[str]) -> dict:
    """Impressions and clicks through the label join, the nearline job (on its output table) and the nightly job."""
    clicks = ClickSpec(
        median_delay_minutes=3.0,
        delay_sigma=1.2,
        duplicate_rate=0.05,
        orphan_rate=0.02,
        late_rate=0.02,
        late_minutes=40.0,
        trailing_slices=2,
    )
    truth = generate_clicks(replace(spec, bad_event_rate=0.0, slice_minutes=10.0), clicks, out / "stream")
    landing = out / "landing"
    config = load_config(
        None,
        [
            *overrides,
            f"storage.root={out / 'tables'}",
            f"label_join.impressions.path={landing / 'impressions'}",
            f"label_join.clicks.path={landing / 'clicks'}",
            "label_join.impressions.max_files_per_trigger=1",
            "label_join.clicks.max_files_per_trigger=1",
            "label_join.trigger=available_now",
            f"label_join.checkpoint={out / 'label-join-checkpoint'}",
            f"label_join.attribution_window_minutes={CHAIN_WINDOW_MINUTES}",
            f"label_join.allowed_lateness_minutes={CHAIN_LATENESS_MINUTES}",
            "stream.source=delta",
            f"stream.path={out / 'tables' / 'labelled_events'}",
            f"stream.checkpoint={out / 'nearline-checkpoint'}",
            "stream.max_files_per_trigger=null",
            # The nearline job takes each part in one micro-batch: the nightly job holds none of it out.
            "nightly.holdout_hours=0",
        ],
    )
    store = open_store(spark, config.storage)
    cut = 2 * len(truth.impression_files) // 3
    nightly = None
    for impressions, clicks_files in (
        (truth.impression_files[:cut], truth.click_files[:cut]),
        (truth.impression_files[cut:], truth.click_files[cut:]),
    ):
        if nightly is None and impressions[0] != truth.impression_files[0]:
            nightly = run_nightly(spark, store, config)
            LOG.info("chain: nightly run %s (generation %s)", nightly.status, nightly.generation)
        deliver(impressions, landing / "impressions")
        deliver(clicks_files, landing / "clicks")
        run_label_join(spark, config)
        run_nearline(spark, config)
        LOG.info("chain: joined and learnt %d more impression files", len(impressions))
    join = config.label_join
    batches = store.read(join.metrics_table).orderBy("batch_id").collect()
    totals = {key: int(sum(row["values"].get(key, 0.0) for row in batches)) for key in CHAIN_FIGURES}
    nearline = store.read("metrics").where("job = 'nearline'").orderBy("batch_id").collect()
    return {
        "streams": {key: truth.counts[key] for key in ("impressions", "clicks_delivered", "clicked_impressions")},
        "label_join": {
            "batches": len(batches),
            **totals,
            "quarantined_by_reason": {
                key.split(".", 1)[1]: int(sum(row["values"][key] for row in batches))
                for key in sorted(batches[-1]["values"])
                if key.startswith("quarantined.") and any(row["values"][key] for row in batches)
            },
            "pending_at_the_end": int(batches[-1]["values"]["pending_impressions"]),
        },
        "labelled_events": store.read(join.output_table).count(),
        "nearline_events": store.read("events").count(),
        "nightly": {"status": nightly.status, "generation": nightly.generation, "cutoff": nightly.cutoff_batch_id},
        "nearline": [
            {
                "batch": row.batch_id,
                "status": row.status,
                "events": int(row["values"]["rows_valid"]),
                "loss_before": round(row["values"].get("loss_before", float("nan")), 4),
                "loss_after": round(row["values"].get("loss_after", float("nan")), 4),
            }
            for row in nearline
        ],
    }


CHAIN_FIGURES = ("impressions_in", "clicks_in", "positives", "negatives", "quarantined")


def _recommend(spark, store: TableStore, config: Config, source: Path, out: Path) -> list[dict]:
    """Thompson-sampled top 3 of ten candidate items for three members seen in the last window."""
    events = [json.loads(line) for line in source.read_text().splitlines()[:200]]
    valid = [e for e in events if isinstance(e.get("member_id"), str) and isinstance(e.get("item_id"), str)]
    members = list(dict.fromkeys(e["member_id"] for e in valid))[:3]
    candidates = list(dict.fromkeys(e["item_id"] for e in valid))[:10]
    bags = {e["item_id"]: e.get("features", {}) for e in valid}
    requests = [
        {"request_id": f"request-{member}", "member_id": member, "item_id": item, "features": bags[item]}
        for member in members
        for item in candidates
    ]
    path = out / "requests.jsonl"
    path.write_text("\n".join(json.dumps(request) for request in requests) + "\n")
    ranked = score_requests(store, config, read_requests(spark, str(path), config), thompson=True, seed=7, top_k=3)
    rows = ranked.orderBy("request_id", "rank").select(
        "member_id", "rank", "item_id", F.round("score", 3).alias("score")
    )
    return [row.asDict() for row in rows.collect()]


def _report(store: TableStore, config: Config, stream: dict, nightly, recommendations) -> dict:
    nearline = store.read("metrics").where("job = 'nearline'").orderBy("batch_id").collect()
    return {
        "tables": {name: store.read(name).count() for name in TABLES},
        "stream": {key: stream[key] for key in ("files", "events", "bad_events")},
        "nightly": [
            {"status": r.status, "generation": r.generation, "cutoff": r.cutoff_batch_id, "holdout": r.validation}
            for r in nightly
        ],
        "nearline": [
            {
                "batch": row.batch_id,
                "status": row.status,
                "generation": row.generation,
                "loss_before": round(row["values"].get("loss_before", float("nan")), 4),
                "loss_after": round(row["values"].get("loss_after", float("nan")), 4),
                "quarantined": int(row["values"]["rows_quarantined"]),
            }
            for row in nearline
        ],
        "entities": {
            r.name: store.read("re_state").where(F.col("re_type") == r.name).count()
            for r in config.model.random_effects
        },
        "recommendations": recommendations,
    }


def _print(report: dict) -> None:
    print("Lambda Learner on Spark: demo")
    print("tables: " + ", ".join(f"{name} {count} rows" for name, count in report["tables"].items()))
    print(
        f"stream: {report['stream']['events']} events in {report['stream']['files']} files, "
        f"{report['stream']['bad_events']} deliberately bad"
    )
    for run in report["nightly"]:
        fixed, full = (run["holdout"].get(key, float("nan")) for key in ("fixed_only.auc", "full.auc"))
        print(
            f"nightly: generation {run['generation']} {run['status']} (cutoff batch {run['cutoff']}); "
            f"hold-out AUC fixed effect {fixed:.3f}, full model {full:.3f}"
        )
    print("nearline batches (progressive log loss before -> after the update):")
    for batch in report["nearline"]:
        print(
            f"  batch {batch['batch']:2d} generation {batch['generation']} {batch['status']:8s} "
            f"{batch['loss_before']:.4f} -> {batch['loss_after']:.4f}, {batch['quarantined']} quarantined"
        )
    print("live random effects: " + ", ".join(f"{name} {count}" for name, count in report["entities"].items()))
    print("Thompson-sampled top 3 items per member:")
    for row in report["recommendations"]:
        print(f"  {row['member_id']} #{row['rank']} {row['item_id']} ({row['score']})")
    chain = report["chain"]
    streams, join = chain["streams"], chain["label_join"]
    print(
        f"chain: {streams['impressions']} impressions and {streams['clicks_delivered']} clicks "
        f"-> label join ({CHAIN_WINDOW_MINUTES}-minute window, {join['batches']} micro-batches) "
        "-> nearline -> nightly"
    )
    print(
        f"  label join: {join['positives']} positives, {join['negatives']} negatives, "
        f"{join['pending_at_the_end']} impressions still in their window; quarantined "
        + ", ".join(f"{count} {reason}" for reason, count in join["quarantined_by_reason"].items())
    )
    print(
        f"  nearline: {chain['nearline_events']} of {chain['labelled_events']} labelled events learnt; nightly: "
        f"generation {chain['nightly']['generation']} {chain['nightly']['status']}"
    )
    for batch in chain["nearline"]:
        print(
            f"  nearline batch {batch['batch']} {batch['status']:8s} {batch['events']} events, "
            f"{batch['loss_before']:.4f} -> {batch['loss_after']:.4f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole system once on the embedded default.")
    parser.add_argument("--out", default="var/demo", help="folder for the stream, the tables and the report")
    parser.add_argument("--events", type=int, default=12_000)
    parser.add_argument(
        "--engine", choices=("delta-rs", "spark-delta"), default="delta-rs", help="the Delta engine of the tables"
    )
    args = parser.parse_args(argv)
    configure_logging()
    out = Path(args.out).resolve()
    report = run_demo(out, args.events, engine=args.engine)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
