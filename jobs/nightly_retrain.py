"""The nightly batch job: retrain the fixed effect and the random effects, validate, publish a generation.

    python -m jobs.nightly_retrain --config conf/local.yaml [--set key=value ...] [--force-publish]
    spark-submit jobs/nightly_retrain.py --config conf/cluster.yaml

1. Read the events up to the *cutoff* (the last micro-batch ingested) within the window.
2. Coordinate descent (``jobs.game.coordinate_descent``): the fixed effect with the random effects'
   scores as offset, then each random-effect type with the fixed effect and the other types as offset.
3. Validate on the hold-out (the last hours of the window) against the current generation.
4. Publish generation g+1 (priors first, the fixed effect last: the commit point), each
   write guarded so a rerun of the same night publishes nothing twice.

docs/nightly.md describes the job; docs/math.md the random-effect objective.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs.game.coordinate_descent import coordinate_descent
from jobs.game.generation import current_generation, next_generation_number, publication_guard, publish
from jobs.game.model import Coordinates
from jobs.game.training_data import training_window
from jobs.game.validation import validate
from jobs.runtime.cli import Job, job_parser, run_job
from jobs.runtime.faults import crash_point
from jobs.runtime.settings import Config
from jobs.runtime.timing import timed
from jobs.storage.schemas import metrics_row, table_schemas
from jobs.storage.store import TableStore, open_store

LOG = logging.getLogger("lambda_learner.nightly")


@dataclass
class NightlyReport:
    """What a run did; ``status`` is published, kept (the gate said no), already_published or empty_window."""

    status: str
    generation: int | None = None
    cutoff_batch_id: int | None = None
    training_rows: int = 0
    holdout_rows: int = 0
    entities: dict[str, int] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


def run_nightly(
    spark: SparkSession, store: TableStore, config: Config, *, force_publish: bool = False
) -> NightlyReport:
    """One nightly run on the tables in ``store``."""
    seconds: dict[str, float] = {}
    for name, schema in table_schemas(config.model).items():
        store.create(name, schema)
    events = store.read("events")
    cutoff = events.agg(F.max("batch_id")).first()[0]
    if cutoff is None:
        LOG.info("no events yet: nothing to train")
        return NightlyReport("empty_window", reason="the events table is empty")
    current = current_generation(store, config.model)
    if current is not None and current.cutoff_batch_id >= cutoff:
        LOG.info("generation %d already covers batch %d", current.number, cutoff)
        return NightlyReport("already_published", current.number, cutoff, reason="no batch since the last generation")

    with timed("read", seconds, LOG):
        training, holdout = training_window(events.where(F.col("batch_id") <= cutoff), config)
        training_rows, holdout_rows = training.count(), holdout.count()
        LOG.info("cutoff batch %d: %d training rows, %d hold-out rows", cutoff, training_rows, holdout_rows)
    if training_rows == 0:
        return NightlyReport("empty_window", None, cutoff, reason="no training events in the window")

    with timed("train", seconds, LOG):
        coordinates = Coordinates.of(config, config.nightly.buckets, config.nightly.seed)
        models = coordinate_descent(training, coordinates, config.nightly.passes)
        fixed_effect = models.pop("fixed")
        entities = {name: model.coefficients.count() for name, model in models.items()}
        LOG.info("trained random effects: %s", entities)

    with timed("validate", seconds, LOG):
        coefficients = {name: model.coefficients for name, model in models.items()}
        validation, publishing, reason = validate(holdout, config, store, current, fixed_effect, coefficients)
    if force_publish or config.nightly.force_publish:
        publishing, reason = True, f"forced ({reason})" if reason else "forced"
    number = next_generation_number(store, config, current)
    report = NightlyReport(
        "published" if publishing else "kept",
        number if publishing else (None if current is None else current.number),
        cutoff,
        training_rows,
        holdout_rows,
        entities,
        validation,
        reason,
        seconds,
    )
    crash_point("nightly:before_publish")
    with timed("publish", seconds, LOG):
        if publishing:
            publish(store, config, number, cutoff, fixed_effect, models)
            LOG.info("published generation %d (cutoff batch %d)", number, cutoff)
        _record(store, config, report)
    training.unpersist()
    return report


def _record(store: TableStore, config: Config, report: NightlyReport) -> None:
    values = {"training_rows": float(report.training_rows), "holdout_rows": float(report.holdout_rows)}
    values |= {f"entities.{name}": float(count) for name, count in report.entities.items()}
    values |= {key: float(value) for key, value in report.validation.items()}
    values |= {f"seconds.{stage}": value for stage, value in report.seconds.items()}
    row = metrics_row(
        store.spark,
        "nightly",
        f"nightly-{report.cutoff_batch_id}",
        report.cutoff_batch_id,
        report.generation,
        report.status,
        values,
        report.reason,
    )
    published = report.status == "published"
    guard = publication_guard(config, report.generation, report.cutoff_batch_id) if published else None
    store.append("metrics", row, guard=guard)


def _nightly(job: Job) -> int:
    report = run_nightly(
        job.spark, open_store(job.spark, job.config.storage), job.config, force_publish=job.arguments.force_publish
    )
    print(json.dumps(asdict(report), sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("Retrain the fixed and random effects; publish a model generation.", "nightly_retrain")
    parser.add_argument("--force-publish", action="store_true", help="publish even if the gate says no")
    return run_job(parser, _nightly, argv)


if __name__ == "__main__":
    sys.exit(main())
