"""Scoring: GAME scores of candidate rows, by the means or Thompson-sampled, ranked per request.

    python -m jobs.score --config conf/local.yaml --requests var/demo/requests.jsonl --out var/demo/scores \\
        [--thompson --seed 7] [--top-k 5]

A request row is an event without a label: ``request_id``, one id per random-effect type
and the feature bags (docs/events.md). Its score is the current generation's fixed effect
plus, per random-effect type, the entity's live coefficients (``re_state``), else its
prior in the current generation, else nothing (a new entity gets the fixed effect alone).
With ``--thompson`` each request draws every entity's coefficients once from
``N(mean, variance)``, and what an entity lacks (every coefficient of a new entity) from the
prior ``N(0, 1 / penalty)``: the scores of one request's candidates are a consistent sample, so
ranking them is Thompson sampling, the bandit's explore-exploit step. Without ``--seed`` every
run draws anew; with it, the same requests get the same draws.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
from collections.abc import Sequence

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, MapType, StringType, StructField, StructType

from jobs.game.generation import current_generation, priors_of
from jobs.game.model import with_game_scores
from jobs.game.random_effect import score_column
from jobs.runtime.cli import Job, job_parser, run_job
from jobs.runtime.settings import Config, RandomEffectConfig
from jobs.storage.schemas import FEATURES, bag_column, feature_bags
from jobs.storage.store import TableStore, open_store
from udfs.entity_kernels import ScoreKernel

LOG = logging.getLogger("lambda_learner.score")


def request_schema(config: Config) -> StructType:
    """The fields of a request row as read from JSON lines or parquet."""
    fields = [StructField("request_id", StringType())]
    fields += [StructField(r.entity_column, StringType()) for r in config.model.random_effects]
    if config.model.fixed_effect.source == "score_column":
        fields.append(StructField(config.model.fixed_effect.score_column, DoubleType()))
    fields.append(StructField("features", MapType(StringType(), FEATURES)))
    return StructType(fields)


def read_requests(spark: SparkSession, path: str, config: Config) -> DataFrame:
    """Request rows with one column per feature bag and a ``row_key``."""
    schema = request_schema(config)
    reader = spark.read.schema(schema)
    raw = reader.parquet(path) if path.endswith(".parquet") else reader.json(path)
    bags = [
        F.coalesce(F.col("features")[bag], F.array().cast(FEATURES)).alias(bag_column(bag))
        for bag in feature_bags(config.model)
    ]
    columns = [field.name for field in schema.fields if field.name != "features"]
    # Row keys fixed once: every score joins back on them.
    return raw.select(*columns, *bags).withColumn("row_key", F.monotonically_increasing_id()).localCheckpoint()


def live_coefficients(store: TableStore, random_effect: RandomEffectConfig, generation: int | None) -> DataFrame:
    """``(entity_id, coefficients)`` of one type: the live state, else the generation's prior."""
    state = store.read("re_state").where(F.col("re_type") == random_effect.name).select("entity_id", "coefficients")
    if generation is None:
        return state
    priors = priors_of(store, generation, random_effect).select("entity_id", "coefficients")
    priors = priors.join(state.select("entity_id"), "entity_id", "left_anti")
    return state.unionByName(priors)


def score_requests(
    store: TableStore,
    config: Config,
    requests: DataFrame,
    *,
    thompson: bool = False,
    seed: int | None = None,
    top_k: int | None = None,
) -> DataFrame:
    """Each request row with its scores (fixed effect, each type, total) and its rank in its request."""
    generation = current_generation(store, config.model)
    number = None if generation is None else generation.number
    coefficients = {r.name: live_coefficients(store, r, number) for r in config.model.random_effects}
    scored = with_game_scores(
        requests,
        config,
        None if generation is None else generation.fixed_effect,
        coefficients,
        config.nearline.buckets,
        ScoreKernel(thompson=thompson, seed=secrets.randbits(63) if seed is None else seed),
        draw_group=F.col("request_id"),
    )
    rank = F.row_number().over(Window.partitionBy("request_id").orderBy(F.col("score").desc(), "row_key"))
    ranked = scored.withColumn("rank", rank)
    if top_k is not None:
        ranked = ranked.where(F.col("rank") <= top_k)
    columns = ["request_id", *[r.entity_column for r in config.model.random_effects], "rank", "score", "score_fixed"]
    return ranked.select(*columns, *[score_column(r) for r in config.model.random_effects])


def _score(job: Job) -> int:
    args, spark = job.arguments, job.spark
    scores = score_requests(
        open_store(job.spark, job.config.storage),
        job.config,
        read_requests(spark, args.requests, job.config),
        thompson=args.thompson,
        seed=args.seed,
        top_k=args.top_k,
    ).localCheckpoint()
    scores.write.mode("overwrite").parquet(args.out)
    summary = {
        "rows": scores.count(),
        "requests": scores.select("request_id").distinct().count(),
        "thompson": args.thompson,
        "out": args.out,
    }
    print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("Score (and rank) candidate rows with the current GAME model.", "score")
    parser.add_argument("--requests", required=True, help="JSON lines (or .parquet) of request rows")
    parser.add_argument("--out", required=True, help="where to write the scores (parquet)")
    parser.add_argument("--thompson", action="store_true", help="Thompson-sample the random effects per request")
    parser.add_argument("--seed", type=int, default=None, help="fix the Thompson draws (default: new ones each run)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k best rows of each request")
    return run_job(parser, _score, argv)


if __name__ == "__main__":
    sys.exit(main())
