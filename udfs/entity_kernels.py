"""The random-effect kernels Spark calls per group: pandas frames in, flat numpy arrays to the solver, pandas out.

A group holds whole entities of one random-effect type (an entity bucket, or one entity
in the per-entity baseline). Spark hands over two frames per group (``cogroup``): the
entities' rows and their current coefficients. Feature bags arrive flattened into
parallel arrays (``names``, ``terms``, ``values``), coefficients likewise (``names``,
``terms``, ``means``, ``variances``); the intercept is the name-term ``intercept/intercept``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from lambda_learner.batched import BatchedSolver, EntityBatch
from lambda_learner.losses import Loss
from lambda_learner.representation import INTERCEPT
from lambda_learner.scoring import CoefficientTable, hash_strings, table_scores
from udfs.arrays import SEPARATOR, flatten, name_term_codes, name_term_keys

ROW_FIELDS = [
    ("entity_id", "string"),
    ("row_key", "long"),
    ("sample_key", "long"),
    ("label", "double"),
    ("weight", "double"),
    ("offset", "double"),
    ("names", "array<string>"),
    ("terms", "array<string>"),
    ("values", "array<double>"),
]
COEFFICIENT_FIELDS = [
    ("entity_id", "string"),
    ("names", "array<string>"),
    ("terms", "array<string>"),
    ("means", "array<double>"),
    ("variances", "array<double>"),
    # The state's counts, handed through to the result so that no join is needed to advance them.
    ("updates", "long"),
    ("total_rows", "long"),
]
UPDATE_FIELDS = [
    *COEFFICIENT_FIELDS,
    ("had_prior", "boolean"),
    ("converged", "boolean"),
    ("iterations", "int"),
    ("rows", "long"),
    ("loss_before", "double"),
    ("loss_after", "double"),
]
SCORE_FIELDS = [("row_key", "long"), ("entity_id", "string"), ("score", "double")]


def ddl(fields: list[tuple[str, str]]) -> str:
    """A Spark schema string for ``applyInPandas``."""
    return ", ".join(f"{name} {kind}" for name, kind in fields)


@dataclass(frozen=True)
class UpdateKernel:
    """Updates every entity of a group from its rows and its prior (none for a new entity).

    Entities with more than ``max_rows_per_entity`` rows keep a uniform sample of them: the
    rows with the smallest ``sample_key`` (a seeded hash, so a replay keeps the same rows).
    Entities with fewer than ``min_rows`` rows are left out.
    """

    task: str
    penalty: float
    delta: float
    max_rows_per_entity: int
    min_rows: int = 1

    def __call__(self, rows: pd.DataFrame, priors: pd.DataFrame) -> pd.DataFrame:
        rows = self._eligible(rows)
        if rows.empty:
            return _empty(UPDATE_FIELDS)
        entities, row_splits = _segments(rows["entity_id"].to_numpy())
        vocabulary = _Vocabulary(rows, priors)
        known = pd.Index(priors["entity_id"]).get_indexer(entities)
        prior_splits, prior_ids = vocabulary.coefficient_ids(known)
        prior_rows = known[known >= 0]
        batch = EntityBatch(
            row_splits=row_splits,
            labels=rows["label"].to_numpy(np.float64),
            weights=rows["weight"].to_numpy(np.float64),
            offsets=rows["offset"].to_numpy(np.float64),
            features=vocabulary.row_features(rows["values"]),
            prior_splits=prior_splits,
            prior_ids=prior_ids,
            prior_means=flatten(priors["means"].iloc[prior_rows], np.float64)[1],
            prior_variances=flatten(priors["variances"].iloc[prior_rows], np.float64)[1],
        )
        result = BatchedSolver(Loss.for_task(self.task), penalty=self.penalty, delta=self.delta).solve(batch)
        names, terms = vocabulary.name_terms(result.coefficient_ids)
        bounds = result.coefficient_splits[1:-1]
        had_prior = known >= 0
        counts = {column: np.zeros(len(entities), dtype=np.int64) for column in ("updates", "total_rows")}
        for column, values in counts.items():
            values[had_prior] = priors[column].to_numpy()[prior_rows]
        return pd.DataFrame(
            {
                "entity_id": entities,
                "names": np.split(names, bounds),
                "terms": np.split(terms, bounds),
                "means": np.split(result.means, bounds),
                "variances": np.split(result.variances, bounds),
                **counts,
                "had_prior": had_prior,
                "converged": result.converged,
                "iterations": result.iterations.astype(np.int32),
                "rows": np.diff(row_splits),
                "loss_before": result.loss_before,
                "loss_after": result.loss_after,
            }
        )

    def _eligible(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Rows sorted by entity, capped per entity, without entities below the minimum."""
        rows = rows.sort_values(["entity_id", "sample_key"], kind="stable")
        rows = rows[rows.groupby("entity_id", sort=False).cumcount().to_numpy() < self.max_rows_per_entity]
        if self.min_rows > 1:
            rows = rows[
                rows.groupby("entity_id", sort=False)["entity_id"].transform("size").to_numpy() >= self.min_rows
            ]
        return rows.reset_index(drop=True)


