"""The stream written out: landing files (JSON lines or parquet), each appearing whole, and its truth."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.simulate.bad_events import BadEvent, broken_event, deal_bad_events
from jobs.simulate.population import SimulatedStream, iso_times, simulate, take_strings
from jobs.simulate.spec import (
    MICROS_PER_MINUTE,
    WEIGHT,
    GroundTruth,
    StreamSpec,
    epoch_micros,
)
from lambda_learner.representation import INTERCEPT

FEATURE = pa.struct([("name", pa.string()), ("term", pa.string()), ("value", pa.float64())])
ENTITIES_SCHEMA = pa.schema(
    [
        ("re_type", pa.string()),
        ("entity_id", pa.string()),
        ("slice", pa.int32()),
        ("name", pa.string()),
        ("term", pa.string()),
        ("value", pa.float64()),
    ]
)


def _line_template(spec: StreamSpec) -> str:
    """A %-format of one clean event's line, byte for byte what json.dumps writes for its object."""
    fields = ['"event_id": "%s"', '"event_time": "%s"', '"label": %r', f'"weight": {WEIGHT!r}']
    fields += [f'"{random_effect.entity_column}": "%s"' for random_effect in spec.random_effects]
    bags = [
        f'"{bag}": [' + ", ".join(f'{{"name": "{bag[0]}", "term": "{j}", "value": %r}}' for j in range(width)) + "]"
        for bag, width in spec.bags.items()
    ]
    return "{" + ", ".join(fields) + ', "features": {' + ", ".join(bags) + "}}"


def _json_lines(stream: SimulatedStream, start: int, stop: int, bad: list[BadEvent]) -> str:
    spec = stream.spec
    template = _line_template(spec)
    columns = [stream.event_ids(start, stop), iso_times(stream.times[start:stop]), stream.labels[start:stop].tolist()]
    columns += [stream.entity_ids(t, start, stop).to_pylist() for t in range(len(spec.random_effects))]
    values = np.hstack([stream.features[bag][start:stop] for bag in spec.bags]).tolist()
    lines = [template % (*head, *row) for head, row in zip(zip(*columns, strict=True), values, strict=True)]
    for event in bad:
        broken = broken_event(stream.event(event.index), event, spec.task)
        lines[event.index - start] = broken if isinstance(broken, str) else json.dumps(broken)
    return "".join(line + "\n" for line in lines)


def _arrow_schema(spec: StreamSpec) -> pa.Schema:
    fields = [
        ("event_id", pa.string()),
        ("event_time", pa.timestamp("us", tz="UTC")),
        ("label", pa.float64()),
        ("weight", pa.float64()),
    ]
    fields += [(random_effect.entity_column, pa.string()) for random_effect in spec.random_effects]
    fields.append(("features", pa.map_(pa.string(), pa.list_(FEATURE))))
    return pa.schema(fields)


