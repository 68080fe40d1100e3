import dataclasses
from pathlib import Path

import pytest

from jobs.runtime.config import load_config
from jobs.runtime.errors import ConfigError
from jobs.runtime.settings import Config, RandomEffectConfig, config_to_dict

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize("name", ["base.yaml", "local.yaml", "cluster.yaml", "databricks.yaml"])
def test_every_shipped_file_loads(name):
    config = load_config(CONF_DIR / name)
    assert isinstance(config, Config)
    assert [r.name for r in config.model.random_effects] == ["per_member", "per_item"]


def test_environment_files_override_the_base():
    local, cluster = load_config(CONF_DIR / "local.yaml"), load_config(CONF_DIR / "cluster.yaml")
    assert (local.storage.backend, local.stream.source, local.spark.master) == ("delta-rs", "files", "local[2]")
    assert (cluster.storage.backend, cluster.stream.source, cluster.spark.master) == ("spark-delta", "kafka", None)
    assert cluster.stream.options["kafka.bootstrap.servers"].startswith("broker-1")
    assert local.nightly.window_days == cluster.nightly.window_days == 7.0  # from the base


def test_command_line_overrides_win():
    config = load_config(
        CONF_DIR / "local.yaml",
        [
            "nearline.entity_buckets=8",
            "model.random_effects.per_item.delta=0.95",
            "model.random_effects.0.penalty=2.5",
            "spark.conf.spark.sql.ansi.enabled=false",
            "stream.trigger=processing_time",
        ],
    )
    assert config.nearline.entity_buckets == 8
    assert config.random_effect("per_item").delta == 0.95
    assert config.random_effect("per_member").penalty == 2.5
    assert config.spark.conf["spark.sql.ansi.enabled"] == "false"
    assert config.spark.conf["spark.driver.memory"] == "6g"  # merged with local.yaml's, not replacing them
    assert config.stream.trigger == "processing_time"


def test_a_whole_list_can_be_replaced_on_the_command_line():
    config = load_config(overrides=["model.random_effects=[{name: per_ad, entity_column: ad_id, feature_bag: ad}]"])
    assert [r.name for r in config.model.random_effects] == ["per_ad"]


def test_a_whole_list_can_be_replaced(tmp_path):
    path = tmp_path / "one_type.yaml"
    path.write_text(
        "model:\n  random_effects:\n    - {name: per_ad, entity_column: ad_id, feature_bag: ad, delta: 0.5}\n"
    )
    config = load_config(path)
    (only,) = config.model.random_effects
    assert (only.name, only.entity_column, only.delta, only.penalty) == ("per_ad", "ad_id", 0.5, 1.0)


def test_a_micro_batch_takes_the_buckets_its_size_calls_for_up_to_entity_buckets():
    config = load_config(CONF_DIR / "local.yaml", ["nearline.entity_buckets=8", "nearline.rows_per_call=1000"])
    sizes = [0, 1, 1000, 1001, 7999, 8000, 8001, 1_000_000]
    assert [config.nearline.buckets_for(size) for size in sizes] == [1, 1, 1, 2, 8, 8, 8, 8]
    per_entity = load_config(CONF_DIR / "local.yaml", ["nearline.one_entity_per_call=true"])
    assert per_entity.nearline.buckets_for(1000) is None


