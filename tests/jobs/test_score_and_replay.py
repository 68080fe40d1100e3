"""Scoring with the live model (means and Thompson samples), and the replay evaluation, on real tables."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from jobs.game.generation import current_generation
from jobs.nearline_update import NearlineUpdater
from jobs.nightly_retrain import run_nightly
from jobs.replay import replay
from jobs.score import read_requests, score_requests
from jobs.simulate.writers import generate
from jobs.storage.store import open_store
from tests.jobs.streams import config_for, stream_spec, update_on_files


@pytest.fixture(scope="module")
def live(spark, tmp_path_factory):
    """A generation from four batches, then two nearline batches on it."""
    folder = tmp_path_factory.mktemp("score")
    truth = generate(stream_spec(events=3000, slices=6, new_entity_rate=0.05, drift=0.1), folder / "stream")
    config = config_for(folder, "nightly.holdout_hours=1", "nightly.passes=1")
    store = open_store(spark, config.storage)
    updater = NearlineUpdater(config)
    files = sorted(truth.landing.glob("part-*"))
    update_on_files(spark, updater, files[:4])
    assert run_nightly(spark, store, config).status == "published"
    update_on_files(spark, updater, files[4:], first_batch_id=4)
    return config, store, folder


def coefficients_of(store, table, re_type, entity):
    (row,) = store.read(table).where((F.col("re_type") == re_type) & (F.col("entity_id") == entity)).collect()
    return {(c["name"], c["term"]): c["mean"] for c in row.coefficients}


def requests_file(folder, rows):
    path = folder / "requests.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return str(path)


@pytest.mark.parametrize("state", ["live", "emptied"])
def test_mean_scores_add_the_fixed_effect_and_each_entitys_live_coefficients_prior_or_nothing(
    live, spark, tmp_path, state
):
    config, store, folder = live
    if state == "emptied":
        # Right after a first nightly run and before any nearline batch, there is no live state: priors serve.
        shutil.copytree(Path(store.root), tmp_path / "tables")
        config = config_for(tmp_path, "nightly.holdout_hours=1")
        store = open_store(spark, config.storage)
        store.overwrite("re_state", store.read("re_state").limit(0))
    generation = current_generation(store, config.model)
    priors = store.read("re_priors").where(F.col("generation") == generation.number)
    member = priors.where("re_type = 'per_member'").orderBy("entity_id").first().entity_id
    item = priors.where("re_type = 'per_item'").orderBy("entity_id").first().entity_id
    bag = {"global": [{"name": "g", "term": "0", "value": 0.5}], "member": [{"name": "m", "term": "1", "value": -1.0}]}
    rows = [{"request_id": f"r-{m}", "member_id": m, "item_id": item, "features": bag} for m in (member, "new-member")]
    scored = score_requests(store, config, read_requests(spark, requests_file(folder, rows), config)).toPandas()

    model = generation.fixed_effect
    fixed = dict(zip(zip(model.names, model.terms, strict=True), model.means, strict=True))
    table = "re_state" if state == "live" else "re_priors"
    member_coefficients = coefficients_of(store, table, "per_member", member)
    item_coefficients = coefficients_of(store, table, "per_item", item)
    by_member = scored.set_index("member_id")
    for row in by_member.itertuples():
        assert row.score_fixed == pytest.approx(fixed[("intercept", "intercept")] + 0.5 * fixed.get(("g", "0"), 0.0))
        assert row.score_per_item == pytest.approx(item_coefficients[("intercept", "intercept")])
        assert row.score == pytest.approx(row.score_fixed + row.score_per_member + row.score_per_item)
    expected = member_coefficients[("intercept", "intercept")] - member_coefficients.get(("m", "1"), 0.0)
    assert by_member.loc[member].score_per_member == pytest.approx(expected, abs=1e-12)
    assert by_member.loc["new-member"].score_per_member == 0.0  # an unknown entity: the fixed effect alone


def test_thompson_scores_share_one_draw_per_request_and_rank_the_candidates(live, spark):
    config, store, folder = live
    state = store.read("re_state")
    members = [r.entity_id for r in state.where("re_type = 'per_member'").limit(2).collect()]
    items = [r.entity_id for r in state.where("re_type = 'per_item'").limit(6).collect()]
    bag = {"item": [{"name": "i", "term": "0", "value": 1.0}]}
    rows = [
        {"request_id": f"r{k}", "member_id": m, "item_id": i, "features": bag}
        for k, m in enumerate(members)
        for i in items
    ]
    requests = read_requests(spark, requests_file(folder, rows), config)

    first = score_requests(store, config, requests, thompson=True, seed=11).toPandas()
    again = score_requests(store, config, requests, thompson=True, seed=11).toPandas()
    other = score_requests(store, config, requests, thompson=True, seed=12).toPandas()
    means = score_requests(store, config, requests).toPandas()
    key = ["request_id", "item_id"]
    first, again, other, means = (
        frame.sort_values(key).reset_index(drop=True) for frame in (first, again, other, means)
    )
    np.testing.assert_array_equal(first.score, again.score)  # seeded
    assert not np.allclose(first.score, other.score)
    assert not np.allclose(first.score, means.score)  # sampled, not the means
    for _, request in first.groupby("request_id"):
        # One draw of the member's coefficients per request: every candidate gets the same member score.
        assert request.score_per_member.nunique() == 1
        assert sorted(request["rank"]) == list(range(1, len(items) + 1))
        assert list(request.sort_values("rank").score) == sorted(request.score, reverse=True)
    top = score_requests(store, config, requests, thompson=True, seed=11, top_k=2).toPandas()
    assert len(top) == 2 * len(members) and set(top["rank"]) == {1, 2}


def test_the_replay_shows_nearline_beating_the_stale_model_and_close_to_the_ideal(spark, tmp_path):
    truth = generate(stream_spec(events=5000, slices=5, drift=0.3, new_entity_rate=0.03, seed=3), tmp_path / "stream")
    config = config_for(tmp_path, "nightly.passes=1")
    files = sorted(truth.landing.glob("part-*"))
    report = replay(spark, config, files, tmp_path / "replay", train_files=2, deltas=[0.8], ideal=True)

    for name in ("replay.json", "summary.md", "auc.png", "log_loss.png", "per_entity_auc.png"):
        assert (tmp_path / "replay" / name).stat().st_size > 0, name
    summary = report["summary"]
    assert set(summary) == {"fixed_effect", "stale", "nearline_delta_0.8", "ideal"}
    assert len(report["windows"]) == 3
    # The first window is scored by the same generation in every variant but the fixed effect alone.
    first = report["windows"][0]["variants"]
    assert first["stale"]["auc"] == first["nearline_delta_0.8"]["auc"] == first["ideal"]["auc"]
    later = [w["variants"] for w in report["windows"][1:]]
    nearline = np.mean([v["nearline_delta_0.8"]["auc"] for v in later])
    assert nearline > np.mean([v["stale"]["auc"] for v in later]) + 0.02
    assert abs(nearline - np.mean([v["ideal"]["auc"] for v in later])) < 0.03
    assert summary["stale"]["auc"] > summary["fixed_effect"]["auc"]