def _parquet_table(stream: SimulatedStream, start: int, stop: int, bad: list[BadEvent]) -> pa.Table:
    spec = stream.spec
    schema = _arrow_schema(spec)
    count = stop - start
    widths = np.array(list(spec.bags.values()))
    names = [bag[0] for bag, width in spec.bags.items() for _ in range(width)]
    terms = [str(j) for width in widths for j in range(width)]
    columns = np.tile(np.arange(widths.sum()), count)
    values = np.hstack([stream.features[bag][start:stop] for bag in spec.bags]).ravel()
    bag_lists = pa.ListArray.from_arrays(
        np.concatenate([[0], np.cumsum(np.tile(widths, count))]).astype(np.int32),
        pa.StructArray.from_arrays(
            [take_strings(names, columns), take_strings(terms, columns), pa.array(values)], fields=FEATURE
        ),
    )
    features = pa.MapArray.from_arrays(
        np.arange(0, count * len(widths) + 1, len(widths), dtype=np.int32),
        take_strings(list(spec.bags), np.tile(np.arange(len(widths)), count)),
        bag_lists,
        type=schema.field("features").type,
    )
    arrays = [
        pa.array(stream.event_ids(start, stop)),
        pa.array(stream.times[start:stop], type=schema.field("event_time").type),
        pa.array(stream.labels[start:stop].astype(np.float64)),
        pa.array(np.full(count, WEIGHT)),
        *[stream.entity_ids(t, start, stop) for t in range(len(spec.random_effects))],
        features,
    ]
    clean = pa.Table.from_arrays(arrays, schema=schema)
    if not bad:
        return clean
    rows = []
    for event in bad:
        row = broken_event(stream.event(event.index), event, spec.task)
        if "event_time" in row:
            row["event_time"] = datetime.fromisoformat(row["event_time"])
        rows.append(row)
    broken_lines = np.array([event.index - start for event in bad])
    kept = np.ones(count, dtype=bool)
    kept[broken_lines] = False
    table = pa.concat_tables([clean.filter(pa.array(kept)), pa.Table.from_pylist(rows, schema=schema)])
    return table.take(np.argsort(np.concatenate([np.flatnonzero(kept), broken_lines]), kind="stable"))


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _entities_table(stream: SimulatedStream) -> pa.Table:
    parts = []
    for population in stream.populations:
        coefficients = [INTERCEPT] + [(population.spec.feature_bag[0], str(j)) for j in range(population.spec.features)]
        entity = np.concatenate([np.repeat(seen, len(coefficients)) for seen, _ in population.snapshots])
        slices = np.concatenate(
            [np.full(theta.size, index, dtype=np.int32) for index, (_, theta) in enumerate(population.snapshots)]
        )
        coefficient = np.tile(np.arange(len(coefficients)), len(entity) // len(coefficients))
        columns = [
            take_strings([population.spec.name], np.zeros(len(entity), dtype=np.int64)),
            pc.take(population.ids, entity),
            pa.array(slices),
            take_strings([name for name, _ in coefficients], coefficient),
            take_strings([term for _, term in coefficients], coefficient),
            pa.array(np.concatenate([theta.ravel() for _, theta in population.snapshots])),
        ]
        parts.append(pa.Table.from_arrays(columns, schema=ENTITIES_SCHEMA))
    return pa.concat_tables(parts) if parts else ENTITIES_SCHEMA.empty_table()


def _write_truth(stream: SimulatedStream, bad: list[list[BadEvent]], files: list[Path], truth: Path) -> GroundTruth:
    spec = stream.spec
    fixed_effect = {
        "task": spec.task,
        "feature_bag": spec.global_bag,
        "intercept": stream.intercept,
        "coefficients": [
            {"name": spec.global_bag[0], "term": str(j), "value": value} for j, value in enumerate(stream.beta.tolist())
        ],
    }
    write_text(truth / "fixed_effect.json", json.dumps(fixed_effect, indent=2) + "\n")
    table = _entities_table(stream)
    write_atomically(truth / "entities.parquet", lambda temporary: pq.write_table(table, temporary))

    records = [
        {
            "file": path.name,
            "line": event.index - first,
            "kind": event.kind,
            "reason": event.reason,
            "event_id": event.event_id,
        }
        for path, first, in_slice in zip(files, stream.bounds[:-1].tolist(), bad, strict=True)
        for event in in_slice
    ]
    write_text(truth / "bad_events.jsonl", "".join(json.dumps(record) + "\n" for record in records))

    slice_micros = round(spec.slice_minutes * MICROS_PER_MINUTE)
    edges = iso_times(epoch_micros(spec.start) + slice_micros * np.arange(spec.slices + 1))
    slices = [
        {
            "slice": index,
            "file": path.name,
            "start": edges[index],
            "end": edges[index + 1],
            "events": int(stream.bounds[index + 1] - stream.bounds[index]),
            "bad_events": len(bad[index]),
            "new_entity_events": {p.spec.name: int(p.is_new[index].sum()) for p in stream.populations},
        }
        for index, path in enumerate(files)
    ]
    entities = {p.spec.name: len(p.seen) for p in stream.populations}
    new_entity_events = {p.spec.name: sum(int(flags.sum()) for flags in p.is_new) for p in stream.populations}
    summary = {"spec": asdict(spec), "kinds": list(spec.kinds), "entities": entities, "slices": slices}
    write_text(truth / "stream.json", json.dumps(summary, indent=2) + "\n")
    bad_events = sum(map(len, bad))
    return GroundTruth(files[0].parent, truth, tuple(files), spec.events, bad_events, new_entity_events, entities)


def generate(spec: StreamSpec, out_dir: Path) -> GroundTruth:
    """Write the stream of ``spec`` to ``out_dir/landing`` and its truth to ``out_dir/truth``."""
    landing, truth = Path(out_dir) / "landing", Path(out_dir) / "truth"
    for folder in (landing, truth):
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} is not empty; generate into a fresh folder")
        folder.mkdir(parents=True, exist_ok=True)
    bad_seed, *simulation_seeds = np.random.SeedSequence(spec.seed).spawn(4 + len(spec.random_effects))
    stream = simulate(spec, simulation_seeds)
    bad = deal_bad_events(stream, bad_seed)
    files = [landing / f"part-{index:05d}.{spec.format}" for index in range(spec.slices)]
    # The truth first: whoever watches the landing folder can evaluate as soon as files arrive.
    result = _write_truth(stream, bad, files, truth)
    starts, stops = stream.bounds[:-1].tolist(), stream.bounds[1:].tolist()
    for path, start, stop, in_slice in zip(files, starts, stops, bad, strict=True):
        if spec.format == "json":
            write_text(path, _json_lines(stream, start, stop, in_slice))
        else:
            table = _parquet_table(stream, start, stop, in_slice)
            write_atomically(path, lambda temporary, table=table: pq.write_table(table, temporary))
    return result


def in_order(files: Sequence[Path], after: float = 0.0) -> None:
    """Modification times a second apart, rising with the files' order, ending now (or later than ``after``).

    A file source takes files by modification time (in milliseconds): small files written in the
    same millisecond would be taken in any order.
    """
    first = max(time.time() - (len(files) - 1), after + 1.0)
    for index, path in enumerate(files):
        os.utime(path, (first + index, first + index))


def deliver(files: Sequence[Path], folder: Path) -> None:
    """Land copies of ``files`` in ``folder``, each appearing whole, to be taken in their order after those there."""
    folder.mkdir(parents=True, exist_ok=True)
    there = [path.stat().st_mtime for path in folder.iterdir() if not path.name.startswith(".")]
    hidden = [folder / f".{path.name}" for path in files]
    for source, copy in zip(files, hidden, strict=True):
        shutil.copyfile(source, copy)
    in_order(hidden, after=max(there, default=0.0))
    for copy in hidden:
        copy.rename(folder / copy.name[1:])
