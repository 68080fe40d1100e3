"""The synthetic stream generator: real files in tmp_path, checked against docs/events.md and the written truth.

Statistical checks allow 4 standard deviations of the quantity's sampling spread: with a fixed seed
they are deterministic, and a correct generator passes them for almost every seed.
"""

import itertools
import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs.simulate.spec import KINDS, RandomEffectSpec, StreamSpec
from jobs.simulate.writers import generate
from lambda_learner.representation import INTERCEPT

ROOT = Path(__file__).resolve().parents[2]
MEMBER = RandomEffectSpec("per_member", "member_id", "member", entities=150, features=3)
ITEM = RandomEffectSpec("per_item", "item_id", "item", entities=40, features=2)
SIGMAS = 4.0


def make_spec(**overrides) -> StreamSpec:
    base = {"random_effects": (MEMBER, ITEM), "events": 4000, "slices": 8, "global_features": 4}
    return StreamSpec(**(base | overrides))


def landing_files(out: Path) -> list[Path]:
    return sorted((out / "landing").iterdir())


def read_events(path: Path) -> list[dict | None]:
    """The file's events in line order; None for a line that is not JSON."""
    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
        for row in rows:
            row["features"] = dict(row["features"]) if row["features"] is not None else None
        return rows
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            events.append(None)
    return events


def read_truth(out: Path, name: str):
    path = out / "truth" / name
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pandas()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


def finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_time(value) -> bool:
    if isinstance(value, datetime):
        return True
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return False
    return True


def rejection(event: dict | None, spec: StreamSpec) -> str | None:
    """The first rule of docs/events.md the event breaks by itself (duplicates need the file: see rejections)."""
    if not isinstance(event, dict):
        return "malformed_payload"
    if not event.get("event_id"):
        return "missing_event_id"
    if not is_time(event.get("event_time")):
        return "bad_event_time"
    label = event.get("label")
    if label is None:
        return "missing_label"
    if not finite(label) or (spec.task == "logistic" and label not in (0, 1, -1)):
        return "label_out_of_domain"
    weight = event.get("weight")
    if weight is not None and (not finite(weight) or weight < 0):
        return "bad_weight"
    for random_effect in spec.random_effects:
        if not event.get(random_effect.entity_column):
            return f"missing_entity_id:{random_effect.entity_column}"
    for features in (event.get("features") or {}).values():
        if any(not feature.get("name") or not finite(feature.get("value")) for feature in features):
            return "bad_feature"
    return None


def rejections(out: Path, spec: StreamSpec) -> dict[tuple[str, int], str]:
    """Every line a reader must reject, with its reason; a valid event repeating an earlier valid id is a duplicate."""
    found = {}
    for path in landing_files(out):
        seen: set[str] = set()
        for line, event in enumerate(read_events(path)):
            reason = rejection(event, spec)
            if reason is None and event["event_id"] in seen:
                reason = "duplicate_event_id"
            if reason is None:
                seen.add(event["event_id"])
            else:
                found[(path.name, line)] = reason
    return found


def assert_well_formed(event: dict, spec: StreamSpec) -> None:
    """A valid event has every field of docs/events.md, of its type, and every bag in full."""
    columns = [random_effect.entity_column for random_effect in spec.random_effects]
    assert set(event) == {"event_id", "event_time", "label", "weight", *columns, "features"}
    assert re.fullmatch(r"e\d{8,}", event["event_id"])
    assert event["label"] in (0, 1)
    assert event["weight"] == 1.0
    for column in columns:
        assert re.fullmatch(rf"{column.removesuffix('_id')}-\d{{6,}}", event[column])
    assert {bag: len(features) for bag, features in event["features"].items()} == spec.bags
    for bag, features in event["features"].items():
        assert [(f["name"], f["term"]) for f in features] == [(bag[0], str(j)) for j in range(len(features))]
        assert all(finite(f["value"]) for f in features)


@pytest.fixture(scope="module", params=["json", "parquet"])
def broken_stream(request, tmp_path_factory) -> tuple[StreamSpec, Path]:
    spec = make_spec(format=request.param, bad_event_rate=0.1)
    out = tmp_path_factory.mktemp(f"broken-{request.param}")
    generate(spec, out)
    return spec, out


def test_every_line_is_a_valid_event_or_a_recorded_bad_one(broken_stream):
    spec, out = broken_stream
    recorded = read_truth(out, "bad_events.jsonl")
    assert rejections(out, spec) == {(record["file"], record["line"]): record["reason"] for record in recorded}
    bad_lines = {(record["file"], record["line"]) for record in recorded}
    for path in landing_files(out):
        text = path.read_text().splitlines() if path.suffix == ".json" else None
        for line, event in enumerate(read_events(path)):
            if (path.name, line) in bad_lines:
                continue
            assert_well_formed(event, spec)
            if text is not None:
                assert text[line] == json.dumps(event)