@dataclass(frozen=True)
class ScoreKernel:
    """Each row's score under its entity's coefficients (0 for an entity without any).

    ``thompson``: one draw of each entity's coefficients from ``N(mean, variance)`` per
    ``draw_group`` value (a request) and entity, a coefficient the entity lacks (or a whole new
    entity) from the prior ``N(0, prior_variance)``. A draw is a function of ``seed``, the request,
    the entity and the feature's name and term only: the same in any bucket, on any executor,
    different for another request. Otherwise the means (a missing coefficient counts 0).
    """

    thompson: bool = False
    seed: int = 0
    prior_variance: float = 0.0

    def __call__(self, rows: pd.DataFrame, coefficients: pd.DataFrame) -> pd.DataFrame:
        if rows.empty:
            return _empty(SCORE_FIELDS)
        vocabulary = _Vocabulary(rows, coefficients)
        splits, ids = vocabulary.coefficient_ids(np.arange(len(coefficients)))
        table = CoefficientTable.from_segments(
            splits,
            ids,
            flatten(coefficients["means"], np.float64)[1],
            flatten(coefficients["variances"], np.float64)[1],
            len(vocabulary),
        )
        entity_ids = rows["entity_id"].to_numpy(dtype=object)
        owners = pd.Index(coefficients["entity_id"]).get_indexer(entity_ids)
        # A new entity is an entity of its own, with no coefficients: Thompson draws all of them from the prior.
        unknown = owners < 0
        owners[unknown] = len(coefficients) + pd.factorize(entity_ids[unknown])[0]
        sampling = {}
        if self.thompson:
            groups = rows["draw_group"].astype(str) if "draw_group" in rows else rows["row_key"].astype(str)
            sampling = {
                "draw_keys": hash_strings((groups + SEPARATOR + rows["entity_id"].astype(str)).to_numpy(dtype=object)),
                "feature_keys": hash_strings(name_term_keys(*vocabulary.name_terms(np.arange(len(vocabulary))))),
                "missing_variance": self.prior_variance,
                "seed": self.seed,
            }
        scores = table_scores(
            vocabulary.row_features(rows["values"]),
            np.zeros(len(rows)),
            owners,
            table,
            sample=self.thompson,
            **sampling,
        )
        return pd.DataFrame({"row_key": rows["row_key"].to_numpy(), "entity_id": entity_ids, "score": scores})


class _Vocabulary:
    """The name-terms of one group's rows and coefficients, numbered in (name, term) order.

    Sorted numbering makes every entity's coefficients come out in the same order in any group.
    """

    def __init__(self, rows: pd.DataFrame, coefficients: pd.DataFrame):
        self._row_splits, row_names = flatten(rows["names"], object)
        _, row_terms = flatten(rows["terms"], object)
        self._coefficient_splits, coefficient_names = flatten(coefficients["names"], object)
        _, coefficient_terms = flatten(coefficients["terms"], object)
        names = np.concatenate([[INTERCEPT[0]], row_names, coefficient_names])
        terms = np.concatenate([[INTERCEPT[1]], row_terms, coefficient_terms])
        codes, self._names, self._terms = name_term_codes(names, terms)
        self._intercept = codes[0]
        self._row_ids = codes[1 : 1 + len(row_names)]
        self._coefficient_ids = codes[1 + len(row_names) :]

    def __len__(self) -> int:
        return len(self._names)

    def row_features(self, values: pd.Series) -> sparse.csr_array:
        """The rows as a CSR matrix over this vocabulary, with the intercept set to 1."""
        _, flat_values = flatten(values, np.float64)
        lengths = np.diff(self._row_splits) + 1
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        indices = np.empty(indptr[-1], dtype=np.int64)
        data = np.empty(indptr[-1])
        starts = indptr[:-1]
        indices[starts], data[starts] = self._intercept, 1.0
        rest = np.ones(indptr[-1], dtype=bool)
        rest[starts] = False
        indices[rest], data[rest] = self._row_ids, flat_values
        return sparse.csr_array((data, indices, indptr), shape=(len(lengths), len(self)))

    def coefficient_ids(self, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Splits and feature ids of the chosen coefficient rows (``-1`` chooses none: a new entity)."""
        chosen = which >= 0
        starts = np.zeros(len(which), dtype=np.int64)
        lengths = np.zeros(len(which), dtype=np.int64)
        starts[chosen] = self._coefficient_splits[which[chosen]]
        lengths[chosen] = self._coefficient_splits[which[chosen] + 1] - starts[chosen]
        splits = np.concatenate([[0], np.cumsum(lengths)])
        # Each chosen segment's positions: its start plus 0, 1, ... (ranges without a loop).
        offsets = np.repeat(starts - splits[:-1], lengths)
        return splits, self._coefficient_ids[offsets + np.arange(splits[-1])]

    def name_terms(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._names[ids], self._terms[ids]


def _segments(entity_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entities in order (rows are sorted by entity) and their row splits."""
    starts = np.flatnonzero(np.r_[True, entity_ids[1:] != entity_ids[:-1]])
    return entity_ids[starts], np.append(starts, len(entity_ids))


def _empty(fields: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame({name: [] for name, _ in fields})
