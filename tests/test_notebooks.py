"""The notebooks, run locally cell by cell (as Databricks would, minus ``dbutils`` and ``display``) on real tables."""

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from jobs.nearline_update import NearlineUpdater
from jobs.nightly_retrain import NightlyReport, run_nightly
from jobs.runtime.notebooks import ENVIRONMENT_PREFIX
from jobs.runtime.settings import Config
from jobs.simulate.spec import GroundTruth
from jobs.simulate.writers import generate
from jobs.storage.store import TableStore, open_store
from tests.jobs.streams import config_for, stream_spec

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
HEADER = "# Databricks notebook source\n"
SEPARATOR = "\n\n# COMMAND ----------\n\n"
# Four one-hour files: two micro-batches, the nightly run (its last half hour held out: it trains on the
# first batch, the only one wholly before the hold-out), two more batches.
FILES = 4
BATCHES_BEFORE_NIGHTLY = 2


@dataclass
class Tables:
    truth: GroundTruth
    config: Config
    store: TableStore
    nightly: NightlyReport


@pytest.fixture(scope="module")
def tables(spark, tmp_path_factory) -> Tables:
    folder = tmp_path_factory.mktemp("notebooks")
    truth = generate(stream_spec(events=1600, slices=FILES, bad_event_rate=0.03), folder / "stream")
    config = config_for(folder, "nightly.holdout_hours=0.5", "nightly.passes=1")
    store = open_store(spark, config.storage)
    updater = NearlineUpdater(config)
    nightly = None
    for batch_id, path in enumerate(sorted(truth.landing.glob("part-*"))):
        if batch_id == BATCHES_BEFORE_NIGHTLY:
            nightly = run_nightly(spark, store, config)
        updater.process(spark.read.text(str(path)), batch_id)
    return Tables(truth, config, store, nightly)


def notebook(name: str) -> Path:
    return ROOT / "notebooks" / name


def code_cells(path: Path) -> list[str]:
    """The notebook's cells without their markdown (``# MAGIC``) lines; markdown-only cells come out empty."""
    cells = path.read_text().removeprefix(HEADER).split(SEPARATOR)
    return ["\n".join(line for line in cell.splitlines() if not line.startswith("# MAGIC")) for cell in cells]


