"""The freshness curve: what updating the random effects more often buys, on one time-ordered stream.

    python -m jobs.freshness --config conf/local.yaml --out var/freshness \\
        [--intervals 1,5,15,60,1440] [--nightly-minutes 1440] [--no-ideal] \\
        [--stream var/stream | --events 30000 --slices 15 --train-files 12 --seed 7 ...]

The first ``--train-files`` slices of the stream (generated under ``--out/stream`` unless ``--stream``
names one) train the nightly generation every variant starts from. The events after that cutoff
are then cut, by event time, into micro-batches of N minutes from the cutoff on, for each N of
``--intervals``; predict then learn: each micro-batch is scored by the model as of the last update
before it, then learnt from:

- N below ``--nightly-minutes``: the nearline job updates on every micro-batch (and the nightly job
  retrains every ``--nightly-minutes``, if the stream lasts that long: the system as deployed);
- N at or above it: the nightly job alone, every N minutes (``1440``: once a day, the nightly only;
  within the day after a nightly run that is the stale model);
- ``stale``: the generation, never updated; ``ideal``: a nightly retrain every window (slice) of the
  stream, which no one can afford on real data.

Every variant runs the real jobs on its own copy of the tables (``jobs.evaluate.variants``).
Figures are over every event after the cutoff, and over the cold start: the events of an entity
born after the cutoff (no prior in the generation); per-entity AUC is the mean AUC of the entities
of every type (of the new ones for the cold start). Out come ``freshness.json``, ``freshness.md``
(the table) and ``freshness.png`` (the plot).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs.evaluate import figures
from jobs.evaluate.plots import freshness_plot, interval_label
from jobs.evaluate.streams import (
    MICROS,
    GeneratedStream,
    Timeline,
    add_stream_arguments,
    read_raw,
    stream_from_arguments,
)
from jobs.evaluate.variants import (
    Variant,
    copy_tables,
    first_generation,
    prior_entities,
    run_variant,
)
from jobs.replay import JOBS
from jobs.runtime.cli import Job, job_parser, run_job
from jobs.runtime.settings import Config
from jobs.simulate.spec import MICROS_PER_MINUTE

LOG = logging.getLogger("lambda_learner.freshness")
DAY = 1440.0


def freshness(
    spark: SparkSession,
    config: Config,
    stream: GeneratedStream,
    out: Path,
    *,
    train_files: int,
    intervals: Sequence[float] = (1, 5, 15, 60, DAY),
    nightly_minutes: float = DAY,
    ideal: bool = True,
    base: Config | None = None,
) -> dict:
    """Run the experiment; return (and write) its figures.

    ``base``: the settings of tables already holding the first generation (trained on the first
    ``train_files`` files, e.g. by ``jobs.evaluate.variants.first_generation``): copied, not retrained.
    """
    files = stream.files
    if not 0 < train_files < len(files):
        raise ValueError(f"--train-files must be between 1 and {len(files) - 1}, got {train_files}")
    if not intervals or min(intervals) <= 0:
        raise ValueError(f"--intervals must be minutes above 0; got {list(intervals)}")
    origin = stream.slice_start(train_files) if stream.truth else None
    window = stream.spec().slice_minutes if stream.truth else 60.0
    if base is None:
        LOG.info("training the first generation on %d slices", train_files)
        base = first_generation(spark, config, out / "tables" / "base", read_raw(spark, files[:train_files]), JOBS)
    known = prior_entities(spark, base)
    timeline = Timeline.of(spark, files[train_files:], config, origin)
    span = timeline.events.agg(F.max(MICROS)).first()[0] - timeline.origin
    horizon = span // MICROS_PER_MINUTE + 1

    def copy(name: str) -> Config:
        return copy_tables(base, out / "tables" / name, config)

    nightly = round(nightly_minutes * MICROS_PER_MINUTE)
    points = []
    for minutes in sorted(set(intervals)):
        steps = timeline.steps(minutes)
        nightly_only = minutes >= nightly_minutes
        name = (
            f"nightly_every_{interval_label(minutes)}" if nightly_only else f"nearline_every_{interval_label(minutes)}"
        )
        variant = Variant(
            name,
            copy(name),
            steps,
            nearline=not nightly_only,
            retrain_every=steps.length if nightly_only else nightly,
        )
        points.append(_point(spark, config, variant, known) | {"minutes": minutes, "nightly_only": nightly_only})
    references = {"stale": _point(spark, config, Variant("stale", base, timeline.steps(horizon + 1)), known)}
    if ideal:
        steps = timeline.steps(window)
        variant = Variant("ideal", copy("ideal"), steps, retrain_every=steps.length)
        references["ideal"] = _point(spark, config, variant, known) | {"minutes": window}

    report = {
        "train_slices": train_files,
        "horizon_minutes": horizon,
        "events": points[0]["all"]["events"],
        "cold_start_events": points[0]["cold_start"]["events"],
        "nightly_minutes": nightly_minutes,
        "intervals": points,
        "references": references,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "freshness.json").write_text(figures.to_json(report))
    freshness_plot(report, out)
    (out / "freshness.md").write_text(markdown(report))
    return report


def _point(spark: SparkSession, config: Config, variant: Variant, known: dict[str, set[str]]) -> dict:
    """One variant's figures: all events and the cold start, with its cost."""
    began = time.perf_counter()
    scores = run_variant(spark, variant, JOBS)
    seconds = time.perf_counter() - began
    columns = list(known)
    cold = figures.cold_start(scores, known)
    point = {
        "variant": variant.name,
        "steps": len(variant.steps.numbers),
        "seconds": round(seconds, 1),
        "all": figures.figures(config, scores, columns),
        "cold_start": figures.figures(config, scores[cold], columns, known),
    }
    LOG.info(
        "%s: %d steps in %.0f s; AUC %.4f, cold start %.4f",
        variant.name,
        point["steps"],
        seconds,
        point["all"].get("auc", float("nan")),
        point["cold_start"].get("auc", float("nan")),
    )
    return point


