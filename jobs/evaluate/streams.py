"""The stream an evaluation reads: its landing files, the generator's spec and truth, and the stream cut into steps.

A step is what the model learns from at once: one landing file (the replay's windows), or the events
of N minutes of event time (the freshness curve's micro-batches). Every step's events are parsed once,
by the jobs' own parser, for scoring; the raw events of a step are what the nearline job is fed.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.runtime.settings import Config
from jobs.simulate.spec import DEFAULT_ENTITIES, MICROS_PER_MINUTE, RandomEffectSpec, StreamSpec, epoch_micros
from jobs.simulate.writers import generate
from jobs.storage.parsing import parse_events

TEXT_COLUMN = "value"
MICROS = "_micros"


@dataclass(frozen=True)
class GeneratedStream:
    """A folder ``python -m jobs.generate`` wrote: landing files (time-ordered) and, if kept, the truth beside them."""

    landing: Path
    truth: Path | None

    @classmethod
    def at(cls, folder: Path | str) -> GeneratedStream:
        """``folder`` is the generated folder (``landing/`` and ``truth/`` in it) or its ``landing/`` folder."""
        folder = Path(folder)
        landing = folder / "landing" if (folder / "landing").is_dir() else folder
        truth = landing.parent / "truth"
        return cls(landing, truth if (truth / "stream.json").exists() else None)

    @property
    def files(self) -> list[Path]:
        files = sorted(path for path in self.landing.iterdir() if path.name.startswith("part-"))
        if not files:
            raise ValueError(f"no part-* files in {self.landing}")
        return files

    def spec(self) -> StreamSpec:
        """The generator's spec (needs the truth)."""
        settings = dict(self._summary()["spec"])
        settings["random_effects"] = tuple(RandomEffectSpec(**r) for r in settings["random_effects"])
        return StreamSpec(**settings)

    def slice_start(self, index: int) -> int:
        """When slice ``index`` (file ``index``) begins, in microseconds since the epoch (needs the truth)."""
        return epoch_micros(self._summary()["slices"][index]["start"])

    def _summary(self) -> dict:
        if self.truth is None:
            raise ValueError(f"{self.landing.parent} has no truth/stream.json: generate the stream with jobs.generate")
        return json.loads((self.truth / "stream.json").read_text())


def read_raw(spark: SparkSession, paths: Sequence[Path]) -> DataFrame:
    """Landing files as the nearline job reads them: JSON lines as text (a ``value`` column), parquet as columns."""
    names = [str(path) for path in paths]
    return spark.read.parquet(*names) if paths[0].suffix == ".parquet" else spark.read.text(names)


def parsed(raw: DataFrame, config: Config) -> DataFrame:
    """The valid events of ``raw`` as the jobs parse them."""
    return parse_events(raw, config.model, 0, config.events, datetime.now(UTC)).valid


