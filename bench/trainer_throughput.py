"""Entity updates per second: the original lambda-learner 0.1.0, our per-entity trainer, our batched solver.

One sequential Bayesian logistic update per entity (delta 0.8, full Hessian) on two
shapes, all variants in one run on the same data, one core (BLAS threads pinned to 1).
A per-entity update is what a user of the per-entity API does for one entity: build
its index map, index its records and prior, train, and turn the model back into
name-term-value coefficients. The batched solver does the same from flat arrays.
``train_only`` times the trainer call alone, for reference.

    python bench/trainer_throughput.py [--quick]
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
from scipy.special import expit  # noqa: E402

import lambda_learner as ours  # noqa: E402
from lambda_learner.batched import BatchedSolver, EntityBatch  # noqa: E402
from lambda_learner.losses import Loss  # noqa: E402

PENALTY = 1.0
DELTA = 0.8


@dataclass
class Problem:
    """Entities with ground-truth coefficients, a prior near the truth, and rows drawn from the truth."""

    num_entities: int
    rows_per_entity: int
    num_features: int
    features: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    prior_means: np.ndarray
    prior_variance: float

    @classmethod
    def generate(cls, num_entities: int, rows_per_entity: int, num_features: int, seed: int = 7) -> Problem:
        rng = np.random.default_rng(seed)
        truth = rng.normal(0.0, 0.5, size=(num_entities, num_features + 1))
        prior_variance = 0.1
        prior_means = truth + rng.normal(0.0, np.sqrt(prior_variance), size=truth.shape)
        num_rows = num_entities * rows_per_entity
        features = rng.normal(size=(num_rows, num_features))
        offsets = rng.normal(-1.0, 0.5, size=num_rows)
        entity = np.repeat(np.arange(num_entities), rows_per_entity)
        margins = truth[entity, 0] + np.einsum("nf,nf->n", features, truth[entity, 1:]) + offsets
        labels = (rng.random(num_rows) < expit(margins)).astype(np.float64)
        return cls(num_entities, rows_per_entity, num_features, features, labels, offsets, prior_means, prior_variance)

    def entity_rows(self, entity: int) -> slice:
        return slice(entity * self.rows_per_entity, (entity + 1) * self.rows_per_entity)

    def name_term_inputs(self, module, entity: int):
        """One entity's records, prior means and prior variances, in the given library's classes."""
        feature, record = module.Feature, module.TrainingRecord
        names = [str(j) for j in range(self.num_features)]
        records = [
            record(label, 1.0, offset, [feature("f", name, value) for name, value in zip(names, values, strict=True)])
            for label, offset, values in zip(
                self.labels[self.entity_rows(entity)].tolist(),
                self.offsets[self.entity_rows(entity)].tolist(),
                self.features[self.entity_rows(entity)].tolist(),
                strict=True,
            )
        ]
        means = [feature("intercept", "intercept", self.prior_means[entity, 0])]
        means += [
            feature("f", name, value) for name, value in zip(names, self.prior_means[entity, 1:].tolist(), strict=True)
        ]
        variances = [feature(m.name, m.term, self.prior_variance) for m in means]
        return records, means, variances

    def entity_batch(self) -> EntityBatch:
        """Flat arrays, as the Spark kernel hands them over: column 0 is the intercept."""
        num_rows = self.num_entities * self.rows_per_entity
        width = self.num_features + 1
        features = np.empty((num_rows, width))
        features[:, 0] = 1.0
        features[:, 1:] = self.features
        return EntityBatch(
            row_splits=np.arange(self.num_entities + 1) * self.rows_per_entity,
            labels=self.labels,
            weights=np.ones(num_rows),
            offsets=self.offsets,
            features=features,
            prior_splits=np.arange(self.num_entities + 1) * width,
            prior_ids=np.tile(np.arange(width), self.num_entities),
            prior_means=self.prior_means.reshape(-1),
            prior_variances=np.full(self.num_entities * width, self.prior_variance),
        )


def per_entity_update(api: dict, records, means, variances):
    """The per-entity API's whole update for one entity; returns the trainer's seconds too."""
    index_map, _ = api["IndexMap"].from_records_means_and_variances(records, means, variances)
    data = api["nt_domain_data_to_index_domain_data"](records, index_map)
    model = api["nt_domain_coeffs_to_index_domain_coeffs"](means, variances, index_map, PENALTY)
    started = time.perf_counter()
    trainer = api["TrainerSequentialBayesianLogisticLossWithL2"](
        training_data=data, initial_model=model, penalty=PENALTY, delta=DELTA
    )
    updated, _, _ = trainer.train()
    train_seconds = time.perf_counter() - started
    return api["index_domain_coeffs_to_nt_domain_coeffs"](updated, index_map), train_seconds


def time_per_entity(api: dict, module, problem: Problem, entities: int) -> dict:
    inputs = [problem.name_term_inputs(module, entity) for entity in range(entities)]
    per_entity_update(api, *inputs[0])  # warm up imports and caches
    train_seconds = 0.0
    started = time.perf_counter()
    for records, means, variances in inputs:
        _, seconds = per_entity_update(api, records, means, variances)
        train_seconds += seconds
    total = time.perf_counter() - started
    return {
        "entities_timed": entities,
        "updates_per_second": entities / total,
        "train_only_updates_per_second": entities / train_seconds,
    }


def time_batched(problem: Problem, repeats: int) -> dict:
    solver = BatchedSolver(Loss.LOGISTIC, penalty=PENALTY, delta=DELTA)
    batch = problem.entity_batch()
    result = solver.solve(batch)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = solver.solve(batch)
        best = min(best, time.perf_counter() - started)
    return {
        "entities_timed": problem.num_entities,
        "updates_per_second": problem.num_entities / best,
        "converged": int(result.converged.sum()),
        "newton_iterations_mean": float(result.iterations.mean()),
    }


def original_api() -> tuple[dict, object]:
    from linkedin.learner.ds import feature, index_map, record, representation_utils
    from linkedin.learner.prediction import trainer_sequential_bayesian_logistic_loss_with_l2 as sequential

    api = {
        "IndexMap": index_map.IndexMap,
        "nt_domain_data_to_index_domain_data": representation_utils.nt_domain_data_to_index_domain_data,
        "nt_domain_coeffs_to_index_domain_coeffs": representation_utils.nt_domain_coeffs_to_index_domain_coeffs,
        "index_domain_coeffs_to_nt_domain_coeffs": representation_utils.index_domain_coeffs_to_nt_domain_coeffs,
        "TrainerSequentialBayesianLogisticLossWithL2": sequential.TrainerSequentialBayesianLogisticLossWithL2,
    }

    class Module:
        Feature = feature.Feature
        TrainingRecord = record.TrainingRecord

    return api, Module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--per-entity-sample", type=int, default=2000, help="entities timed one at a time per variant")
    args = parser.parse_args()

    shapes = [(1000, 50, 20), (10_000, 5, 20)]
    if args.quick:
        shapes = [(100, 50, 20), (500, 5, 20)]
    original, original_module = original_api()
    our_api = {name: getattr(ours, name) for name in original}
    report = {"penalty": PENALTY, "delta": DELTA, "hessian": "full", "blas_threads": 1, "shapes": []}
    for num_entities, rows, num_features in shapes:
        problem = Problem.generate(num_entities, rows, num_features)
        sample = min(num_entities, args.per_entity_sample)
        variants = {
            "a_original_per_entity": time_per_entity(original, original_module, problem, sample),
            "b_ours_per_entity": time_per_entity(our_api, ours, problem, sample),
            "c_ours_batched": time_batched(problem, repeats=5),
        }
        a, b, c = (variants[key]["updates_per_second"] for key in sorted(variants))
        report["shapes"].append(
            {
                "entities": num_entities,
                "rows_per_entity": rows,
                "features": num_features,
                **variants,
                "ratio_c_over_a": c / a,
                "ratio_b_over_a": b / a,
                "ratio_c_over_a_train_only": c / variants["a_original_per_entity"]["train_only_updates_per_second"],
            }
        )
        print(json.dumps(report["shapes"][-1]), file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
