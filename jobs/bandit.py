"""The bandit replay: what correct posterior variances are worth when the random effects drive Thompson sampling.

    python -m jobs.bandit --config conf/local.yaml --out var/bandit \\
        [--policies greedy,thompson,thompson_inverted,random] [--rounds-per-slice 1] \\
        [--requests 200] [--candidates 10] [--top-k 2] \\
        [--stream var/stream | --events 24000 --slices 24 --train-files 12 --seed 7 ...]

A closed loop on the generator's truth (``jobs.evaluate.bandit`` has the world): the first
``--train-files`` slices of the stream (generated under ``--out/stream`` unless ``--stream`` names
one; its truth is needed) train the nightly generation every policy starts from. Then, round after
round through the later slices, each policy ranks every request's candidates with the scoring job
(``jobs.score.score_requests``) on its own tables and shows the top k; the simulated user clicks by
the truth; the shown rows go back, clicked or not, to that policy's nearline job as a micro-batch:

- ``greedy``: by the means;
- ``thompson``: Thompson sampling with the posterior variances (one draw per request and entity);
- ``thompson_inverted``: the same, through a view of the tables with every variance v replaced by
  1/v: lambda-learner 0.1.0's sampling from N(mean, precision);
- ``random``: uniformly (its choices do not depend on the model, so it learns nothing; the loop skips it).

Every policy meets the same requests, candidates, features and click draws. Out come ``bandit.json``
(per round and policy: clicks, expected clicks, regret against the oracle's top k by true
probability, overall, for requests of new members and for requests whose best candidate is a new
item), ``bandit.md`` and ``bandit.png``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from pyspark.sql import SparkSession

from jobs.evaluate.bandit import (
    INVERTED,
    POLICIES,
    RANDOM,
    THOMPSON,
    InvertedVariances,
    World,
    make_round,
    outcome,
    random_choice,
    shown_rows,
    totals,
)
from jobs.evaluate.figures import to_json
from jobs.evaluate.plots import bandit_plot
from jobs.evaluate.streams import GeneratedStream, add_stream_arguments, read_raw, stream_from_arguments
from jobs.evaluate.variants import copy_tables, first_generation
from jobs.replay import JOBS
from jobs.runtime.cli import Job, job_parser, run_job
from jobs.runtime.settings import Config
from jobs.score import read_requests, score_requests
from jobs.simulate.spec import MICROS_PER_MINUTE
from jobs.storage.store import open_store

LOG = logging.getLogger("lambda_learner.bandit")


def bandit(
    spark: SparkSession,
    config: Config,
    stream: GeneratedStream,
    out: Path,
    *,
    train_files: int,
    policies: Sequence[str] = POLICIES,
    rounds_per_slice: int = 1,
    requests: int = 200,
    candidates: int = 10,
    top_k: int = 2,
    seed: int = 7,
    base: Config | None = None,
) -> dict:
    """Run the closed loop; return (and write) its figures.

    ``base``: the settings of tables already holding the first generation (trained on the first
    ``train_files`` files, e.g. by ``jobs.evaluate.variants.first_generation``): copied, not retrained.
    """
    files = stream.files
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    if not 0 < train_files < len(files):
        raise ValueError(f"--train-files must be between 1 and {len(files) - 1}, got {train_files}")
    if not 0 < top_k < candidates:
        raise ValueError(f"--top-k must be between 1 and --candidates - 1; got {top_k} of {candidates}")
    if len(config.model.random_effects) < 2:
        raise ValueError(
            "the bandit replay needs two random-effect types: requesters (the first) and items (the second)"
        )
    requester, candidate = (r.entity_column for r in config.model.random_effects[:2])
    world = World.of(stream)
    if base is None:
        LOG.info("training the first generation on %d slices", train_files)
        base = first_generation(spark, config, out / "tables" / "base", read_raw(spark, files[:train_files]), JOBS)
    learners = {p: copy_tables(base, out / "tables" / p, config) for p in policies if p != RANDOM}
    updaters = {p: JOBS.nearline(settings) for p, settings in learners.items()}
    rng = np.random.default_rng(seed)
    choice_rng = np.random.default_rng([seed, 1])
    slice_micros = world.spec.slice_minutes * MICROS_PER_MINUTE
    plan = [(s, part) for s in range(train_files, len(files)) for part in range(rounds_per_slice)]
    rounds: dict[str, list[dict]] = {p: [] for p in policies}
    seconds: dict[str, float] = dict.fromkeys(policies, 0.0)
    (out / "requests").mkdir(parents=True, exist_ok=True)
    (out / "feedback").mkdir(parents=True, exist_ok=True)
    for number, (slice_index, part) in enumerate(plan):
        events = world.slice_events(files[slice_index])
        events = events.iloc[part * len(events) // rounds_per_slice : (part + 1) * len(events) // rounds_per_slice]
        when = stream.slice_start(slice_index) + round(part * slice_micros / rounds_per_slice)
        round_ = make_round(
            world,
            events.reset_index(drop=True),
            number=number,
            slice_index=slice_index,
            time=_utc(when),
            cutoff_slice=train_files,
            requests=requests,
            candidates=candidates,
            requester=requester,
            candidate=candidate,
            rng=rng,
        )
        path = out / "requests" / f"round-{number:04d}.jsonl"
        path.write_text("\n".join(round_.request_lines(world)) + "\n")
        frame = read_requests(spark, str(path), config) if learners else None
        last = number + 1 == len(plan)
        for policy in policies:
            began = time.perf_counter()
            if policy == RANDOM:
                shown = random_choice(round_, top_k, choice_rng)
            else:
                store = open_store(spark, learners[policy].storage)
                scored = score_requests(
                    InvertedVariances(store) if policy == INVERTED else store,
                    learners[policy],
                    frame,
                    thompson=policy in (THOMPSON, INVERTED),
                    seed=seed * 100_003 + number,
                    top_k=top_k,
                ).toPandas()
                shown = shown_rows(round_, scored, candidate)
            rounds[policy].append(outcome(round_, shown, top_k))
            if policy != RANDOM and not last:  # nothing is chosen after the last round: nothing to learn from it
                feedback = out / "feedback" / f"{policy}-{number:04d}.json"
                feedback.write_text("\n".join(round_.feedback_lines(world, shown, policy)) + "\n")
                updaters[policy](read_raw(spark, [feedback]), number + 1)
            seconds[policy] += time.perf_counter() - began
        LOG.info(
            "round %d (slice %d): regret %s",
            number,
            slice_index,
            {p: round(r[-1]["all"]["regret"], 2) for p, r in rounds.items()},
        )

    report = {
        "train_slices": train_files,
        "rounds_per_slice": rounds_per_slice,
        "requests_per_round": requests,
        "candidates": candidates,
        "top_k": top_k,
        "seed": seed,
        "summary": {p: totals(r) | {"seconds": round(seconds[p], 1)} for p, r in rounds.items()},
        "rounds": rounds,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bandit.json").write_text(to_json(report))
    bandit_plot(report, out)
    (out / "bandit.md").write_text(markdown(report))
    return report


def _utc(micros: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)


def markdown(report: dict) -> str:
    rounds = len(next(iter(report["rounds"].values())))
    lines = [
        "# Bandit replay",
        "",
        f"{rounds} rounds of {report['requests_per_round']} requests, top {report['top_k']} of "
        f"{report['candidates']} candidates each; regret is expected clicks lost to the oracle's top "
        f"{report['top_k']} by true click probability.",
        "",
        "| policy | clicks | expected clicks | regret | regret per request | new members: regret per request "
        "| best item new: regret per request | new items shown | clicks on new items |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for policy, summary in report["summary"].items():
        overall, members, items = summary["all"], summary["new_requester"], summary["new_best_item"]
        lines.append(
            f"| {policy} | {overall['clicks']:.0f} | {overall['expected_clicks']:.1f} | {overall['regret']:.1f} "
            f"| {overall['regret_per_request']:.4f} | {members['regret_per_request']:.4f} "
            f"| {items['regret_per_request']:.4f} | {overall['new_items_shown']:.0f} "
            f"| {overall['new_item_clicks']:.0f} |"
        )
    first = next(iter(report["summary"].values()))
    lines += [
        "",
        f"The oracle would have earned {first['all']['oracle_clicks']:.1f} expected clicks. Of the "
        f"{first['all']['requests']:.0f} requests, {first['new_requester']['requests']:.0f} came from members born "
        f"after the nightly cutoff and {first['new_best_item']['requests']:.0f} had an item born after it as their "
        "best candidate.",
        "",
        "![bandit](bandit.png)",
        "",
    ]
    return "\n".join(lines)


def _bandit(job: Job) -> int:
    args, out = job.arguments, Path(job.arguments.out)
    report = bandit(
        job.spark,
        job.config,
        stream_from_arguments(args, job.config, out),
        out,
        train_files=args.train_files,
        policies=[p.strip() for p in args.policies.split(",") if p.strip()],
        rounds_per_slice=args.rounds_per_slice,
        requests=args.requests,
        candidates=args.candidates,
        top_k=args.top_k,
        seed=args.seed,
    )
    print(markdown(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("The bandit replay: policies in a closed loop on the generator's truth.", "bandit")
    parser.add_argument("--out", required=True, help="folder for the stream, the tables, the figures and the plot")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma separated: " + ", ".join(POLICIES))
    parser.add_argument("--rounds-per-slice", type=int, default=1, help="rounds (nearline micro-batches) per slice")
    parser.add_argument("--requests", type=int, default=200, help="requests per round")
    parser.add_argument("--candidates", type=int, default=10, help="candidate items per request")
    parser.add_argument("--top-k", type=int, default=2, help="items shown per request")
    add_stream_arguments(parser)
    return run_job(parser, _bandit, argv)


if __name__ == "__main__":
    sys.exit(main())
