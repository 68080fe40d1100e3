"""Replay evaluation: the Lambda Learner experiment on a time-ordered stream, predict then learn, window by window.

    python -m jobs.replay --config conf/local.yaml --stream var/demo/stream/landing --out var/replay \\
        [--train-files 4] [--deltas 0.5,0.8,1.0] [--no-ideal]

The first ``--train-files`` files (time windows) train a nightly generation. Then each later
window is scored before anything learns from it, by

- ``fixed_effect``: that generation's fixed effect alone;
- ``stale``: that generation (fixed effect and random-effect priors), never updated;
- ``nearline_delta_<d>``: the same generation, updated by the nearline job on every window
  since, with forgetting factor d;
- ``ideal``: a batch model retrained by the nightly job on all data up to the window
  (what a nightly run every window would give; affordable on small data only);

and then the windows are learnt from. Every variant runs the real jobs on its own tables.
Out come ``replay.json`` (per window and variant: AUC, log loss, per-entity AUC),
``auc.png``, ``log_loss.png``, ``per_entity_auc.png`` and ``summary.md``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.game.generation import current_generation, priors_of
from jobs.game.model import with_game_scores
from jobs.nearline_update import NearlineUpdater
from jobs.nightly_retrain import run_nightly
from jobs.runtime.cli import Job, job_parser, run_job
from jobs.runtime.settings import Config
from jobs.storage.ingest import ingest_batch
from jobs.storage.parsing import parse_events
from jobs.storage.schemas import table_schemas
from jobs.storage.store import open_store
from lambda_learner import metrics

LOG = logging.getLogger("lambda_learner.replay")


@dataclass(frozen=True)
class Variant:
    """One way of keeping the model: its name, its tables and how it learns from a window."""

    name: str
    config: Config
    learns: str  # "never", "nearline" or "nightly"


def replay(
    spark: SparkSession,
    config: Config,
    files: Sequence[Path],
    out: Path,
    *,
    train_files: int,
    deltas: Sequence[float],
    ideal: bool = True,
) -> dict:
    """Run the experiment; return (and write) its figures."""
    if not 0 < train_files < len(files):
        raise ValueError(f"--train-files must be between 1 and {len(files) - 1}, got {train_files}")
    base = _tables(config, out / "tables" / "base")
    store = open_store(spark, base.storage)
    for name, schema in table_schemas(base.model).items():
        store.create(name, schema)
    for batch_id, path in enumerate(files[:train_files]):
        ingest_batch(store, base, _raw(spark, path), batch_id)
    LOG.info("training the first generation on %d windows", train_files)
    run_nightly(spark, store, base, force_publish=True)

    variants = [Variant("fixed_effect", base, "never"), Variant("stale", base, "never")]
    variants += [
        Variant(
            f"nearline_delta_{delta:g}", _copy(base, out, f"delta-{delta:g}", _with_delta(config, delta)), "nearline"
        )
        for delta in deltas
    ]
    if ideal:
        variants.append(Variant("ideal", _copy(base, out, "ideal", config), "nightly"))
    updaters = {v.name: NearlineUpdater(v.config) for v in variants if v.learns == "nearline"}

    windows, pooled = [], {variant.name: [] for variant in variants}
    for batch_id, path in enumerate(files[train_files:], start=train_files):
        raw = _raw(spark, path)
        events = parse_events(raw, config.model, batch_id).valid.withColumn("row_key", F.xxhash64("event_id"))
        events = events.localCheckpoint(eager=True)
        window = {"window": batch_id, "file": path.name, "events": events.count(), "variants": {}}
        for variant in variants:
            scores = _scores(spark, variant, events)
            window["variants"][variant.name] = _figures(config, scores)
            pooled[variant.name].append(scores)
        for variant in variants:
            variant_store = open_store(spark, variant.config.storage)
            if variant.learns == "nearline":
                updaters[variant.name].process(raw, batch_id)
            elif variant.learns == "nightly":
                ingest_batch(variant_store, variant.config, raw, batch_id)
                run_nightly(spark, variant_store, variant.config, force_publish=True)
        LOG.info("window %d: %s", batch_id, {name: round(v["auc"], 4) for name, v in window["variants"].items()})
        windows.append(window)

    entity_aucs = {name: _entity_aucs(config, pd.concat(frames)) for name, frames in pooled.items()}
    report = {"train_windows": train_files, "windows": windows, "summary": _summary(windows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(report, indent=2))
    _plots(windows, entity_aucs, out)
    (out / "summary.md").write_text(_markdown(report))
    return report


def _tables(config: Config, root: Path) -> Config:
    """The settings with tables under ``root``; every nightly run trains on all it has and publishes."""
    return replace(
        config,
        storage=replace(config.storage, root=str(root)),
        nightly=replace(config.nightly, holdout_hours=0.0, window_days=3650.0),
    )


def _with_delta(config: Config, delta: float) -> Config:
    random_effects = tuple(replace(r, delta=delta) for r in config.model.random_effects)
    return replace(config, model=replace(config.model, random_effects=random_effects))


def _copy(base: Config, out: Path, name: str, settings: Config) -> Config:
    """A copy of the base tables (the first generation) for one variant, with that variant's settings."""
    root = out / "tables" / name
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(base.storage.root, root)
    return _tables(settings, root)


def _raw(spark: SparkSession, path: Path) -> DataFrame:
    return spark.read.text(str(path)) if path.suffix == ".json" else spark.read.parquet(str(path))


