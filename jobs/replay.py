"""Replay evaluation: the Lambda Learner experiment on a time-ordered stream, predict then learn, window by window.

    python -m jobs.replay --config conf/local.yaml --stream var/demo/stream/landing --out var/replay \\
        [--train-files 4] [--deltas 0.5,0.8,1.0] [--no-ideal]

The first ``--train-files`` files (time windows) train a nightly generation. ``--stream`` is a folder
of ``part-*`` files or a folder ``jobs.generate`` wrote (its ``landing/``). Then each later
window is scored before anything learns from it, by

- ``fixed_effect``: that generation's fixed effect alone;
- ``stale``: that generation (fixed effect and random-effect priors), never updated;
- ``nearline_delta_<d>``: the same generation, updated by the nearline job on every window
  since, with forgetting factor d;
- ``ideal``: a batch model retrained by the nightly job on all data up to the window
  (what a nightly run every window would give; affordable on small data only);

and then the windows are learnt from. Every variant runs the real jobs on its own tables
(``jobs.evaluate.variants``); the freshness curve (``jobs.freshness``) is the same experiment with
micro-batches of N minutes instead of windows. Out come ``replay.json`` (per window and variant:
AUC, log loss, per-entity AUC), ``auc.png``, ``log_loss.png``, ``per_entity_auc.png`` and ``summary.md``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pyspark.sql import SparkSession

from jobs.evaluate import figures
from jobs.evaluate.plots import replay_plots
from jobs.evaluate.streams import GeneratedStream, file_steps, read_raw
from jobs.evaluate.variants import Jobs, Variant, copy_tables, first_generation, run_variant, with_delta
from jobs.nearline_update import NearlineUpdater
from jobs.nightly_retrain import run_nightly
from jobs.runtime.cli import Job, job_parser, run_job
from jobs.runtime.settings import Config

LOG = logging.getLogger("lambda_learner.replay")
JOBS = Jobs(
    nearline=lambda config: NearlineUpdater(config).process,
    nightly=lambda spark, store, config: run_nightly(spark, store, config, force_publish=True),
)


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
    files = list(files)
    LOG.info("training the first generation on %d windows", train_files)
    base = first_generation(spark, config, out / "tables" / "base", read_raw(spark, files[:train_files]), JOBS)
    steps = file_steps(spark, files[train_files:], config)
    variants = [Variant("fixed_effect", base, steps, random_effects=False), Variant("stale", base, steps)]
    for delta in deltas:
        tables = copy_tables(base, out / "tables" / f"delta-{delta:g}", with_delta(config, delta))
        variants.append(Variant(f"nearline_delta_{delta:g}", tables, steps, nearline=True))
    if ideal:
        variants.append(Variant("ideal", copy_tables(base, out / "tables" / "ideal", config), steps, retrain_every=1))

    entities = [r.entity_column for r in config.model.random_effects[:1]]
    scores = {variant.name: run_variant(spark, variant, JOBS) for variant in variants}
    windows = []
    for step, path in enumerate(files[train_files:]):
        window = {"window": train_files + step, "file": path.name, "variants": {}}
        for name, scored in scores.items():
            figures_of_window = figures.figures(config, scored[scored["step"] == step], entities)
            window["events"] = figures_of_window.pop("events")
            window["variants"][name] = figures_of_window
        LOG.info(
            "window %d: %s", window["window"], {n: round(v.get("auc", 0.0), 4) for n, v in window["variants"].items()}
        )
        windows.append(window)
    entity_aucs = {name: figures.entity_aucs(config, scored, entities) for name, scored in scores.items()}
    report = {"train_windows": train_files, "windows": windows, "summary": _summary(windows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(figures.to_json(report))
    replay_plots(windows, entity_aucs, out)
    (out / "summary.md").write_text(_markdown(report))
    return report


def _summary(windows: list[dict]) -> dict:
    names = list(windows[0]["variants"]) if windows else []
    return {name: figures.means([w["variants"][name] for w in windows]) for name in names}


def _markdown(report: dict) -> str:
    summary = report["summary"]
    keys = [key for key in figures.KEYS if key in next(iter(summary.values()))]
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
    report = replay(
        job.spark,
        job.config,
        GeneratedStream.at(args.stream).files,
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
