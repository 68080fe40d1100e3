"""The jobs' settings: typed, frozen dataclasses, and how a parsed settings tree becomes them.

No YAML here: executors unpickle these classes, and need nothing but the standard library for them.
``jobs.runtime.config`` reads the YAML files and command-line overrides into a tree; :func:`settings_from_tree`
checks it. Anything unknown or out of range is refused with one :class:`ConfigError` naming the key
and what is allowed. docs/configuration.md lists every key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from jobs.runtime.errors import ConfigError


@dataclass(frozen=True)
class Check:
    """A constraint on a numeric value, with the wording used in errors."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def accepts(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"<= {self.high}"


def _checked(default: Any, check: Check) -> Any:
    return field(default=default, metadata={"check": check})


POSITIVE = Check(low=0, low_open=True)
NON_NEGATIVE = Check(low=0)
UNIT_INTERVAL = Check(low=0, high=1)
AT_LEAST_ONE = Check(low=1)


@dataclass(frozen=True)
class RandomEffectConfig:
    """One random-effect type: a linear model per entity of ``entity_column`` on ``feature_bag``."""

    name: str
    entity_column: str
    feature_bag: str
    penalty: float = _checked(1.0, POSITIVE)
    delta: float = _checked(0.8, UNIT_INTERVAL)
    max_rows_per_entity: int = _checked(1000, AT_LEAST_ONE)
    min_rows: int = _checked(1, AT_LEAST_ONE)


@dataclass(frozen=True)
class FixedEffectConfig:
    """The global model: trained nightly on ``feature_bag``, or an outside model's score in ``score_column``."""

    source: Literal["train", "score_column"] = "train"
    feature_bag: str = "global"
    score_column: str = "fixed_effect_score"
    penalty: float = _checked(1.0, NON_NEGATIVE)
    elastic_net: float = _checked(0.0, UNIT_INTERVAL)
    max_iterations: int = _checked(100, AT_LEAST_ONE)


@dataclass(frozen=True)
class ModelConfig:
    task: Literal["logistic", "linear"] = "logistic"
    fixed_effect: FixedEffectConfig = FixedEffectConfig()
    random_effects: tuple[RandomEffectConfig, ...] = ()


@dataclass(frozen=True)
class SparkConfig:
    """``master: null`` uses the session the cluster (or Databricks) already has; ``remote`` a Spark Connect server."""

    master: str | None = "local[2]"
    remote: str | None = None
    app_name: str = "lambda-learner"
    shuffle_partitions: int = _checked(4, AT_LEAST_ONE)
    conf: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StorageConfig:
    """Where the Delta tables live; ``auto`` picks Spark's Delta when the session has it.

    Tables live under ``root``, or, with ``catalog`` and ``schema`` (Spark's Delta only), as managed
    tables ``catalog.schema.<table>`` (Unity Catalog on Databricks).
    """

    backend: Literal["auto", "delta-rs", "spark-delta"] = "auto"
    root: str = "var/tables"
    catalog: str | None = None
    schema: str | None = None
    storage_options: Mapping[str, str] = field(default_factory=dict)
    # The live state's MERGE marks replaced rows deleted instead of rewriting their files (Spark's Delta only).
    deletion_vectors: bool = False
    # delta-rs rewrites, on the driver, every file of the live state holding an entity a batch updates:
    # past this many entities a batch costs more than twice what it does on a small state (docs/performance.md).
    delta_rs_max_state_entities: int = _checked(2_000_000, AT_LEAST_ONE)


@dataclass(frozen=True)
class StreamConfig:
    """The nearline job's source; ``options`` go to ``readStream`` as they are."""

    source: Literal["files", "kafka", "autoloader", "delta"] = "files"
    path: str = "var/landing"
    format: Literal["json", "parquet"] = "json"
    options: Mapping[str, str] = field(default_factory=dict)
    trigger: Literal["available_now", "processing_time"] = "processing_time"
    processing_time: str = "1 minute"
    checkpoint: str = "var/checkpoints/nearline"
    # Rate limits: after an outage a backlog becomes several bounded batches, not one that fails at every restart.
    max_files_per_trigger: int | None = _checked(100, AT_LEAST_ONE)
    max_offsets_per_trigger: int | None = _checked(100_000, AT_LEAST_ONE)
    # A bound by size (files, Auto Loader, Delta): a few huge files are not one huge batch.
    max_bytes_per_trigger: int | None = _checked(None, AT_LEAST_ONE)


