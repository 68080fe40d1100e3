"""A synthetic stream of training events with a known ground truth: ``python -m jobs.generate``.

The events follow a GAME model (DESIGN.md section 1) whose coefficients are drawn here and written
beside the stream, so that what the jobs learn can be checked against what generated the data::

    margin = intercept + beta . x_global + sum over random-effect types r of theta_{r, entity_r}(t) . x_r
    logistic: label ~ Bernoulli(sigmoid(margin)), written as 0/1;   linear: label = margin + N(0, noise_sd^2)

**Features.** Every bag holds dense N(0, 1) values rounded to 6 decimals. A feature is named by the
first letter of its bag and its term is its position: bag ``global`` holds ``{"name": "g", "term": "0"}``,
``{"name": "g", "term": "1"}``, ..., bag ``member`` holds ``{"name": "m", "term": "0"}``, ... Types that
share a bag read its first ``features`` entries. Coefficients use the same name-terms; an entity's
intercept is lambda_learner's ``("intercept", "intercept")``.

**Truth.** beta ~ N(0, fixed_scale^2); the intercept is solved so that the expected mean label of the
stream's events is ``base_rate`` (the mean of sigmoid(margin) for logistic, of the margin for linear).
An entity's coefficients start N(0, entity_scale^2) and walk: each later slice adds N(0, drift^2) to each.

**Entities.** Ids are ``<entity_column without "_id">-<zero-padded number>``, e.g. ``member-000017``.
The first slice introduces the initial pool of ``entities`` ids, each once (a pool larger than the
slice is cut to its event count), the slice's other events going by popularity. In every later
slice each event, independently per type, belongs with probability ``new_entity_rate`` to a new
entity (a fresh id beyond the pool with its own truth, one per such event) and otherwise to an entity
seen in an earlier slice, drawn by a Pareto popularity every entity has: a few entities recur a lot,
and every one stays reachable. Events are ``e<zero-padded index>``, all of weight 1.0.

**Bad events.** Every line but the first of each file (kept valid, so that a duplicate always repeats
an earlier valid event of its own file) is broken with probability ``bad_event_rate``, in exactly one
way, dealt round robin over a shuffled order of the kinds of docs/events.md "Rejections":
malformed_payload (the line cut in half), missing_event_id, duplicate_event_id, bad_event_time
(missing, or "not-a-time"), missing_label, label_out_of_domain (7 for logistic, NaN for linear),
bad_weight (negative), missing_entity_id (one type's id), bad_feature (a NaN value or a feature without
a name). Parquet holds neither a malformed line nor a time that is not a timestamp: there the kind
malformed_payload is skipped and a bad event time is always missing (null).

**Output.** Every file appears at once: it is written under a dot-name in its folder, then renamed
(file sources skip dot-files)::

    out_dir/landing/part-00000.json, ...   one file of JSON lines (or parquet) per slice, names in time order
    out_dir/truth/fixed_effect.json        task, feature bag, intercept, coefficients as name/term/value
    out_dir/truth/entities.parquet         re_type, entity_id, slice, name, term, value: every entity's
                                           coefficients at every slice from its first event to the last slice
    out_dir/truth/bad_events.jsonl         file, line (0-based), kind, reason (as quarantined), event_id (or null)
    out_dir/truth/stream.json              the spec, the kinds dealt, entities per type, and per slice its
                                           file, time window, events, bad events, new-entity events per type

Event times rise strictly (microseconds, ISO-8601 with a Z) within and across files. The same spec and
seed give byte-identical files.

**Impressions and clicks.** With ``--clicks`` the same events are written as the label join's two
input streams instead: ``out_dir/impressions/`` (the events without label and weight) and
``out_dir/clicks/`` (a click after a random delay for each event labelled 1, plus duplicate, orphan
and late-delivered clicks), with their truth; ``jobs/simulate/clicks.py`` describes them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from jobs.simulate.clicks import DELAYS, ClickSpec, generate_clicks
from jobs.simulate.spec import DEFAULT_ENTITIES, DEFAULT_RANDOM_EFFECTS, FORMATS, TASKS, RandomEffectSpec, StreamSpec
from jobs.simulate.writers import generate


def _parse_entities(text: str) -> dict[str, int]:
    counts = {}
    for item in filter(None, text.split(",")):
        name, separator, count = item.partition("=")
        if not separator or not count.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--entities wants name=count,...; got {item!r}")
        counts[name.strip()] = int(count)
    return counts


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (landing/ and truth/ below it)")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--slices", type=int, default=24, help="one landing file per slice")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--format", choices=FORMATS, default="json")
    parser.add_argument("--drift", type=float, default=0.1, help="sd of each coefficient's step per slice")
    parser.add_argument("--new-entity-rate", type=float, default=0.05)
    parser.add_argument("--bad-event-rate", type=float, default=0.0)
    parser.add_argument("--base-rate", type=float, default=0.1, help="mean label (positive rate for logistic)")
    parser.add_argument("--task", choices=TASKS, help="default: the config's model.task, else logistic")
    parser.add_argument(
        "--entities",
        type=_parse_entities,
        default={},
        help=f"initial entities per type; default per_member=2000,per_item=500, any other type {DEFAULT_ENTITIES}",
    )
    parser.add_argument("--entity-features", type=int, default=5, help="features per random-effect type")
    parser.add_argument("--global-features", type=int, default=10)
    parser.add_argument("--slice-minutes", type=float, default=60.0)
    parser.add_argument("--start", default="2026-11-01T00:00:00Z")
    parser.add_argument("--config", type=Path, help="take the random-effect types, bags and task from this YAML")
    clicks = parser.add_argument_group(
        "impressions and clicks", "with --clicks: two streams for the label join instead (jobs/simulate/clicks.py)"
    )
    clicks.add_argument("--clicks", action="store_true", help="write impressions/ and clicks/ instead of landing/")
    clicks.add_argument("--click-delay", choices=DELAYS, default="lognormal", help="the distribution of click delays")
    clicks.add_argument("--median-click-delay-minutes", type=float, default=5.0)
    clicks.add_argument("--click-delay-sigma", type=float, default=1.0, help="log-normal shape: the tail's weight")
    clicks.add_argument("--duplicate-click-rate", type=float, default=0.0, help="share of clicks sent twice")
    clicks.add_argument("--orphan-click-rate", type=float, default=0.0, help="clicks on no impression, per click")
    clicks.add_argument("--late-click-rate", type=float, default=0.0, help="share of clicks delivered late")
    clicks.add_argument("--late-click-minutes", type=float, default=120.0, help="how late a late click is delivered")
    clicks.add_argument("--trailing-click-slices", type=int, default=2, help="click files after the last impressions'")
    return parser.parse_args(argv)


def _click_spec_from_arguments(arguments: argparse.Namespace) -> ClickSpec:
    return ClickSpec(
        delay=arguments.click_delay,
        median_delay_minutes=arguments.median_click_delay_minutes,
        delay_sigma=arguments.click_delay_sigma,
        duplicate_rate=arguments.duplicate_click_rate,
        orphan_rate=arguments.orphan_click_rate,
        late_rate=arguments.late_click_rate,
        late_minutes=arguments.late_click_minutes,
        trailing_slices=arguments.trailing_click_slices,
    )


def _spec_from_arguments(arguments: argparse.Namespace) -> StreamSpec:
    """The spec the command line asks for."""
    task, global_bag = arguments.task, "global"
    if arguments.config is None:
        types = [(name, column, bag) for name, column, bag, _ in DEFAULT_RANDOM_EFFECTS]
    else:
        from jobs.runtime.config import load_config

        model = load_config(arguments.config).model
        if model.fixed_effect.source != "train":
            raise ValueError("model.fixed_effect.source score_column is not supported: events carry no score")
        types = [(r.name, r.entity_column, r.feature_bag) for r in model.random_effects]
        task, global_bag = task or model.task, model.fixed_effect.feature_bag
    unknown = set(arguments.entities) - {name for name, _, _ in types}
    if unknown:
        raise ValueError(f"--entities names unknown random-effect types: {', '.join(sorted(unknown))}")
    counts = {name: count for name, _, _, count in DEFAULT_RANDOM_EFFECTS} | arguments.entities
    return StreamSpec(
        random_effects=tuple(
            RandomEffectSpec(name, column, bag, counts.get(name, DEFAULT_ENTITIES), arguments.entity_features)
            for name, column, bag in types
        ),
        events=arguments.events,
        slices=arguments.slices,
        global_features=arguments.global_features,
        global_bag=global_bag,
        task=task or "logistic",
        base_rate=arguments.base_rate,
        drift=arguments.drift,
        new_entity_rate=arguments.new_entity_rate,
        bad_event_rate=arguments.bad_event_rate,
        slice_minutes=arguments.slice_minutes,
        start=arguments.start,
        format=arguments.format,
        seed=arguments.seed,
    )


def main(argv: Sequence[str] | None = None) -> None:
    arguments = _arguments(argv)
    began = time.perf_counter()
    try:
        spec = _spec_from_arguments(arguments)
        if arguments.clicks:
            result = generate_clicks(spec, _click_spec_from_arguments(arguments), arguments.out)
        else:
            result = generate(spec, arguments.out)
    except (ValueError, FileExistsError) as error:
        raise SystemExit(f"generate: {error}") from None
    print(json.dumps(result.summary() | {"seconds": round(time.perf_counter() - began, 3)}))


if __name__ == "__main__":
    main()