def markdown(report: dict) -> str:
    keys = [key for key in figures.KEYS if key in report["intervals"][0]["all"]]
    header = ["update", "by", "updates"] + [f"{key}" for key in keys] + [f"cold start {key}" for key in keys]
    lines = [
        "# Freshness",
        "",
        f"{report['events']} events over {report['horizon_minutes']} minutes after the nightly cutoff "
        f"({report['cold_start_events']} of them of entities born after it), each scored by the model as of "
        "the last update before it.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]

    def row(label: str, by: str, point: dict) -> str:
        values = [f"{point[subset][key]:.4f}" for subset in ("all", "cold_start") for key in keys]
        return f"| {label} | {by} | {max(point['steps'] - 1, 0)} | " + " | ".join(values) + " |"

    for point in report["intervals"]:
        by = "nightly job only" if point["nightly_only"] else "nearline job"
        lines.append(row(f"every {interval_label(point['minutes'])}", by, point))
    references = report["references"]
    lines.append(row("never (stale)", "-", references["stale"]))
    if "ideal" in references:
        lines.append(
            row(
                f"retrained every {interval_label(references['ideal']['minutes'])} (ideal)",
                "nightly job",
                references["ideal"],
            )
        )
    lines += ["", "![freshness](freshness.png)", ""]
    return "\n".join(lines)


def _freshness(job: Job) -> int:
    args, out = job.arguments, Path(job.arguments.out)
    report = freshness(
        job.spark,
        job.config,
        stream_from_arguments(args, job.config, out),
        out,
        train_files=args.train_files,
        intervals=[float(m) for m in args.intervals.split(",")],
        nightly_minutes=args.nightly_minutes,
        ideal=not args.no_ideal,
    )
    print(markdown(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("The freshness curve: figures against the update interval.", "freshness")
    parser.add_argument("--out", required=True, help="folder for the stream, the tables, the figures and the plot")
    parser.add_argument("--intervals", default="1,5,15,60,1440", help="update intervals in minutes, comma separated")
    parser.add_argument("--nightly-minutes", type=float, default=DAY, help="the nightly job's period")
    parser.add_argument("--no-ideal", action="store_true", help="skip the retrained-every-window reference")
    add_stream_arguments(parser, events=30000, slices=15, train_files=12)
    return run_job(parser, _freshness, argv)


if __name__ == "__main__":
    sys.exit(main())