@dataclass(frozen=True)
class EventsConfig:
    """What the nearline job accepts as a training event, and how long the events table keeps them.

    Event times are checked against the time the batch was first ingested; ``duplicate_lookback_days``
    (default: the nightly window) is how far back a repeated ``event_id`` is looked for.
    """

    max_future_minutes: float = _checked(60.0, NON_NEGATIVE)
    max_age_days: float = _checked(3650.0, POSITIVE)
    max_abs_feature_value: float = _checked(1e6, POSITIVE)
    max_features_per_bag: int = _checked(1000, AT_LEAST_ONE)
    # A huge weight collapses an entity's variance in one update and overflows the hold-out's sums.
    max_weight: float = _checked(1000.0, POSITIVE)
    max_abs_label: float = _checked(1e6, POSITIVE)  # linear task: a label beyond it overflows the squares
    duplicate_lookback_days: float | None = _checked(None, NON_NEGATIVE)
    retention_days: float = _checked(30.0, POSITIVE)


@dataclass(frozen=True)
class EntityGrouping:
    """How random-effect updates are grouped into pandas calls."""

    entity_buckets: int = _checked(64, AT_LEAST_ONE)
    one_entity_per_call: bool = False

    @property
    def buckets(self) -> int | None:
        """Buckets of whole entities per call, or None for one entity per call (the slow baseline)."""
        return None if self.one_entity_per_call else self.entity_buckets


