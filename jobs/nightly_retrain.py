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

from jobs.game.coordinate_descent import coordinate_descent
from jobs.game.generation import current_generation, next_generation_number, publication_guard, publish
from jobs.game.model import Coordinates
from jobs.game.training_data import ingested_batches, training_cutoff, training_data
from jobs.game.validation import non_finite, validate
from jobs.runtime.cli import Job, job_parser, run_job
from jobs.runtime.faults import crash_point
from jobs.runtime.settings import Config
from jobs.runtime.timing import timed
from jobs.storage.lease import TableLease
from jobs.storage.schemas import create_tables, metrics_row
from jobs.storage.store import Guard, TableStore, open_store

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
    """One nightly run on the tables in ``store``; every outcome gets one metrics row (a failure too)."""
    create_tables(store, config.model, deletion_vectors=config.storage.deletion_vectors)
    with TableLease(store, "nightly", config.nightly.lease_minutes, config.nightly.lease_wait_minutes) as lease:
        try:
            report = _train_and_publish(store, config, force_publish, lease)
        except Exception as error:
            # On-call sees the failure in the metrics too; a rerun is a new run with a row of its own.
            _record(store, config, NightlyReport("failed", reason=f"{type(error).__name__}: {error}"[:2000]))
            raise
        _record(store, config, report)
    return report


def _train_and_publish(store: TableStore, config: Config, force_publish: bool, lease: TableLease) -> NightlyReport:
    seconds: dict[str, float] = {}
    batches = ingested_batches(store, config.nearline.app_id)
    if not batches:
        LOG.info("no events yet: nothing to train")
        return NightlyReport("empty_window", reason="the events table is empty")
    cutoff, anchor = training_cutoff(batches, config)
    if cutoff is None:
        reason = "no event yet" if anchor is None else "every ingested batch has events in the hold-out"
        return NightlyReport("empty_window", None, batches[-1].batch_id, reason=reason)
    current = current_generation(store, config.model)
    if current is not None and current.cutoff_batch_id >= cutoff:
        LOG.info("generation %d already covers batch %d", current.number, cutoff)
        recover_publication_row(store, config)
        return NightlyReport("already_published", current.number, cutoff, reason="no batch since the last generation")

    with timed("read", seconds, LOG):
        data = training_data(store, batches, cutoff, anchor, config)
        training_rows, holdout_rows = data.training.count(), data.holdout.count()
        LOG.info("cutoff batch %d: %d training rows, %d hold-out rows", cutoff, training_rows, holdout_rows)
    if training_rows == 0:
        return NightlyReport("empty_window", None, cutoff, reason="no training events in the window")

    with timed("train", seconds, LOG):
        coordinates = Coordinates.of(config, config.nightly.buckets, config.nightly.seed)
        models = coordinate_descent(data.training, coordinates, config.nightly.passes)
        fixed_effect = models.pop("fixed")
        entities = {name: model.coefficients.count() for name, model in models.items()}
        LOG.info("trained random effects: %s", entities)

    with timed("validate", seconds, LOG):
        coefficients = {name: model.coefficients for name, model in models.items()}
        validation, publishing, reason = validate(data.holdout, config, store, current, fixed_effect, coefficients)
        problem = non_finite(validation, fixed_effect, coefficients)
    if problem is not None:
        # Never published, forced or not: a generation of NaNs would poison every live model.
        publishing, reason = False, problem
    elif force_publish or config.nightly.force_publish:
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
            lease.check()
            publish(store, config, number, cutoff, fixed_effect, models, report=asdict(report))
            LOG.info("published generation %d (cutoff batch %d)", number, cutoff)
    crash_point("nightly:after_publish")
    data.training.unpersist()
    return report


def recover_publication_row(store: TableStore, config: Config) -> None:
    """The current generation's metrics row, written from its publication if a killed run never wrote it."""
    published = store.last_guarded_commit("fixed_effect", config.nightly.app_id)
    if published is None or store.applied("metrics", published.guard):
        return
    report = published.guard.facts.get("report")
    if report is not None:
        LOG.info("generation %s was published without its metrics row: writing it", report.get("generation"))
        _record(store, config, NightlyReport(**report))


def _record(store: TableStore, config: Config, report: NightlyReport) -> None:
    """The run's metrics row, once: a rerun with the same outcome on the same cutoff writes nothing."""
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
    store.append("metrics", row, guard=outcome_guard(config, report.status, report.generation, report.cutoff_batch_id))


def outcome_guard(config: Config, status: str, generation: int | None, cutoff: int | None) -> Guard | None:
    """The publication's guard if published; one per (outcome, cutoff) for the others; none for a failure."""
    if status == "published":
        return publication_guard(config, generation, cutoff)
    if status == "failed":
        return None
    return Guard(f"{config.nightly.app_id}/{status}", 0 if cutoff is None else cutoff + 1)


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
