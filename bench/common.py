"""What the Spark benchmarks share: one random-effect type on local settings, tables under a folder."""

from __future__ import annotations

from pathlib import Path

from jobs.runtime.config import load_config
from jobs.runtime.settings import Config

ROOT = Path(__file__).resolve().parents[1]


def settings(tables: Path, *extra: str) -> Config:
    """conf/local.yaml with one random-effect type (per_member), tables under ``tables``, 8 shuffle partitions."""
    return load_config(
        ROOT / "conf" / "local.yaml",
        [
            f"storage.root={tables}",
            "model.random_effects=[{name: per_member, entity_column: member_id, feature_bag: member}]",
            "spark.shuffle_partitions=8",
            *extra,
        ],
    )