def test_bad_events_come_in_every_kind_at_the_requested_rate(broken_stream):
    spec, out = broken_stream
    recorded = read_truth(out, "bad_events.jsonl")
    # The first line of each file is never broken.
    candidates = spec.events - spec.slices
    expected = spec.bad_event_rate * candidates
    spread = math.sqrt(candidates * spec.bad_event_rate * (1 - spec.bad_event_rate))
    assert abs(len(recorded) - expected) <= SIGMAS * spread
    per_kind = pd.Series([record["kind"] for record in recorded]).value_counts()
    possible = [kind for kind in KINDS if not (spec.format == "parquet" and kind == "malformed_payload")]
    assert sorted(per_kind.index) == sorted(possible)
    assert per_kind.max() - per_kind.min() <= 1
    events_by_file = {path.name: read_events(path) for path in landing_files(out)}
    for record in recorded:
        event = events_by_file[record["file"]][record["line"]]
        if record["kind"] != "malformed_payload":
            assert record["event_id"] == event.get("event_id")
    stream = read_truth(out, "stream.json")
    assert [entry["bad_events"] for entry in stream["slices"]] == [
        sum(record["file"] == entry["file"] for record in recorded) for entry in stream["slices"]
    ]


def test_same_seed_gives_the_same_bytes_and_another_seed_other_files(tmp_path):
    for format in ("json", "parquet"):
        spec = make_spec(format=format, bad_event_rate=0.05, events=1500, slices=3)
        runs = {name: tmp_path / f"{format}-{name}" for name in ("first", "again", "other")}
        generate(spec, runs["first"])
        generate(spec, runs["again"])
        generate(replace(spec, seed=spec.seed + 1), runs["other"])
        names = sorted(str(path.relative_to(runs["first"])) for path in runs["first"].rglob("*") if path.is_file())
        assert [name for name in names if "landing" in name] == [f"landing/part-0000{i}.{format}" for i in range(3)]
        for name in names:
            assert (runs["first"] / name).read_bytes() == (runs["again"] / name).read_bytes(), name
        for name in names:
            assert (runs["first"] / name).read_bytes() != (runs["other"] / name).read_bytes(), name


def coefficient_steps(entities: pd.DataFrame) -> pd.DataFrame:
    """Each coefficient's change from one slice to the next, per entity."""
    ordered = entities.sort_values(["re_type", "entity_id", "name", "term", "slice"])
    same = ordered[["re_type", "entity_id", "name", "term"]].eq(
        ordered[["re_type", "entity_id", "name", "term"]].shift()
    )
    consecutive = same.all(axis=1) & (ordered["slice"].diff() == 1)
    return ordered["value"].diff()[consecutive]


@pytest.mark.parametrize("drift", [0.0, 0.3])
def test_entity_coefficients_drift_as_asked(tmp_path, drift):
    spec = make_spec(drift=drift, events=3000, slices=6)
    generate(spec, tmp_path)
    entities = read_truth(tmp_path, "entities.parquet")
    steps = coefficient_steps(entities)
    assert len(steps) > 1000
    if drift == 0:
        assert (steps == 0).all()
    else:
        assert abs(steps.std() - drift) <= SIGMAS * drift / math.sqrt(2 * len(steps))
        assert abs(steps.mean()) <= SIGMAS * drift / math.sqrt(len(steps))


def test_entities_start_at_the_entity_scale_and_stay_until_the_end(tmp_path):
    spec = make_spec(entity_scale=0.7, events=3000, slices=6)
    generate(spec, tmp_path)
    entities = read_truth(tmp_path, "entities.parquet")
    first_slice = entities.groupby(["re_type", "entity_id"])["slice"].transform("min")
    starting = entities.loc[entities["slice"] == first_slice, "value"]
    assert abs(starting.std() - 0.7) <= SIGMAS * 0.7 / math.sqrt(2 * len(starting))
    per_entity = entities.groupby(["re_type", "entity_id"])["slice"].agg(["min", "nunique"])
    assert (per_entity["nunique"] == spec.slices - per_entity["min"]).all()
    coefficients = entities.groupby("re_type")[["name", "term"]].apply(
        lambda frame: sorted(set(map(tuple, frame.values)))
    )
    assert coefficients["per_member"] == sorted([INTERCEPT, ("m", "0"), ("m", "1"), ("m", "2")])
    assert coefficients["per_item"] == sorted([INTERCEPT, ("i", "0"), ("i", "1")])