@dataclass(frozen=True)
class Steps:
    """A stream cut into steps, in order.

    ``numbers`` are the steps holding events; ``length`` is a step's length in the unit a retraining
    period is counted in (microseconds of event time, or 1 for a step per file); ``raw(n)`` is step n's
    raw events as the nearline job reads them; ``events`` every step's valid events with ``step`` and
    ``row_key``.
    """

    numbers: tuple[int, ...]
    length: int
    raw: Callable[[int], DataFrame]
    events: DataFrame

    def retrains_between(self, step: int, following: int, period: int) -> bool:
        """Whether a retraining time (a multiple of ``period`` past the origin) ends ``step`` by ``following``."""
        earliest = -((step + 1) * self.length // -period)  # ceil
        return following * self.length // period >= earliest


def file_steps(spark: SparkSession, files: Sequence[Path], config: Config) -> Steps:
    """One step per file (step n is ``files[n]``)."""
    events = None
    for number, path in enumerate(files):
        part = parsed(read_raw(spark, [path]), config).withColumn("step", F.lit(number))
        events = part if events is None else events.unionByName(part)
    return Steps(tuple(range(len(files))), 1, lambda number: read_raw(spark, [files[number]]), _keyed(events))


@dataclass(frozen=True)
class Timeline:
    """Time-ordered files from ``origin`` (microseconds since the epoch) on, to be cut into steps of N minutes."""

    raw: DataFrame  # the raw events, with their event time in MICROS (null where it cannot be read)
    events: DataFrame  # the valid events, with MICROS and row_key
    origin: int

    @classmethod
    def of(cls, spark: SparkSession, files: Sequence[Path], config: Config, origin: int | None = None) -> Timeline:
        """``origin`` None: the first event's minute."""
        raw = read_raw(spark, files)
        raw = _checkpoint(raw.withColumn(MICROS, F.unix_micros(_raw_time(raw))))
        events = _keyed(parsed(raw.drop(MICROS), config).withColumn(MICROS, F.unix_micros("event_time")))
        if origin is None:
            first = events.agg(F.min(MICROS)).first()[0]
            origin = first - first % MICROS_PER_MINUTE
        return cls(raw, events, origin)

    def steps(self, minutes: float) -> Steps:
        length = round(minutes * MICROS_PER_MINUTE)
        if length <= 0:
            raise ValueError(f"a step must last more than 0 minutes; got {minutes!r}")
        events = self.events.withColumn("step", self._step(length)).where(F.col("step") >= 0)
        numbers = tuple(row.step for row in events.select("step").distinct().orderBy("step").collect())
        raw = self.raw.withColumn("step", self._step(length))
        return Steps(numbers, length, lambda number: raw.where(F.col("step") == number).drop("step", MICROS), events)

    def _step(self, length: int) -> Column:
        return F.floor((F.col(MICROS) - F.lit(self.origin)) / F.lit(length)).cast("long")


def _raw_time(raw: DataFrame) -> Column:
    if raw.columns == [TEXT_COLUMN]:
        return F.try_to_timestamp(F.get_json_object(TEXT_COLUMN, "$.event_time"))
    return F.col("event_time").try_cast("timestamp")


def _checkpoint(frame: DataFrame) -> DataFrame:
    return frame.localCheckpoint(eager=True)


def _keyed(events: DataFrame) -> DataFrame:
    """``events`` with a ``row_key`` unique among them (scores join back on it), fixed by a checkpoint."""
    return _checkpoint(events.withColumn("row_key", F.monotonically_increasing_id()))


def add_stream_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """``--stream`` (a generated stream to read) or the generator's settings for a new one under ``--out``."""
    settings = {
        "events": 24000,
        "slices": 24,
        "train_files": 12,
        "seed": 7,
        "drift": 0.1,
        "new_entity_rate": 0.05,
        "entities": "per_member=1000,per_item=200",
        "entity_features": 5,
        "global_features": 10,
        "base_rate": 0.1,
    } | defaults
    parser.add_argument("--stream", help="a folder jobs.generate wrote (default: generate one under --out/stream)")
    parser.add_argument("--train-files", type=int, default=settings["train_files"], help="slices the nightly job sees")
    group = parser.add_argument_group("the generated stream (without --stream)")
    group.add_argument("--events", type=int, default=settings["events"])
    group.add_argument("--slices", type=int, default=settings["slices"], help="one landing file per slice")
    group.add_argument("--seed", type=int, default=settings["seed"], help="the stream's (and the simulation's) seed")
    group.add_argument("--drift", type=float, default=settings["drift"], help="sd of each coefficient's step per slice")
    group.add_argument("--new-entity-rate", type=float, default=settings["new_entity_rate"])
    group.add_argument("--entities", default=settings["entities"], help="initial entities per type: name=count,...")
    group.add_argument("--entity-features", type=int, default=settings["entity_features"])
    group.add_argument("--global-features", type=int, default=settings["global_features"])
    group.add_argument("--base-rate", type=float, default=settings["base_rate"], help="mean label")


def stream_from_arguments(arguments: argparse.Namespace, config: Config, out: Path) -> GeneratedStream:
    """The stream the command line names, or a new one generated (anew, from its seed) under ``out/stream``."""
    if arguments.stream:
        return GeneratedStream.at(arguments.stream)
    counts = {}
    for item in filter(None, arguments.entities.split(",")):
        name, _, count = item.partition("=")
        counts[name.strip()] = int(count)
    spec = StreamSpec(
        random_effects=tuple(
            RandomEffectSpec(
                r.name, r.entity_column, r.feature_bag, counts.get(r.name, DEFAULT_ENTITIES), arguments.entity_features
            )
            for r in config.model.random_effects
        ),
        events=arguments.events,
        slices=arguments.slices,
        global_features=arguments.global_features,
        global_bag=config.model.fixed_effect.feature_bag,
        task=config.model.task,
        base_rate=arguments.base_rate,
        drift=arguments.drift,
        new_entity_rate=arguments.new_entity_rate,
        seed=arguments.seed,
    )
    return generated(spec, out / "stream")


def generated(spec: StreamSpec, folder: Path) -> GeneratedStream:
    """``spec`` generated into ``folder`` (emptied first: the same spec always gives the same files)."""
    shutil.rmtree(folder, ignore_errors=True)
    generate(spec, folder)
    return GeneratedStream.at(folder)
