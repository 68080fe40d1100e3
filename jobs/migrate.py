"""Bring the tables to the schema of a changed configuration: ``python -m jobs.migrate --config conf/x.yaml``.

Adding or removing a random-effect type (or a feature bag, or the outside score column) changes the
events table's columns, and every job then refuses to start, naming this command. It rewrites each
table whose columns differ in one new version (the old one stays in the table's history): columns the
configuration no longer has are dropped, new ones are added empty (null for the events already there,
which the new type then simply does not learn from). Stop the nearline job first; run it once.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

from pyspark.sql import functions as F
from pyspark.sql.types import StructField, StructType

from jobs.runtime.cli import Job, job_parser, run_job
from jobs.storage.schemas import PARTITIONING, table_schemas
from jobs.storage.store import TableStore, open_store, schema_difference

LOG = logging.getLogger("lambda_learner.migrate")


def migrate(store: TableStore, schemas: dict[str, StructType]) -> dict[str, str]:
    """Each table whose columns differ from ``schemas``, rewritten to them; what changed, by table."""
    changed = {}
    for name, wanted in schemas.items():
        if not store.exists(name):
            continue
        existing = store.schema(name)
        difference = schema_difference(existing, wanted)
        if difference is None:
            continue
        # New columns start empty, so they are nullable whatever the configuration's schema says.
        fields = [
            field if field.name in existing.fieldNames() else StructField(field.name, field.dataType)
            for field in wanted
        ]
        present = set(existing.fieldNames())
        frame = store.read(name).select(
            *[F.col(f.name) if f.name in present else F.lit(None).cast(f.dataType).alias(f.name) for f in fields]
        )
        store.replace(name, frame, StructType(fields), partition_by=PARTITIONING.get(name, ()))
        LOG.info("table %s rewritten: %s", name, difference)
        changed[name] = difference
    return changed


def _migrate(job: Job) -> int:
    changed = migrate(open_store(job.spark, job.config.storage), table_schemas(job.config.model))
    print(json.dumps({"migrated": changed}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("Rewrite the tables to the columns of a changed configuration.", "migrate")
    return run_job(parser, _migrate, argv)


if __name__ == "__main__":
    sys.exit(main())