@pytest.mark.parametrize("rate", [0.0, 0.15])
def test_new_entities_arrive_at_the_requested_rate(tmp_path, rate):
    spec = make_spec(new_entity_rate=rate, events=6000, slices=6)
    generate(spec, tmp_path)
    stream = read_truth(tmp_path, "stream.json")
    for random_effect in spec.random_effects:
        seen: set[str] = set()
        for index, path in enumerate(landing_files(tmp_path)):
            ids = [event[random_effect.entity_column] for event in read_events(path)]
            new = sum(entity not in seen for entity in ids)
            recorded = stream["slices"][index]["new_entity_events"][random_effect.name]
            if index > 0:
                # One fresh entity per new-entity event, so the count read back is the count drawn.
                assert new == recorded
                assert abs(new / len(ids) - rate) <= SIGMAS * math.sqrt(rate * (1 - rate) / len(ids))
            else:
                assert recorded == 0
            seen.update(ids)


def true_margins(out: Path, spec: StreamSpec) -> tuple[np.ndarray, np.ndarray]:
    """Each event's margin computed from its features and the written truth, and its label."""
    fixed = read_truth(out, "fixed_effect.json")
    beta = {(c["name"], c["term"]): c["value"] for c in fixed["coefficients"]}
    entities = read_truth(out, "entities.parquet")
    coefficients = {
        key: dict(zip(zip(group["name"], group["term"], strict=True), group["value"], strict=True))
        for key, group in entities.groupby(["re_type", "entity_id", "slice"])
    }
    margins, labels = [], []
    for index, path in enumerate(landing_files(out)):
        for event in read_events(path):
            margin = fixed["intercept"] + sum(
                beta[(f["name"], f["term"])] * f["value"] for f in event["features"][spec.global_bag]
            )
            for random_effect in spec.random_effects:
                theta = coefficients[(random_effect.name, event[random_effect.entity_column], index)]
                margin += theta[INTERCEPT] + sum(
                    theta.get((f["name"], f["term"]), 0.0) * f["value"]
                    for f in event["features"][random_effect.feature_bag]
                )
            margins.append(margin)
            labels.append(event["label"])
    return np.array(margins), np.array(labels, dtype=float)


def test_logistic_labels_follow_the_truth(tmp_path):
    spec = make_spec(events=20000, slices=4, base_rate=0.2)
    generate(spec, tmp_path)
    margins, labels = true_margins(tmp_path, spec)
    probabilities = 1 / (1 + np.exp(-margins))
    # The intercept is solved on these very events, so the truth reproduces the base rate exactly.
    assert probabilities.mean() == pytest.approx(spec.base_rate, abs=1e-6)
    for rows in [np.arange(len(labels)), *np.array_split(np.argsort(margins), 10)]:
        p = probabilities[rows]
        spread = math.sqrt((p * (1 - p)).sum()) / len(rows)
        assert abs(labels[rows].mean() - p.mean()) <= SIGMAS * spread


def test_linear_labels_are_the_margin_plus_noise(tmp_path):
    spec = make_spec(task="linear", events=8000, slices=4, base_rate=1.5, noise_sd=0.5)
    generate(spec, tmp_path)
    margins, labels = true_margins(tmp_path, spec)
    assert margins.mean() == pytest.approx(spec.base_rate, abs=1e-9)
    noise = labels - margins
    assert abs(noise.mean()) <= SIGMAS * spec.noise_sd / math.sqrt(len(noise))
    assert abs(noise.std() - spec.noise_sd) <= SIGMAS * spec.noise_sd / math.sqrt(2 * len(noise))


def test_event_times_rise_within_and_across_files(tmp_path):
    spec = make_spec(events=3000, slices=5, slice_minutes=30, start="2026-11-01T06:00:00Z")
    generate(spec, tmp_path)
    stream = read_truth(tmp_path, "stream.json")
    files = landing_files(tmp_path)
    assert [path.name for path in files] == [entry["file"] for entry in stream["slices"]]
    times = []
    for path, entry in zip(files, stream["slices"], strict=True):
        in_file = [datetime.fromisoformat(event["event_time"]) for event in read_events(path)]
        assert all(text.endswith("Z") for text in (event["event_time"] for event in read_events(path)))
        assert datetime.fromisoformat(entry["start"]) <= min(in_file)
        assert max(in_file) < datetime.fromisoformat(entry["end"])
        times += in_file
    assert all(earlier < later for earlier, later in itertools.pairwise(times))
    assert stream["slices"][0]["start"].startswith("2026-11-01T06:00:00")
    assert stream["slices"][-1]["end"].startswith("2026-11-01T08:30:00")


def normalised(event: dict) -> dict:
    """A JSON event as parquet holds it: a timestamp, a float label."""
    return event | {"event_time": datetime.fromisoformat(event["event_time"]), "label": float(event["label"])}


