"""The label join, measured: its throughput on local[2], and the delayed-feedback trade-off of the attribution window.

    python bench/label_join.py throughput [--impressions 50000 --batches 5 --backend delta-rs]
    python bench/label_join.py windows [--windows 2,5,10,20,40,80 --out var/label-join-windows]

``throughput`` runs the real job (the streaming query on landing files, one impressions file and one
clicks file per micro-batch) on a generated stream and reports impressions per second: over the whole
run, and in the steady state (the median micro-batch after the first, whose time includes compiling).

``windows`` replays one generated stream (drifting entities, click delays with a long tail) through
the chain once per attribution window: the label join labels it with that window, and the nearline job
learns from its micro-batches, starting from one nightly generation shared by every window (trained
on the first slices, with every click known). Before each slice, the live model predicts that slice's
impressions; the AUC and log loss against whether each impression was *ever* clicked, pooled over the
slices, show the trade-off: a short window is fresh but calls late clicks negatives, a long one is
right but late. Out come ``windows.json``, the plot ``label_join_windows.png`` and a markdown table.

Both print their report as JSON on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import functions as F

from jobs.game.generation import current_generation, priors_of
from jobs.game.model import with_game_scores
from jobs.label_join import run_label_join
from jobs.labels.inputs import clicks_as_arrivals, impressions_as_arrivals
from jobs.labels.joiner import LabelJoiner
from jobs.labels.schemas import impression_json_schema
from jobs.nearline_update import NearlineUpdater
from jobs.nightly_retrain import run_nightly
from jobs.runtime.cli import configure_logging
from jobs.runtime.config import load_config
from jobs.runtime.session import spark_session
from jobs.simulate.clicks import ClickSpec, generate_clicks
from jobs.simulate.spec import RandomEffectSpec, StreamSpec
from jobs.storage.parsing import TEXT_COLUMN
from jobs.storage.schemas import bag_column, feature_bags
from jobs.storage.store import open_store
from lambda_learner import metrics

ROOT = Path(__file__).resolve().parents[1]


def settings(folder: Path, *extra: str):
    return load_config(
        ROOT / "conf" / "local.yaml",
        [
            f"storage.root={folder / 'tables'}",
            f"label_join.checkpoint={folder / 'checkpoint'}",
            "label_join.trigger=available_now",
            "label_join.impressions.max_files_per_trigger=1",
            "label_join.clicks.max_files_per_trigger=1",
            "nearline.entity_buckets=8",
            "nightly.entity_buckets=8",
            *extra,
        ],
    )


def throughput(arguments: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-label-join-"))
    try:
        spec = StreamSpec(
            random_effects=(
                RandomEffectSpec("per_member", "member_id", "member", 20_000, features=5),
                RandomEffectSpec("per_item", "item_id", "item", 2_000, features=5),
            ),
            events=arguments.impressions * arguments.batches,
            slices=arguments.batches,
            global_features=10,
            base_rate=0.1,
            slice_minutes=10.0,
            seed=5,
        )
        clicks = ClickSpec(median_delay_minutes=3.0, delay_sigma=1.0, duplicate_rate=0.02, orphan_rate=0.01)
        generated = time.perf_counter()
        truth = generate_clicks(spec, clicks, work / "stream")
        generated = time.perf_counter() - generated
        config = settings(
            work,
            f"storage.backend={arguments.backend}",
            f"label_join.impressions.path={truth.impressions}",
            f"label_join.clicks.path={truth.clicks}",
            "label_join.attribution_window_minutes=15",
            "label_join.allowed_lateness_minutes=2",
        )
        spark = spark_session(config.spark)
        started = time.perf_counter()
        run_label_join(spark, config)
        wall = time.perf_counter() - started
        store = open_store(spark, config.storage)
        rows = store.read(config.label_join.metrics_table).orderBy("batch_id").collect()
        recorded = [row.recorded_at.timestamp() for row in rows]
        steps = [b - a for a, b in itertools.pairwise(recorded)]
        impressions = [row["values"]["impressions_in"] for row in rows]
        steady = statistics.median(steps[: arguments.batches - 1]) if len(steps) > 1 else float("nan")
        return {
            "backend": arguments.backend,
            "impressions_per_batch": arguments.impressions,
            "batches": len(rows),
            "clicks": truth.counts["clicks_delivered"],
            "generate_seconds": round(generated, 2),
            "query_seconds": round(wall, 2),
            "impressions_per_second_overall": round(sum(impressions) / wall, 1),
            "steady_batch_seconds": round(steady, 2),
            "impressions_per_second_steady": round(arguments.impressions / steady, 1),
            "join_seconds_per_batch": [round(row["values"]["seconds.join"], 2) for row in rows],
            "labelled": int(sum(row["values"]["labelled"] for row in rows)),
            "quarantined": int(sum(row["values"]["quarantined"] for row in rows)),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def windows(arguments: argparse.Namespace) -> dict:
    out = Path(arguments.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = StreamSpec(
        random_effects=(
            RandomEffectSpec("per_member", "member_id", "member", 300, features=4),
            RandomEffectSpec("per_item", "item_id", "item", 60, features=4),
        ),
        events=arguments.events,
        slices=arguments.slices,
        global_features=6,
        base_rate=0.2,
        drift=arguments.drift,
        new_entity_rate=0.02,
        slice_minutes=arguments.slice_minutes,
        seed=arguments.seed,
    )
    clicks = ClickSpec(
        median_delay_minutes=arguments.median_delay_minutes,
        delay_sigma=arguments.delay_sigma,
        trailing_slices=0,
    )
    truth = generate_clicks(spec, clicks, out / "stream")
    impressions_truth = pd.read_parquet(truth.truth / "impressions.parquet")
    clicked = impressions_truth.set_index("impression_id").clicked
    base = settings(out / "base", "storage.backend=delta-rs", "nightly.holdout_hours=0", "nightly.passes=2")
    spark = spark_session(base.spark)
    files = list(zip(truth.impression_files, truth.click_files, strict=True))
    train = arguments.train_slices

    # The shared generation: the first slices' impressions, each labelled by whether it was ever clicked.
    store = open_store(spark, base.storage)
    NearlineUpdater(base).process(_truth_events(spark, base, [path for path, _ in files[:train]], clicked), 0)
    if run_nightly(spark, store, base, force_publish=True).status != "published":
        raise RuntimeError("the shared generation was not published")
    generation = current_generation(store, base.model)
    stale = {r.name: priors_of(store, generation.number, r) for r in base.model.random_effects}

    slice_start = pd.Timestamp(spec.start) + pd.Timedelta(minutes=spec.slice_minutes) * train
    evaluated = [_truth_events(spark, base, [path], clicked) for path, _ in files[train + 1 :]]
    report = {"spec": {"events": spec.events, "slices": spec.slices, "slice_minutes": spec.slice_minutes}, "rows": []}
    report["stale"] = _figures(base, generation, stale, evaluated)
    print(json.dumps({"stale": report["stale"]}), file=sys.stderr, flush=True)
    for window in arguments.windows:
        folder = out / f"window-{window:g}"
        shutil.copytree(out / "base" / "tables", folder / "tables")
        config = settings(
            folder,
            "storage.backend=delta-rs",
            f"label_join.attribution_window_minutes={window}",
            f"label_join.allowed_lateness_minutes={arguments.lateness}",
            f"label_join.orphan_lookback_minutes={max(window, 60)}",
        )
        joiner, updater = LabelJoiner(config), NearlineUpdater(config)
        variant = open_store(spark, config.storage)
        models, seconds, labels = [], time.perf_counter(), []
        for batch_id, (impressions, click_file) in enumerate(files):
            joiner.process(_arrivals(spark, config, impressions, click_file), batch_id)
            if batch_id < train:
                continue
            labelled = variant.read(config.label_join.output_table).where(F.col("label_batch_id") == batch_id)
            # Impressions the shared generation was trained on are not learnt twice.
            labelled = labelled.where(F.col("event_time") >= F.lit(slice_start.to_pydatetime())).localCheckpoint()
            labels.append(labelled.select("event_id", "label").toPandas())
            updater.process(labelled.drop("labelled_at"), batch_id)
            if batch_id + 1 < len(files):
                models.append(variant.version("re_state"))
        types = config.model.random_effects
        live = [
            {r.name: variant.read("re_state", version=v).where(F.col("re_type") == r.name) for r in types}
            for v in models
        ]
        figures = _figures(config, generation, live, evaluated)
        joined = pd.concat(labels)
        truth_of = joined.event_id.map(clicked)
        figures["label_accuracy"] = float((joined.label.astype(bool) == truth_of).mean())
        figures["fake_negatives"] = float(((joined.label == 0) & truth_of).sum() / max(1, truth_of.sum()))
        figures["seconds"] = round(time.perf_counter() - seconds, 1)
        row = {"window_minutes": window, **figures}
        report["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        shutil.rmtree(folder / "tables", ignore_errors=True)
    (out / "windows.json").write_text(json.dumps(report, indent=2))
    _plot(report, out / "label_join_windows.png")
    (out / "windows.md").write_text(_markdown(report))
    return report


def _arrivals(spark, config, impressions: Path, clicks: Path):
    model = config.model
    return impressions_as_arrivals(spark.read.text(str(impressions)), model).unionByName(
        clicks_as_arrivals(spark.read.text(str(clicks)), model)
    )


def _truth_events(spark, config, paths: list[Path], clicked: pd.Series):
    """Impressions as typed events, each labelled by whether it was ever clicked."""
    labels = spark.createDataFrame(
        pd.DataFrame({"impression_id": clicked.index, "label": clicked.to_numpy().astype(float)})
    )
    impressions = spark.read.text([str(path) for path in paths]).select(
        F.from_json(TEXT_COLUMN, impression_json_schema(config.model)).alias("r")
    )
    return (
        impressions.select("r.*")
        .join(labels, "impression_id")
        .select(
            F.col("impression_id").alias("event_id"),
            F.to_timestamp("impression_time").alias("event_time"),
            "label",
            F.lit(1.0).alias("weight"),
            *[r.entity_column for r in config.model.random_effects],
            "features",
        )
        .localCheckpoint()
    )


def _figures(config, generation, models, evaluated) -> dict:
    """AUC and log loss on the evaluated slices of one model, or of one model per slice."""
    scores, labels = [], []
    for index, raw in enumerate(evaluated):
        model = models if isinstance(models, dict) else models[index]
        events = raw.select(
            "*",
            *[F.col("features")[bag].alias(bag_column(bag)) for bag in feature_bags(config.model)],
            F.xxhash64("event_id").alias("row_key"),
        )
        scored = with_game_scores(events, config, generation.fixed_effect, model, 4).select("score", "label")
        frame = scored.toPandas()
        scores.append(frame.score.to_numpy())
        labels.append(frame.label.to_numpy())
    score, label = np.concatenate(scores), np.concatenate(labels)
    return {"auc": float(metrics.auc(score, label)), "log_loss": float(metrics.log_loss(score, label))}


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    minutes = [row["window_minutes"] for row in rows]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis, key, label in ((axes[0], "auc", "AUC"), (axes[1], "log_loss", "log loss")):
        axis.plot(minutes, [row[key] for row in rows], marker="o", label="nearline, labels from the join")
        axis.axhline(report["stale"][key], color="grey", linestyle="--", label="stale nightly model")
        axis.set_xscale("log")
        axis.set_xticks(minutes, [f"{m:g}" for m in minutes])
        axis.minorticks_off()
        axis.set_xlabel("attribution window (minutes)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    figure.suptitle("Progressive AUC and log loss against the eventual clicks, by attribution window")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _markdown(report: dict) -> str:
    lines = [
        "| attribution window (minutes) | AUC | log loss | labels right | clicks labelled negative |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['window_minutes']:g} | {row['auc']:.4f} | {row['log_loss']:.4f} | "
            f"{row['label_accuracy']:.1%} | {row['fake_negatives']:.1%} |"
        )
    stale = report["stale"]
    lines.append(f"| stale nightly model | {stale['auc']:.4f} | {stale['log_loss']:.4f} | | |")
    return "\n".join(lines) + "\n"


def _minutes(text: str) -> list[float]:
    return [float(item) for item in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    speed = commands.add_parser("throughput", help="impressions per second of the label join on local[2]")
    speed.add_argument("--impressions", type=int, default=50_000, help="impressions per micro-batch")
    speed.add_argument("--batches", type=int, default=5)
    speed.add_argument("--backend", choices=["delta-rs", "spark-delta"], default="delta-rs")
    trade = commands.add_parser("windows", help="the nearline model's AUC and log loss by attribution window")
    trade.add_argument("--windows", type=_minutes, default=[2.0, 5.0, 10.0, 20.0, 40.0, 80.0])
    trade.add_argument("--out", default="var/label-join-windows")
    trade.add_argument("--events", type=int, default=24_000)
    trade.add_argument("--slices", type=int, default=16)
    trade.add_argument("--slice-minutes", type=float, default=10.0)
    trade.add_argument("--train-slices", type=int, default=4)
    trade.add_argument("--drift", type=float, default=0.3)
    trade.add_argument("--median-delay-minutes", type=float, default=5.0)
    trade.add_argument("--delay-sigma", type=float, default=1.2)
    trade.add_argument("--lateness", type=float, default=2.0)
    trade.add_argument("--seed", type=int, default=3)
    arguments = parser.parse_args()
    configure_logging()
    report = throughput(arguments) if arguments.command == "throughput" else windows(arguments)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
