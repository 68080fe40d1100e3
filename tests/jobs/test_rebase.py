"""A rebase replays every batch after the generation's cutoff in one pass: what that computes, checked batch by batch.

docs/nearline.md, "Rebase": with one random-effect type the one pass equals applying the batches one after
the other; with several, type k's offset uses each earlier type's score right after the row's own batch
and each later type's prior.
"""

from __future__ import annotations

from pyspark.sql import functions as F

from jobs.game.generation import current_generation
from jobs.game.incremental import ROW_CAP_SEED, apply_events, priors_as_state, upserted
from jobs.game.model import Coordinates
from jobs.game.random_effect import RandomEffectModel, coefficient_records
from jobs.nearline_update import NearlineUpdater
from jobs.nightly_retrain import run_nightly
from jobs.simulate.spec import RandomEffectSpec
from jobs.simulate.writers import generate
from jobs.storage.ingest import ingest_batch
from jobs.storage.store import open_store
from tests.jobs.jobrun import rows, same_rows
from tests.jobs.streams import config_for, stream_spec, update_on_files

ONE_TYPE = "model.random_effects=[{name: per_member, entity_column: member_id, feature_bag: member}]"
ORDER = ["re_type", "entity_id"]


def rebased(spark, folder, *overrides, **spec):
    """Two batches, a generation, four batches ingested while the nearline job was away, then one batch: a rebase."""
    spec = stream_spec(events=2100, slices=7, drift=0.2, new_entity_rate=0.05, seed=51, **spec)
    files = sorted(generate(spec, folder / "stream").landing.glob("part-*"))
    config = config_for(folder, "nightly.holdout_hours=0", "nightly.passes=1", *overrides)
    store = open_store(spark, config.storage)
    updater = NearlineUpdater(config)
    update_on_files(spark, updater, files[:2])
    assert run_nightly(spark, store, config).status == "published"
    for batch_id, path in enumerate(files[2:6], start=2):
        ingest_batch(store, config, spark.read.text(str(path)), batch_id)
    update_on_files(spark, updater, files[6:], first_batch_id=6)
    (batch,) = store.read("metrics").where("job = 'nearline' AND batch_id = 6").collect()
    assert batch.status == "rebased" and batch["values"]["replayed_batches"] == 4
    return config, store


def test_with_one_type_the_one_pass_equals_the_batches_one_after_the_other(spark, tmp_path):
    member = RandomEffectSpec("per_member", "member_id", "member", entities=40, features=3)
    config, store = rebased(spark, tmp_path, ONE_TYPE, random_effects=(member,))
    generation = current_generation(store, config.model)
    state = priors_as_state(store, config, generation)
    events = store.read("events")
    for batch_id in range(generation.cutoff_batch_id + 1, 7):
        batch = events.where(F.col("batch_id") == batch_id)
        update = apply_events(batch, state, config, generation.fixed_effect, generation.number, batch_id)
        state = upserted(state, update.state).localCheckpoint(eager=True)
    live = rows(store.read("re_state").drop("last_batch_id"), ORDER)
    assert same_rows(live, rows(state.drop("last_batch_id"), ORDER), rel=1e-9)


def test_with_two_types_an_earlier_type_scores_after_its_batch_a_later_one_from_its_prior(spark, tmp_path):
    config, store = rebased(spark, tmp_path)
    generation = current_generation(store, config.model)
    coordinates = Coordinates.of(config, config.nearline.buckets, ROW_CAP_SEED)
    member, item = coordinates.random_effects
    priors = priors_as_state(store, config, generation).localCheckpoint(eager=True)
    states = {r.name: priors.where(F.col("re_type") == r.name) for r in (member, item)}
    item_prior = RandomEffectModel(states["per_item"])
    events = store.read("events").withColumn("row_key", F.xxhash64("event_id", "batch_id"))
    for batch_id in range(generation.cutoff_batch_id + 1, 7):
        batch = coordinates.fixed_effect.with_score(
            events.where(F.col("batch_id") == batch_id), generation.fixed_effect
        )
        # per_member: the fixed effect and per_item's prior.
        batch = item.with_score(batch, item_prior)
        updated = member.update(batch, coordinates.offset_for(member.score_column), states["per_member"])
        states["per_member"] = _applied(states["per_member"], "per_member", updated)
        # per_item: the fixed effect and per_member's score right after this batch.
        batch = member.with_score(batch, RandomEffectModel(states["per_member"]))
        updated = item.update(batch, coordinates.offset_for(item.score_column), states["per_item"])
        states["per_item"] = _applied(states["per_item"], "per_item", updated)
    columns = ["re_type", "entity_id", "coefficients", "updates", "rows"]
    reference = states["per_member"].unionByName(states["per_item"]).select(*columns)
    assert same_rows(rows(store.read("re_state").select(*columns), ORDER), rows(reference, ORDER), rel=1e-9)


def _applied(state, re_type, updated):
    """``state`` with the entities ``updated`` (``UPDATE_FIELDS``) advanced, as one batch's update advances them."""
    new = updated.select(
        F.lit(re_type).alias("re_type"),
        "entity_id",
        F.lit(1).cast("long").alias("generation"),
        coefficient_records(updated).alias("coefficients"),
        F.lit(0).cast("long").alias("last_batch_id"),
        (F.col("updates") + F.col("converged_batches")).alias("updates"),
        (F.col("total_rows") + F.col("converged_rows")).alias("rows"),
        F.current_timestamp().alias("updated_at"),
    )
    return upserted(state, new).localCheckpoint(eager=True)