def test_parquet_holds_what_json_holds(tmp_path):
    bad = {}
    for format in ("json", "parquet"):
        generate(make_spec(format=format, bad_event_rate=0.05, events=2000, slices=4), tmp_path / format)
        bad[format] = {(Path(r["file"]).stem, r["line"]) for r in read_truth(tmp_path / format, "bad_events.jsonl")}
    assert bad["json"] == bad["parquet"]
    assert read_truth(tmp_path / "json", "fixed_effect.json") == read_truth(tmp_path / "parquet", "fixed_effect.json")
    json_files, parquet_files = landing_files(tmp_path / "json"), landing_files(tmp_path / "parquet")
    for json_file, parquet_file in zip(json_files, parquet_files, strict=True):
        json_events, parquet_events = read_events(json_file), read_events(parquet_file)
        assert len(json_events) == len(parquet_events)
        for line, (from_json, from_parquet) in enumerate(zip(json_events, parquet_events, strict=True)):
            if (json_file.stem, line) not in bad["json"]:
                assert normalised(from_json) == from_parquet


def test_types_sharing_a_bag_read_its_first_features(tmp_path):
    shared = RandomEffectSpec("per_item", "item_id", "member", entities=40, features=2)
    spec = make_spec(random_effects=(MEMBER, shared), events=1000, slices=2)
    generate(spec, tmp_path)
    event = read_events(landing_files(tmp_path)[0])[0]
    assert {bag: len(features) for bag, features in event["features"].items()} == {"global": 4, "member": 3}
    entities = read_truth(tmp_path, "entities.parquet")
    item_terms = set(map(tuple, entities.loc[entities["re_type"] == "per_item", ["name", "term"]].values))
    assert item_terms == {INTERCEPT, ("m", "0"), ("m", "1")}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"events": 0}, "events"),
        ({"slices": 0}, "slices"),
        ({"events": 5, "slices": 6}, "events"),
        ({"global_features": -1}, "global_features"),
        ({"new_entity_rate": 1.5}, "new_entity_rate"),
        ({"bad_event_rate": -0.1}, "bad_event_rate"),
        ({"base_rate": 0.0}, "base_rate"),
        ({"task": "poisson"}, "task"),
        ({"format": "csv"}, "format"),
        ({"drift": -0.1}, "drift"),
        ({"entity_scale": math.inf}, "entity_scale"),
        ({"noise_sd": math.nan}, "noise_sd"),
        ({"start": "yesterday"}, "start"),
        ({"slice_minutes": 1e-6}, "slice_minutes"),
        ({"seed": -1}, "seed"),
        ({"global_bag": "bad bag"}, "global_bag"),
        ({"random_effects": (MEMBER, MEMBER)}, "name"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        make_spec(**overrides)


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"entities": 0}, "entities"),
        ({"features": -1}, "features"),
        ({"entity_column": "event_id"}, "entity_column"),
        ({"feature_bag": ""}, "feature_bag"),
    ],
)
def test_a_bad_random_effect_is_refused_naming_the_field(arguments, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        replace(MEMBER, **arguments)


def test_generate_refuses_a_folder_with_a_stream_in_it(tmp_path):
    generate(make_spec(events=100, slices=2), tmp_path)
    with pytest.raises(FileExistsError, match="landing"):
        generate(make_spec(events=100, slices=2), tmp_path)


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.generate", *arguments], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_the_command_line_generates_and_prints_a_summary(tmp_path):
    out = tmp_path / "demo"
    done = run_cli(
        "--out",
        str(out),
        "--events",
        "3000",
        "--slices",
        "3",
        "--entities",
        "per_member=100,per_item=20",
        "--bad-event-rate",
        "0.02",
        "--format",
        "parquet",
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["events"] == 3000
    assert summary["files"] == 3
    assert set(summary["new_entity_events"]) == {"per_member", "per_item"}
    assert [path.name for path in landing_files(out)] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert summary["bad_events"] == len(read_truth(out, "bad_events.jsonl"))


def test_the_command_line_takes_the_model_from_a_config(tmp_path):
    config = tmp_path / "model.yaml"
    config.write_text(
        "model:\n  task: linear\n  random_effects:\n    - {name: per_ad, entity_column: ad_id, feature_bag: ad}\n"
    )
    out = tmp_path / "demo"
    done = run_cli(
        "--out",
        str(out),
        "--events",
        "500",
        "--slices",
        "2",
        "--config",
        str(config),
        "--entities",
        "per_ad=30",
        "--entity-features",
        "2",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["entities"].keys() == {"per_ad"}
    event = read_events(landing_files(out)[0])[0]
    assert event["ad_id"].startswith("ad-")
    assert {bag: len(features) for bag, features in event["features"].items()} == {"global": 10, "ad": 2}
    assert read_truth(out, "fixed_effect.json")["task"] == "linear"


def test_the_command_line_refuses_a_bad_rate_naming_it(tmp_path):
    done = run_cli("--out", str(tmp_path / "demo"), "--bad-event-rate", "2")
    assert done.returncode != 0
    assert "bad_event_rate" in done.stderr
