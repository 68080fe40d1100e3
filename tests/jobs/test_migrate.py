"""Adding, then removing, a random-effect type: the jobs refuse to start, jobs.migrate rewrites the tables."""

from __future__ import annotations

import json

import pytest

from jobs.migrate import migrate
from jobs.nearline_update import NearlineUpdater
from jobs.nightly_retrain import run_nightly
from jobs.runtime.errors import SchemaMismatchError
from jobs.simulate.spec import RandomEffectSpec
from jobs.simulate.writers import generate
from jobs.storage.schemas import table_schemas
from jobs.storage.store import open_store
from tests.jobs.jobrun import run_job, write_config
from tests.jobs.streams import config_for, stream_spec, update_on_files

MEMBER = "{name: per_member, entity_column: member_id, feature_bag: member}"
ITEM = "{name: per_item, entity_column: item_id, feature_bag: item}"
SHOP = "{name: per_shop, entity_column: shop_id, feature_bag: shop}"


@pytest.mark.parametrize("engine", ["delta-rs", "spark-delta"])
def test_a_type_added_then_removed_is_migrated_and_learnt(spark, tmp_path, engine):
    shop = RandomEffectSpec("per_shop", "shop_id", "shop", entities=10, features=2)
    spec = stream_spec(events=1200, slices=4, seed=61)
    truth = generate(stream_spec(events=1200, slices=4, seed=61, random_effects=(*spec.random_effects, shop)), tmp_path)
    files = sorted(truth.landing.glob("part-*"))

    def settings(*types):
        return config_for(
            tmp_path,
            f"storage.backend={engine}",
            f"model.random_effects=[{', '.join(types)}]",
            "nightly.holdout_hours=0",
        )

    two, three = settings(MEMBER, ITEM), settings(MEMBER, ITEM, SHOP)
    store = open_store(spark, two.storage)
    update_on_files(spark, NearlineUpdater(two), files[:2])

    with pytest.raises(SchemaMismatchError, match=r"'events'.*'shop_id'.*python -m jobs.migrate"):
        NearlineUpdater(three).store(spark)
    migrated = run_job("jobs.migrate", write_config(tmp_path / "three", three))
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    assert set(json.loads(migrated.stdout.strip().splitlines()[-1])["migrated"]) == {"events"}
    update_on_files(spark, NearlineUpdater(three), files[2:], first_batch_id=2)
    events = store.read("events")
    assert events.count() == truth.events
    assert events.where("shop_id IS NULL").count() == events.where("batch_id < 2").count()
    assert store.read("re_state").where("re_type = 'per_shop'").count() == 10
    assert run_nightly(spark, store, three).status == "published"
    assert store.read("re_priors").where("re_type = 'per_shop'").count() == 10

    with pytest.raises(SchemaMismatchError, match=r"python -m jobs\.migrate"):
        NearlineUpdater(two).store(spark)
    # The command's process ran above; this one runs in the test's process (no JVM to start).
    assert set(migrate(store, table_schemas(two.model))) == {"events"}
    assert "shop_id" not in store.schema("events").fieldNames()
    assert store.read("events").count() == truth.events
    assert run_nightly(spark, store, two).status == "already_published"