def _scores(spark: SparkSession, variant: Variant, events: DataFrame) -> pd.DataFrame:
    """The variant's scores of the window, before it learns from it."""
    config, store = variant.config, open_store(spark, variant.config.storage)
    generation = current_generation(store, config.model)
    coefficients = {}
    for random_effect in config.model.random_effects:
        if variant.learns == "nearline" and store.read("re_state").limit(1).count():
            state = store.read("re_state").where(F.col("re_type") == random_effect.name)
            coefficients[random_effect.name] = state.select("entity_id", "coefficients")
        elif variant.name == "fixed_effect":
            coefficients[random_effect.name] = priors_of(store, generation.number, random_effect).limit(0)
        else:
            coefficients[random_effect.name] = priors_of(store, generation.number, random_effect)
    scored = with_game_scores(events, config, generation.fixed_effect, coefficients, config.nearline.buckets)
    entity = config.model.random_effects[0].entity_column if config.model.random_effects else "event_id"
    return scored.select("label", "weight", "score", F.col(entity).alias("entity")).toPandas()


def _figures(config: Config, scores: pd.DataFrame) -> dict:
    labels, weights, values = scores["label"].to_numpy(), scores["weight"].to_numpy(), scores["score"].to_numpy()
    if config.model.task == "linear":
        return {"rmse": metrics.rmse(values, labels, weights), "auc": float("nan")}
    per_entity = metrics.per_entity_auc(values, labels, scores["entity"].to_numpy())
    return {
        "auc": metrics.auc(values, labels, weights),
        "log_loss": metrics.log_loss(values, labels, weights),
        "per_entity_auc": per_entity[0],
        "entities_with_auc": per_entity[1],
    }


def _entity_aucs(config: Config, scores: pd.DataFrame) -> np.ndarray:
    """Each entity's AUC over every window it was scored in (the first random-effect type's entities)."""
    if config.model.task == "linear":
        return np.zeros(0)
    return metrics.auc_by_entity(scores["score"].to_numpy(), scores["label"].to_numpy(), scores["entity"].to_numpy())[1]


def _summary(windows: list[dict]) -> dict:
    names = list(windows[0]["variants"]) if windows else []
    return {
        name: {
            key: float(np.nanmean([w["variants"][name][key] for w in windows]))
            for key in windows[0]["variants"][name]
            if key != "entities_with_auc"
        }
        for name in names
    }


def _plots(windows: list[dict], entity_aucs: dict[str, np.ndarray], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [w["window"] for w in windows]
    names = list(windows[0]["variants"]) if windows else []
    for key, label in (("auc", "AUC"), ("log_loss", "log loss")):
        if not windows or key not in windows[0]["variants"][names[0]]:
            continue
        figure, axes = plt.subplots(figsize=(9.5, 4.5))
        for name in names:
            axes.plot(steps, [w["variants"][name][key] for w in windows], marker="o", label=name)
        axes.set_xticks(steps)
        axes.set_xlabel("window (scored before learning from it)")
        axes.set_ylabel(label)
        axes.set_title(f"Replay: {label} per window")
        axes.grid(alpha=0.3)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, never over them
        figure.tight_layout()
        figure.savefig(out / f"{key}.png", dpi=110)
        plt.close(figure)
    if any(len(values) for values in entity_aucs.values()):
        figure, axes = plt.subplots(figsize=(8, 4.5))
        # The triangle is the mean, the per_entity_auc figure of the summary.
        axes.boxplot([entity_aucs[name] for name in names], tick_labels=names, showmeans=True)
        axes.set_ylabel("AUC of one entity over the scored windows")
        axes.set_title("Replay: per-entity AUC distribution")
        axes.tick_params(axis="x", rotation=20)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / "per_entity_auc.png", dpi=110)
        plt.close(figure)


def _markdown(report: dict) -> str:
    summary = report["summary"]
    keys = [key for key in ("auc", "log_loss", "per_entity_auc", "rmse") if key in next(iter(summary.values()))]
    lines = [
        "# Replay evaluation",
        "",
        f"{len(report['windows'])} windows scored before learning from them; the first generation was trained "
        f"on {report['train_windows']} windows. Means over the windows:",
        "",
        "| variant | " + " | ".join(keys) + " |",
        "| --- | " + " | ".join("---" for _ in keys) + " |",
    ]
    lines += [
        f"| {name} | " + " | ".join(f"{values[key]:.4f}" for key in keys) + " |" for name, values in summary.items()
    ]
    lines += ["", "![AUC per window](auc.png)", "", "![log loss per window](log_loss.png)", ""]
    lines += ["![per-entity AUC](per_entity_auc.png)", ""]
    return "\n".join(lines)


def _replay(job: Job) -> int:
    args = job.arguments
    files = sorted(path for path in Path(args.stream).iterdir() if path.name.startswith("part-"))
    report = replay(
        job.spark,
        job.config,
        files,
        Path(args.out),
        train_files=args.train_files,
        deltas=[float(d) for d in args.deltas.split(",")],
        ideal=not args.no_ideal,
    )
    print(json.dumps(report["summary"], indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("Replay a time-ordered stream: predict, then learn, per window.", "replay")
    parser.add_argument("--stream", required=True, help="folder of time-ordered files, one window each")
    parser.add_argument("--out", required=True, help="folder for the tables, replay.json, the plots and summary.md")
    parser.add_argument("--train-files", type=int, default=4, help="windows that train the first generation")
    parser.add_argument("--deltas", default="0.8", help="forgetting factors of the nearline variants, comma separated")
    parser.add_argument("--no-ideal", action="store_true", help="skip the retrained-every-window variant")
    return run_job(parser, _replay, argv)


if __name__ == "__main__":
    sys.exit(main())
