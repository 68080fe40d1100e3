"""The freshness curve and the bandit replay, end to end on a tiny generated stream."""

import json

import pytest
from pyspark.sql import functions as F

from jobs.bandit import bandit
from jobs.evaluate.bandit import POLICIES, InvertedVariances
from jobs.evaluate.streams import GeneratedStream, generated, read_raw
from jobs.evaluate.variants import evaluation_config, first_generation
from jobs.freshness import JOBS, freshness
from jobs.storage.store import open_store
from tests.jobs.streams import config_for, stream_spec


@pytest.fixture(scope="module")
def first(spark, tmp_path_factory):
    """Three hourly slices: two train the generation both evaluations start from, the third is predicted or played."""
    folder = tmp_path_factory.mktemp("freshness-bandit")
    stream = generated(stream_spec(events=2400, slices=3, drift=0.2, new_entity_rate=0.05, seed=5), folder / "stream")
    config = config_for(folder, "nightly.passes=1")
    base = first_generation(spark, config, folder / "base", read_raw(spark, stream.files[:2]), JOBS)
    return stream, config, base


def test_the_freshness_curve_scores_every_event_once_per_interval_before_learning_from_it(spark, first, tmp_path):
    stream, config, base = first
    out = tmp_path / "freshness"
    report = freshness(
        spark, config, stream, out, train_files=2, intervals=[20, 60], nightly_minutes=60, ideal=False, base=base
    )

    for name in ("freshness.json", "freshness.md", "freshness.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "freshness.json").read_text())["events"] == report["events"]
    nearline, nightly = report["intervals"]
    assert (nearline["variant"], nearline["steps"]) == ("nearline_every_20m", 3)
    assert (nightly["variant"], nightly["steps"]) == ("nightly_every_1h", 1)
    stale = report["references"]["stale"]
    # Every variant scores the same events, the cold start among them.
    assert report["events"] == nearline["all"]["events"] == stale["all"]["events"] > 700
    assert 0 < report["cold_start_events"] == nearline["cold_start"]["events"] < report["events"]
    # Within the hour after the nightly run, the nightly-only model is the stale one, event for event.
    for subset in ("all", "cold_start"):
        for key in ("events", "auc", "log_loss"):
            assert nightly[subset][key] == stale[subset][key]
    assert nearline["all"]["log_loss"] != stale["all"]["log_loss"]


def test_the_bandit_replay_plays_every_policy_on_the_same_requests_and_random_regrets_more_than_greedy(
    spark, first, tmp_path
):
    stream, config, base = first
    out = tmp_path / "bandit"
    report = bandit(
        spark,
        config,
        GeneratedStream.at(stream.landing),
        out,
        train_files=2,
        policies=POLICIES,
        rounds_per_slice=2,
        requests=60,
        candidates=6,
        top_k=2,
        seed=3,
        base=base,
    )

    for name in ("bandit.json", "bandit.md", "bandit.png"):
        assert (out / name).stat().st_size > 0, name
    summary = report["summary"]
    assert set(summary) == set(POLICIES)
    assert all(len(rounds) == 2 for rounds in report["rounds"].values())
    oracle = {s["all"]["oracle_clicks"] for s in summary.values()}
    assert len(oracle) == 1  # the same requests and candidates for every policy
    for s in summary.values():
        assert s["all"]["requests"] == 120 and s["all"]["shown"] == 240
        assert 0 <= s["all"]["regret"] <= s["all"]["oracle_clicks"]
    # Truth-aware regret: the model's means beat choosing at random by far.
    assert summary["random"]["all"]["regret"] > 1.5 * summary["greedy"]["all"]["regret"]
    # Every learning policy fed its one round of feedback (the last round's is never learnt) to its nearline job.
    for policy in ("greedy", "thompson", "thompson_inverted"):
        assert (out / "feedback" / f"{policy}-0000.json").exists()
        assert not (out / "feedback" / f"{policy}-0001.json").exists()
    assert not list((out / "feedback").glob("random-*"))

    # The inverted policy reads every variance v as 1/v (lambda-learner 0.1.0's precision), and nothing else changes.
    store = open_store(spark, evaluation_config(config, out / "tables" / "thompson_inverted").storage)
    plain = store.read("re_state").select("re_type", "entity_id", F.explode("coefficients").alias("c"))
    inverted = (
        InvertedVariances(store).read("re_state").select("re_type", "entity_id", F.explode("coefficients").alias("c"))
    )
    pairs = (
        plain.select("re_type", "entity_id", "c.name", "c.term", "c.mean", F.col("c.variance").alias("v"))
        .join(
            inverted.select("re_type", "entity_id", "c.name", "c.term", "c.mean", F.col("c.variance").alias("w")),
            ["re_type", "entity_id", "name", "term", "mean"],
        )
        .toPandas()
    )
    assert len(pairs) > 0
    assert (pairs["v"] * pairs["w"]).to_numpy() == pytest.approx(1.0)
