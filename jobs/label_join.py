"""The label join: impressions and clicks in, labelled training events out, exactly once (docs/label_join.md).

    python -m jobs.label_join --config conf/local.yaml [--set key=value ...]
    spark-submit jobs/label_join.py --config conf/cluster.yaml

One Structured Streaming query reads the impressions stream and the clicks stream (``label_join.impressions``,
``label_join.clicks``: landing files, Kafka, Auto Loader or Delta) as one; ``foreachBatch`` joins each micro-batch
against the pending impressions it keeps in a Delta table of its own. An impression clicked within the attribution
window is a positive at once; one whose window the clicks' watermark has passed is a negative (optionally
down-sampled, weighted back). Labelled events are appended to ``label_join.output_table`` in the event format the
nearline job reads (``stream.source: delta`` on that table); late, orphan and duplicate clicks go to
``label_join.quarantine_table`` with their reason. Batches are numbered across checkpoints as the nearline job's
are, and every write is guarded by ``(label_join.app_id, batch number)``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pyspark.sql import SparkSession

from jobs.labels.inputs import read_arrivals, stream_settings
from jobs.labels.joiner import LabelJoiner
from jobs.runtime.cli import Job, job_parser, run_job
from jobs.runtime.settings import Config
from jobs.streaming.runner import StoppableBatches, run_until_stopped, start

QUERY_NAME = "lambda-learner-label-join"


def run_label_join(spark: SparkSession, config: Config) -> None:
    """Start the query and run it until it ends (available-now) or is told to stop."""
    join = config.label_join
    batches = StoppableBatches(LabelJoiner(config, stream_id=None))
    query = start(read_arrivals(spark, config), batches, stream_settings(join.impressions, join), QUERY_NAME)
    run_until_stopped(query, batches)


def _label_join(job: Job) -> int:
    run_label_join(job.spark, job.config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("Join impressions and clicks into labelled training events.", "label_join")
    return run_job(parser, _label_join, argv)


if __name__ == "__main__":
    sys.exit(main())