BAD = [
    ("nearline.bucketz=3", "config key 'nearline.bucketz' is not known; known keys under 'nearline': entity_buckets"),
    ("colour=blue", "config key 'colour' is not known; known keys at the top level: model, spark"),
    ("model.random_effects.0.delta=1.5", "config key 'model.random_effects[0].delta' must be in [0, 1]; got 1.5"),
    ("model.random_effects.per_item.penalty=-1", "config key 'model.random_effects[1].penalty' must be > 0; got -1.0"),
    ("model.random_effects.per_item.speed=2", "config key 'model.random_effects[1].speed' is not known"),
    ("model.random_effects.per_nobody.delta=0.5", "config key 'random_effects' has no item 'per_nobody'"),
    ("model.random_effects.delta=0.5", "config key 'random_effects' has no item 'delta'"),
    ("model.task=poisson", "config key 'model.task' must be one of logistic, linear; got 'poisson'"),
    ("storage.backend=s3", "config key 'storage.backend' must be one of auto, delta-rs, spark-delta; got 's3'"),
    ("stream.max_files_per_trigger=0", "config key 'stream.max_files_per_trigger' must be >= 1; got 0"),
    ("spark.shuffle_partitions=many", "config key 'spark.shuffle_partitions' must be a whole number; got 'many'"),
    ("nightly.window_days=0", "config key 'nightly.window_days' must be > 0; got 0.0"),
    ("nightly.force_publish=yes please", "config key 'nightly.force_publish' must be true or false"),
    ("nearline.app_id=", "config key 'nearline.app_id' must be a non-empty string; got None"),
    ("stream.options=[1, 2]", "config key 'stream.options' must be a mapping of names to strings"),
    ("model.random_effects.1.entity_column=member_id", "config key 'model.random_effects[1].entity_column' repeats"),
    ("stream.source=kafka", "config key 'stream.options' must set kafka.bootstrap.servers"),
    ("model.fixed_effect.elastic_net=0.5", "config key 'model.fixed_effect.elastic_net' must be 0 for task logistic"),
    ("no-equals-sign", "override 'no-equals-sign' must look like section.key=value"),
    ("model.random_effects.0.penalty=0", "config key 'model.random_effects[0].penalty' must be > 0; got 0.0"),
    (
        "model.random_effects.0.entity_column=label",
        "config key 'model.random_effects[0].entity_column' must not be 'label'",
    ),
    ("model.random_effects.1.entity_column=batch_id", "config key 'model.random_effects[1].entity_column' must not be"),
    (
        "model.random_effects.1.entity_column=features_member",
        "config key 'model.random_effects[1].entity_column' must not",
    ),
    ("nightly.app_id=lambda-learner-nearline", "config key 'nightly.app_id' must differ from nearline.app_id"),
    ("storage.catalog=main", "config keys 'storage.catalog' and 'storage.schema' go together"),
    ("events.retention_days=3", "config key 'events.retention_days' must be >= nightly.window_days"),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[override for override, _ in BAD])
def test_a_bad_key_or_value_is_refused_with_one_message_naming_it(override, message):
    with pytest.raises(ConfigError) as refused:
        load_config(CONF_DIR / "local.yaml", [override])
    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)


def test_a_size_bound_on_a_kafka_source_is_refused_with_the_key_that_bounds_it():
    kafka = ["stream.source=kafka", "stream.options={kafka.bootstrap.servers: broker:9092, subscribe: events}"]
    with pytest.raises(ConfigError, match=r"'stream.max_bytes_per_trigger' does not apply to a kafka source.*offsets"):
        load_config(CONF_DIR / "local.yaml", [*kafka, "stream.max_bytes_per_trigger=1000000"])


def test_a_required_key_is_named(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  random_effects:\n    - {name: per_ad, feature_bag: ad}\n")
    with pytest.raises(ConfigError, match=r"config key 'model.random_effects\[0\].entity_column' is required"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [("model: [", "is not valid YAML"), ("- a\n- b\n", "must hold a mapping at the top level")],
)
def test_unreadable_files_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Path(tmp_path / "missing.yaml"))


def test_settings_print_back_as_plain_values():
    plain = config_to_dict(load_config(CONF_DIR / "local.yaml"))
    assert plain["model"]["random_effects"][0]["name"] == "per_member"
    assert plain["stream"]["options"] == {}


def test_every_key_is_documented():
    reference = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()

    def keys(tree, prefix=""):
        for name, value in tree.items():
            if isinstance(value, dict) and value:
                yield from keys(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    settings = config_to_dict(Config())
    settings["model"]["random_effects"] = {f"[].{field.name}": None for field in dataclasses.fields(RandomEffectConfig)}
    for key in keys(settings):
        assert f"`{key.replace('random_effects.[]', 'random_effects[]')}`" in reference, key


def test_a_session_taken_from_a_cluster_runs_in_utc(spark):
    from jobs.runtime.session import spark_session
    from jobs.runtime.settings import SparkConfig

    spark.conf.set("spark.sql.session.timeZone", "America/Los_Angeles")
    taken = spark_session(SparkConfig(master=None))
    assert taken is spark and spark.conf.get("spark.sql.session.timeZone") == "UTC"