def run_notebook(path: Path, spark, monkeypatch, **parameters: str) -> dict:
    """Every code cell in one namespace holding only ``spark``; parameters go in as environment variables."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for name, value in parameters.items():
        monkeypatch.setenv(ENVIRONMENT_PREFIX + name.upper(), value)
    namespace = {"spark": spark, "__name__": "__main__"}
    for number, cell in enumerate(code_cells(path)):
        exec(compile(cell, f"{path.name} (cell {number})", "exec"), namespace)
    return namespace


def table_parameters(tables: Tables) -> dict[str, str]:
    return {"config": str(ROOT / "conf" / "local.yaml"), "storage_root": tables.config.storage.root}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_every_notebook_is_in_databricks_source_format(path):
    text = path.read_text()
    assert text.startswith(HEADER)
    cells = text.removeprefix(HEADER).rstrip("\n").split(SEPARATOR)
    assert len(cells) > 1
    for cell in cells:
        assert cell.strip() and "# COMMAND" not in cell, "a cell separator without a blank line on each side"
        if cell.startswith("# MAGIC"):
            assert cell.startswith("# MAGIC %md\n")
            assert all(line == "# MAGIC" or line.startswith("# MAGIC ") for line in cell.splitlines())
        else:
            compile(cell, path.name, "exec")


def test_the_explore_notebook_counts_what_the_jobs_wrote(spark, monkeypatch, tables):
    result = run_notebook(notebook("01_explore_events.py"), spark, monkeypatch, **table_parameters(tables))
    store, random_effects = tables.store, tables.config.model.random_effects
    nearline = {
        row.batch_id: row["values"]
        for row in store.read("metrics").where(F.col("job") == "nearline").select("batch_id", "values").collect()
    }

    per_batch = result["per_batch"]
    assert per_batch["batch_id"].tolist() == list(range(FILES))
    assert per_batch["events"].tolist() == [nearline[batch]["rows_valid"] for batch in range(FILES)]

    reasons = dict(zip(result["reasons"]["reason"], result["reasons"]["count"], strict=True))
    bad_events = (tables.truth.truth / "bad_events.jsonl").read_text().splitlines()
    assert reasons == Counter(json.loads(line)["reason"] for line in bad_events)
    sample = result["rejected_sample"].toPandas()
    assert set(sample["reason"]) == set(reasons)
    assert sample.groupby("reason").size().max() <= 2

    summary = result["entity_summary"].set_index("re_type")
    events = store.read("events")
    for r in random_effects:
        assert summary.loc[r.name, "events"] == per_batch["events"].sum()
        assert summary.loc[r.name, "entities"] == events.select(r.entity_column).distinct().count()
        assert result["top_entities"][r.name]["count"].iloc[0] == summary.loc[r.name, "max"]

    batch_metrics = result["batch_metrics"]
    assert batch_metrics["batch_id"].tolist() == list(range(FILES))
    assert batch_metrics["status"].tolist() == ["updated"] * BATCHES_BEFORE_NIGHTLY + ["rebased", "updated"]
    assert np.isfinite(batch_metrics[["loss_before", "loss_after"]].to_numpy()).all()
    for r in random_effects:
        entities = events.groupBy("batch_id").agg(F.countDistinct(r.entity_column).alias("n")).orderBy("batch_id")
        assert batch_metrics[f"entities_updated.{r.name}"].tolist() == [row.n for row in entities.collect()]


def test_the_generation_notebook_follows_one_entity_through_time_travel(spark, monkeypatch, tables):
    versions = 3
    result = run_notebook(
        notebook("02_inspect_generation.py"), spark, monkeypatch, versions=str(versions), **table_parameters(tables)
    )
    store = tables.store

    assert tables.nightly.status == "published"
    assert result["generation"].number == 1
    assert result["generation"].cutoff_batch_id == BATCHES_BEFORE_NIGHTLY - 2
    published = store.read("fixed_effect").orderBy("name", "term").toPandas()
    assert result["fixed_effect"][["name", "term"]].values.tolist() == published[["name", "term"]].values.tolist()
    assert np.allclose(result["fixed_effect"]["mean"], published["mean"])
    priors = {row.re_type: row["count"] for row in store.read("re_priors").groupBy("re_type").count().collect()}
    assert dict(zip(result["priors"]["re_type"], result["priors"]["entities"], strict=True)) == priors
    nightly = result["nightly"]
    assert nightly["status"].tolist() == ["published"]
    assert nightly["note"].tolist() == ["first generation"]
    assert nightly["training_rows"].iloc[0] == tables.nightly.training_rows
    assert not any(column.startswith("seconds.") for column in nightly.columns)

    state = store.read("re_state")
    chosen = state.where((F.col("re_type") == result["re_type"]) & (F.col("entity_id") == result["entity"])).first()
    assert chosen is not None and chosen.updates == state.agg(F.max("updates")).first()[0]

    # The same entity read straight from the Delta log by delta-rs, in the newest versions.
    path = store.path("re_state")
    newest = DeltaTable(path).version()
    intercepts = {}
    for version in range(newest - versions + 1, newest + 1):
        rows = DeltaTable(path, version=version).to_pyarrow_table().to_pylist()
        for row in rows:
            if (row["re_type"], row["entity_id"]) == (result["re_type"], result["entity"]):
                intercepts[version] = next(c["mean"] for c in row["coefficients"] if c["name"] == "intercept")
    means = result["means"]
    assert means.index.tolist() == sorted(intercepts)
    assert np.allclose(means["intercept:intercept"].to_numpy(), [intercepts[v] for v in sorted(intercepts)])
    generations = result["history"].drop_duplicates("version")["generation"]
    assert generations.isna().any() and (generations == 1).any(), "the history spans the rebase on generation 1"


def test_the_replay_notebook_writes_its_report_and_plots(spark, monkeypatch, tables, tmp_path):
    out = tmp_path / "replay"
    result = run_notebook(
        notebook("03_replay.py"),
        spark,
        monkeypatch,
        config=str(ROOT / "conf" / "local.yaml"),
        overrides="nearline.entity_buckets=4; nightly.entity_buckets=4; nightly.passes=1",
        stream=str(tables.truth.landing),
        out=str(out),
        train_files=str(FILES - 1),
        deltas="0.8",
        ideal="false",
    )

    written = json.loads((out / "replay.json").read_text())
    assert [window["window"] for window in written["windows"]] == [FILES - 1]
    assert [window["window"] for window in result["report"]["windows"]] == [FILES - 1]
    assert set(written["summary"]) == {"fixed_effect", "stale", "nearline_delta_0.8"}
    assert [path.name for path in result["plots"]] == ["auc.png", "log_loss.png", "per_entity_auc.png"]
    for path in result["plots"]:
        assert path.read_bytes().startswith(b"\x89PNG")
    assert result["summary"] == (out / "summary.md").read_text()
    assert "nearline_delta_0.8" in result["summary"]