@dataclass(frozen=True)
class NearlineConfig(EntityGrouping):
    app_id: str = "lambda-learner-nearline"
    # A batch of at most this many valid events is updated on the driver (the same kernels, the same groups):
    # below it, Spark's per-job cost is most of a batch's time. 0: always on the executors.
    driver_max_rows: int = _checked(20_000, NON_NEGATIVE)
    # A batch's entities go into ceil(valid events / this) buckets, at most entity_buckets: a kernel call costs
    # about 13 ms whatever its size (a 1,000-event batch of two types in 64 buckets: 128 calls, 1.7 s).
    rows_per_call: int = _checked(5_000, AT_LEAST_ONE)
    # The number of a batch begun by a stream whose checkpoint is lost: the starting stream finishes it from the tables.
    finish_lost_batch: int | None = _checked(None, NON_NEGATIVE)

    def buckets_for(self, valid_events: int) -> int | None:
        """The buckets of a micro-batch of this many valid events: as many as its size calls for, at most ``buckets``.

        A function of the batch alone, so a replay, and either path (driver or executors), groups it the same way.
        """
        if self.buckets is None:
            return None
        return max(1, min(self.buckets, -(-valid_events // self.rows_per_call)))


@dataclass(frozen=True)
class NightlyConfig(EntityGrouping):
    app_id: str = "lambda-learner-nightly"
    window_days: float = _checked(7.0, POSITIVE)
    holdout_hours: float = _checked(6.0, NON_NEGATIVE)
    passes: int = _checked(2, AT_LEAST_ONE)
    auc_tolerance: float = _checked(0.005, NON_NEGATIVE)
    loss_tolerance: float = _checked(0.01, NON_NEGATIVE)
    force_publish: bool = False
    seed: int = 17
    # A run holds the tables for this long, renewed while it runs: how long a killed run blocks the next.
    lease_minutes: float = _checked(5.0, POSITIVE)
    # How long a run waits for another's lease before it refuses (default: lease_minutes, so a retry outlasts a kill).
    lease_wait_minutes: float | None = _checked(None, NON_NEGATIVE)


@dataclass(frozen=True)
class LabelJoinStream:
    """One input stream of the label join; each key means what the ``stream`` key of that name means."""

    source: Literal["files", "kafka", "autoloader", "delta"] = "files"
    path: str = "var/impressions"
    format: Literal["json", "parquet"] = "json"
    options: Mapping[str, str] = field(default_factory=dict)
    max_files_per_trigger: int | None = _checked(100, AT_LEAST_ONE)
    max_offsets_per_trigger: int | None = _checked(100_000, AT_LEAST_ONE)
    max_bytes_per_trigger: int | None = _checked(None, AT_LEAST_ONE)


@dataclass(frozen=True)
class FeedbackKind:
    """A kind of feedback on the clicks stream, and the label and weight it gives its impression."""

    name: str
    label: float = 1.0
    weight: float = _checked(1.0, POSITIVE)


@dataclass(frozen=True)
class LabelJoinConfig:
    """The label join: impressions and clicks in, labelled events out (docs/label_join.md)."""

    app_id: str = "lambda-learner-label-join"
    impressions: LabelJoinStream = LabelJoinStream(path="var/impressions")
    clicks: LabelJoinStream = LabelJoinStream(path="var/clicks")
    trigger: Literal["available_now", "processing_time"] = "processing_time"
    processing_time: str = "1 minute"
    checkpoint: str = "var/checkpoints/label_join"
    attribution_window_minutes: float = _checked(30.0, POSITIVE)
    allowed_lateness_minutes: float = _checked(10.0, NON_NEGATIVE)
    orphan_lookback_minutes: float = _checked(120.0, POSITIVE)
    negative_sampling_rate: float = _checked(1.0, Check(low=0, high=1, low_open=True))
    feedback: tuple[FeedbackKind, ...] = (FeedbackKind("click"),)
    output_table: str = "labelled_events"
    pending_table: str = "label_join_pending"
    quarantine_table: str = "label_join_quarantine"
    metrics_table: str = "label_join_metrics"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    spark: SparkConfig = SparkConfig()
    storage: StorageConfig = StorageConfig()
    stream: StreamConfig = StreamConfig()
    events: EventsConfig = EventsConfig()
    nearline: NearlineConfig = NearlineConfig()
    nightly: NightlyConfig = NightlyConfig()
    label_join: LabelJoinConfig = LabelJoinConfig()

    def random_effect(self, name: str) -> RandomEffectConfig:
        for random_effect in self.model.random_effects:
            if random_effect.name == name:
                return random_effect
        raise KeyError(name)


def settings_from_tree(tree: Any) -> Config:
    """The parsed settings tree (defaults, environment file and overrides merged) as checked settings."""
    config = build(Config, tree, "")
    _check_consistency(config)
    return config


def config_to_dict(config: Any) -> Any:
    """The configuration as plain YAML-able values (for logging a run's settings)."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple):
        return [config_to_dict(item) for item in config]
    if isinstance(config, Mapping):
        return dict(config)
    return config


def build(kind: Any, value: Any, key: str) -> Any:
    """``value`` (parsed YAML) as an instance of ``kind``, or a ConfigError naming ``key``."""
    if dataclasses.is_dataclass(kind):
        return _build_dataclass(kind, value, key)
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        (inner,) = [argument for argument in arguments if argument is not type(None)]
        return build(inner, value, key)
    if origin is Literal:
        if value not in arguments:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(map(str, arguments))}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list; got {value!r}")
        return tuple(build(arguments[0], item, f"{key}[{index}]") for index, item in enumerate(value))
    if origin is Mapping:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping of names to strings; got {value!r}")
        return {str(name): _scalar_text(item) for name, item in value.items()}
    return _build_scalar(kind, value, key)


def _build_dataclass(kind: Any, value: Any, key: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"config key {key or '<root>'!r} must be a mapping; got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        where = f"under {key!r}" if key else "at the top level"
        raise ConfigError(
            f"config key {_join(key, unknown[0])!r} is not known; known keys {where}: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(kind)
    arguments = {}
    for name, spec in fields.items():
        if name not in value:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(f"config key {_join(key, name)!r} is required")
            continue
        built = build(hints[name], value[name], _join(key, name))
        check = spec.metadata.get("check")
        if check is not None and built is not None and not check.accepts(built):
            raise ConfigError(f"config key {_join(key, name)!r} must be {check.describe()}; got {built!r}")
        arguments[name] = built
    return kind(**arguments)


def _build_scalar(kind: type, value: Any, key: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false; got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be a whole number; got {value!r}")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key {key!r} must be a number; got {value!r}")
    if kind is str:
        if isinstance(value, str) and value:
            return value
        raise ConfigError(f"config key {key!r} must be a non-empty string; got {value!r}")
    raise TypeError(f"no rule to build {kind}")


def _check_consistency(config: Config) -> None:
    """Rules that span keys."""
    random_effects = config.model.random_effects
    for attribute in ("name", "entity_column"):
        seen: set[str] = set()
        for index, random_effect in enumerate(random_effects):
            value = getattr(random_effect, attribute)
            if value in seen:
                raise ConfigError(
                    f"config key 'model.random_effects[{index}].{attribute}' repeats {value!r}; each must be unique"
                )
            seen.add(value)
    if config.model.task == "logistic" and config.model.fixed_effect.elastic_net > 0:
        raise ConfigError(
            "config key 'model.fixed_effect.elastic_net' must be 0 for task logistic (elastic net is for linear)"
        )
    if config.stream.source == "kafka" and "kafka.bootstrap.servers" not in config.stream.options:
        raise ConfigError("config key 'stream.options' must set kafka.bootstrap.servers when stream.source is kafka")
    _check_byte_bound("stream", config.stream)
    _check_columns(config)
    if config.nearline.app_id == config.nightly.app_id:
        # The nightly's guard versions on the metrics table would swallow the nearline job's rows.
        raise ConfigError(
            f"config key 'nightly.app_id' must differ from nearline.app_id; both are {config.nightly.app_id!r}"
        )
    if config.storage.deletion_vectors and config.storage.backend == "delta-rs":
        raise ConfigError(
            "config key 'storage.deletion_vectors' needs storage.backend spark-delta (delta-rs writes none)"
        )
    if (config.storage.catalog is None) != (config.storage.schema is None):
        raise ConfigError("config keys 'storage.catalog' and 'storage.schema' go together: set both or neither")
    if config.events.retention_days < config.nightly.window_days:
        raise ConfigError(
            f"config key 'events.retention_days' must be >= nightly.window_days ({config.nightly.window_days}); "
            f"got {config.events.retention_days}: the nightly job would train on events already dropped"
        )
    _check_label_join(config)


# Columns of the events table, and of the frames the jobs build from it: no event field may take these names.
RESERVED_COLUMNS = frozenset(
    {"event_id", "event_time", "label", "weight", "features", "batch_id", "ingested_at", "event_date"}
    | {"row_key", "sample_key", "offset", "entity_id", "score", "names", "terms", "values", "reason"}
)
RESERVED_PREFIXES = ("features_", "score_", "_")


def _check_columns(config: Config) -> None:
    """Entity columns and the outside score column must not take a name the tables or the jobs use."""
    named = [
        (f"model.random_effects[{i}].entity_column", r.entity_column) for i, r in enumerate(config.model.random_effects)
    ]
    if config.model.fixed_effect.source == "score_column":
        named.append(("model.fixed_effect.score_column", config.model.fixed_effect.score_column))
    for key, column in named:
        if column in RESERVED_COLUMNS or column.startswith(RESERVED_PREFIXES):
            raise ConfigError(
                f"config key {key!r} must not be {column!r}: the events table uses that name "
                f"(reserved: {', '.join(sorted(RESERVED_COLUMNS))} and names starting {', '.join(RESERVED_PREFIXES)})"
            )


# The tables of the nearline and nightly jobs: the label join writes none of them (one writer per table).
_NOT_LABEL_JOIN_TABLES = ("events", "quarantine", "fixed_effect", "re_priors", "re_state", "metrics")


def _check_label_join(config: Config) -> None:
    """The label join's rules that span keys."""
    join = config.label_join
    if join.orphan_lookback_minutes < join.attribution_window_minutes:
        raise ConfigError(
            "config key 'label_join.orphan_lookback_minutes' must be >= label_join.attribution_window_minutes; "
            f"got {join.orphan_lookback_minutes!r} < {join.attribution_window_minutes!r}"
        )
    if not join.feedback:
        raise ConfigError("config key 'label_join.feedback' must list at least one kind of feedback")
    names: set[str] = set()
    for index, kind in enumerate(join.feedback):
        if kind.name in names:
            raise ConfigError(f"config key 'label_join.feedback[{index}].name' repeats {kind.name!r}")
        names.add(kind.name)
        if config.model.task == "logistic" and kind.label not in (0.0, 1.0):
            raise ConfigError(
                f"config key 'label_join.feedback[{index}].label' must be 0 or 1 for task logistic; got {kind.label!r}"
            )
    for name, stream in (("impressions", join.impressions), ("clicks", join.clicks)):
        if stream.source == "kafka" and "kafka.bootstrap.servers" not in stream.options:
            raise ConfigError(
                f"config key 'label_join.{name}.options' must set kafka.bootstrap.servers when its source is kafka"
            )
        _check_byte_bound(f"label_join.{name}", stream)
    largest = max([1.0 / join.negative_sampling_rate, *(kind.weight for kind in join.feedback)])
    if largest > config.events.max_weight:
        raise ConfigError(
            f"config key 'events.max_weight' is {config.events.max_weight:g}, below the label join's largest weight "
            f"{largest:g} (1 / label_join.negative_sampling_rate, or a label_join.feedback weight): raise it, or "
            "the nearline job quarantines those events"
        )
    if join.app_id in (config.nearline.app_id, config.nightly.app_id):
        raise ConfigError(
            f"config key 'label_join.app_id' must differ from the other jobs' app ids; got {join.app_id!r}"
        )
    tables: set[str] = set()
    for key in ("output_table", "pending_table", "quarantine_table", "metrics_table"):
        table = getattr(join, key)
        if table in tables or table in _NOT_LABEL_JOIN_TABLES:
            raise ConfigError(f"config key 'label_join.{key}' must name a table of the label join's own; got {table!r}")
        tables.add(table)


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _check_byte_bound(key: str, stream: StreamConfig | LabelJoinStream) -> None:
    if stream.source == "kafka" and stream.max_bytes_per_trigger is not None:
        raise ConfigError(
            f"config key '{key}.max_bytes_per_trigger' does not apply to a kafka source, which bounds a batch by "
            f"messages: set {key}.max_offsets_per_trigger instead"
        )
