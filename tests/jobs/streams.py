"""Generated streams ingested into real Delta tables: shared by the job tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from jobs.runtime.config import load_config
from jobs.runtime.settings import Config
from jobs.simulate.spec import GroundTruth, RandomEffectSpec, StreamSpec
from jobs.simulate.writers import generate
from jobs.storage.ingest import ingest_batch
from jobs.storage.schemas import create_tables
from jobs.storage.store import TableStore, open_store


@dataclass
class IngestedStream:
    truth: GroundTruth
    config: Config
    store: TableStore
    folder: Path


def stream_spec(**overrides) -> StreamSpec:
    """Two random-effect types as in conf/base.yaml, small enough for a test."""
    settings = {
        "random_effects": (
            RandomEffectSpec("per_member", "member_id", "member", entities=40, features=3),
            RandomEffectSpec("per_item", "item_id", "item", entities=15, features=3),
        ),
        "events": 12_000,
        "slices": 8,
        "global_features": 4,
        "base_rate": 0.3,
        "drift": 0.0,
        "new_entity_rate": 0.0,
        "seed": 11,
    }
    return StreamSpec(**{**settings, **overrides})


def config_for(folder: Path, *overrides: str) -> Config:
    return load_config(
        Path(__file__).resolve().parents[2] / "conf" / "local.yaml",
        [
            f"storage.root={folder / 'tables'}",
            "nightly.entity_buckets=4",
            "nearline.entity_buckets=4",
            # A killed nightly run blocks the next for this long: the crash tests rerun at once.
            "nightly.lease_minutes=0.05",
            *overrides,
        ],
    )


def stream_config(folder, landing, *overrides: str) -> Config:
    """Local settings reading ``landing`` one file per micro-batch, everything else under ``folder``."""
    return config_for(
        folder,
        f"stream.path={landing}",
        f"stream.checkpoint={folder / 'checkpoint'}",
        "stream.trigger=available_now",
        "stream.max_files_per_trigger=1",
        *overrides,
    )


def ingest_stream(spark, folder: Path, spec: StreamSpec, *overrides: str, files: int | None = None) -> IngestedStream:
    """Generate ``spec`` under ``folder`` and ingest its first ``files`` landing files, one micro-batch each."""
    truth = generate(spec, folder)
    config = config_for(folder, *overrides)
    store = open_store(spark, config.storage)
    create_tables(store, config.model)
    stream = IngestedStream(truth, config, store, folder)
    ingest_files(spark, stream, landing_files(stream)[:files], first_batch_id=0)
    return stream


def landing_files(stream: IngestedStream) -> list[Path]:
    return sorted(stream.truth.landing.glob("part-*"))


def ingest_files(spark, stream: IngestedStream, files: list[Path], first_batch_id: int) -> None:
    for batch_id, path in enumerate(files, start=first_batch_id):
        ingest_batch(stream.store, stream.config, spark.read.text(str(path)), batch_id)


def update_on_files(spark, updater, files: list[Path], first_batch_id: int = 0) -> None:
    """Each landing file as one nearline micro-batch, in order, through ``updater`` (a ``NearlineUpdater``)."""
    for batch_id, path in enumerate(files, start=first_batch_id):
        updater.process(spark.read.text(str(path)), batch_id)


def truth_coefficients(truth: GroundTruth) -> tuple[dict, pd.DataFrame]:
    """The fixed effect's true coefficients by (name, term), and every entity's at every slice."""
    fixed = json.loads((truth.truth / "fixed_effect.json").read_text())
    coefficients = {(c["name"], c["term"]): c["value"] for c in fixed["coefficients"]}
    return coefficients, pd.read_parquet(truth.truth / "entities.parquet")


def rmse(errors) -> float:
    return float(np.sqrt(np.mean(np.square(errors))))
