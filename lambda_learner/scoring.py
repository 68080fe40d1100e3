"""Scores, probabilities and Thompson sampling.

Thompson sampling draws coefficients from ``N(mean, variance)`` with the stored
per-coefficient variances (``1 / precision diagonal``), not the precision itself.

:func:`thompson_sample` draws whole coefficient vectors of one model from a seeded
generator. :func:`table_scores` scores rows of many entities from a
:class:`CoefficientTable`; its draws are keyed, not streamed: the standard normal
behind the coefficient of (row i, feature column j) is a pure function of
``(seed, draw_keys[i], feature_keys[j])`` (a splitmix64 hash, then Box-Muller), so a
row's draw does not depend on which other rows share the call, rows with the same draw
key share their draw, and the same keys and seed draw the same in any process. A
coefficient an entity lacks, a cold-start entity's above all, is drawn from the prior
``N(0, missing_variance)``, so sampling explores where the model knows nothing.
:func:`hash_strings` turns request ids, entity ids and feature names into such keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.special import expit

from lambda_learner.representation import IndexedDataset, IndexedModel

_UINT64_MASK = (1 << 64) - 1
# splitmix64's increment and finaliser multipliers.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_GOLDEN_TWICE = np.uint64((2 * 0x9E3779B97F4A7C15) & _UINT64_MASK)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
# Tells the feature key's contribution apart from the draw key's.
_FEATURE_SALT = np.uint64(0xD1B54A32D192ED03)


def score_linear_model(
    model: IndexedModel,
    test_data: IndexedDataset,
    exploration_threshold: float = 0.0,
    seed: int | np.random.Generator | None = None,
) -> np.ndarray:
    """``X theta + offset`` per row; with ``exploration_threshold`` t > 0, one draw of
    ``theta ~ N(mean, t * variance)`` scores every row (a Thompson-sampled score)."""
    if exploration_threshold < 0:
        raise ValueError(f"exploration_threshold must be non-negative, got {exploration_threshold}")
    theta = model.theta
    if exploration_threshold > 0:
        variances = model.variances
        if variances is None:
            raise ValueError("Thompson sampling needs the model's variances (a model with a Hessian)")
        theta = thompson_sample(theta, exploration_threshold * variances, seed=seed)
    return test_data.X @ theta + test_data.offsets


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Logistic probabilities of margins."""
    return expit(scores)


def thompson_sample(
    means: np.ndarray,
    variances: np.ndarray,
    *,
    seed: int | np.random.Generator | None = None,
    draws: int | None = None,
) -> np.ndarray:
    """Coefficients drawn from independent ``N(mean, variance)``; ``draws`` adds a leading axis.

    The spread is the square root of the stored **variance** (``1 / precision``): a coefficient
    with variance 0.01 hardly moves, one with variance 4 moves by about 2.

    >>> import numpy as np
    >>> from lambda_learner import thompson_sample
    >>> means, variances = np.array([1.0, -2.0]), np.array([0.01, 4.0])
    >>> draws = thompson_sample(means, variances, seed=0, draws=10_000)
    >>> draws.shape
    (10000, 2)
    >>> print(np.round(draws.mean(axis=0), 1), np.round(draws.std(axis=0), 1))
    [ 1. -2.] [0.1 2. ]
    >>> bool((thompson_sample(means, variances, seed=0) == thompson_sample(means, variances, seed=0)).all())
    True
    """
    means = np.asarray(means, dtype=np.float64)
    variances = np.asarray(variances, dtype=np.float64)
    if (variances < 0).any() or not np.isfinite(variances).all():
        raise ValueError("variances must be finite and non-negative")
    rng = np.random.default_rng(seed)
    shape = means.shape if draws is None else (draws, *means.shape)
    return means + np.sqrt(variances) * rng.standard_normal(shape)


@dataclass(frozen=True)
class CoefficientTable:
    """Many entities' coefficients, looked up by (entity, feature) without a dense entity x feature array.

    Entities are numbered from 0; an entity owns the features given to it by :meth:`from_segments`.
    Any other entity number >= 0 (one past the last, say) is an entity without coefficients.

    >>> import numpy as np
    >>> from lambda_learner import CoefficientTable
    >>> table = CoefficientTable.from_segments(  # entity 0 owns features 0 and 2; entity 1 owns feature 1
    ...     splits=np.array([0, 2, 3]), feature_ids=np.array([0, 2, 1]),
    ...     means=np.array([0.5, -1.0, 2.0]), variances=np.array([0.1, 0.2, 0.3]), width=3,
    ... )
    >>> means, variances = table.lookup(np.array([0, 0, 1, 1, -1]), np.array([0, 2, 1, 0, 0]))
    >>> print(means, variances)  # entity 1 lacks feature 0; -1 is an unknown entity: 0 and 0
    [ 0.5 -1.   2.   0.   0. ] [0.1 0.2 0.3 0.  0. ]
    >>> positions, found = table.locate(np.array([0, 1, 2]), np.array([2, 0, 0]))
    >>> print(found)  # entity 2 has no coefficients at all
    [ True False False]
    """

    width: int
    keys: np.ndarray
    means: np.ndarray
    variances: np.ndarray

    @classmethod
    def from_segments(
        cls, splits: np.ndarray, feature_ids: np.ndarray, means: np.ndarray, variances: np.ndarray, width: int
    ) -> CoefficientTable:
        """Entity e owns ``feature_ids[splits[e]:splits[e + 1]]`` and their means and variances.

        Feature ids are in ``[0, width)``.
        """
        owners = np.repeat(np.arange(len(splits) - 1), np.diff(splits))
        keys = owners * width + np.asarray(feature_ids, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        return cls(width, keys[order], np.asarray(means, float)[order], np.asarray(variances, float)[order])

    def locate(self, entities: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each pair's position in the table and whether the entity has the feature (False for entity -1)."""
        entities = np.asarray(entities, dtype=np.int64)
        wanted = entities * self.width + np.asarray(features, dtype=np.int64)
        if len(self.keys) == 0:
            return np.zeros(wanted.shape, dtype=np.int64), np.zeros(wanted.shape, dtype=bool)
        position = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        return position, (entities >= 0) & (self.keys[position] == wanted)

    def lookup(self, entities: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Means and variances of the pairs; 0 and 0 where an entity lacks the feature (or is -1: unknown)."""
        position, found = self.locate(entities, features)
        if len(self.keys) == 0:
            return np.zeros(found.shape), np.zeros(found.shape)
        return np.where(found, self.means[position], 0.0), np.where(found, self.variances[position], 0.0)


def table_scores(
    features: sparse.sparray | sparse.spmatrix,
    offsets: np.ndarray,
    row_entity: np.ndarray,
    table: CoefficientTable,
    *,
    sample: bool = False,
    draw_keys: np.ndarray | None = None,
    feature_keys: np.ndarray | None = None,
    missing_variance: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Scores of rows belonging to many entities: ``x . theta + offset`` with the means, or a Thompson draw.

    Row i belongs to entity ``row_entity[i]`` of ``table``; -1 (unknown) scores its offset
    alone, in both modes. Without ``sample`` the coefficients are the means, and a feature
    the entity lacks counts 0.

    With ``sample`` the coefficient of (row i, feature column j) is ``mean + sqrt(variance) * z``,
    ``z`` a standard normal that is a pure function of ``(seed, draw_keys[i], feature_keys[j])``:

    - ``draw_keys``: uint64 (or int64) per row, default the row index (every row draws its own).
      Rows with the same draw key share one draw of every coefficient, whatever else is in the
      call. Rows of different entities that share a key share ``z`` per feature key too, so to
      draw each (request, entity) independently, key by both, e.g.
      ``hash_strings([f"{request}\\x1f{entity}" ...])``.
    - ``feature_keys``: uint64 (or int64) per feature column, default the column index. Key by the
      feature's name (``hash_strings``) when column numbers differ between calls.
    - ``missing_variance``: a feature the entity lacks (``row_entity[i] >= 0`` but not in the table)
      is drawn from the prior ``N(0, missing_variance)``; the default 0 keeps it at 0. An entity
      number that owns nothing in the table (a cold-start entity) draws every coefficient so.
    - ``seed``: an integer; its 64 low bits select the draws.

    >>> import numpy as np
    >>> from scipy import sparse
    >>> from lambda_learner import CoefficientTable, table_scores
    >>> table = CoefficientTable.from_segments(  # entity 0: intercept 1.0 (variance 0.04); entity 1: nothing
    ...     np.array([0, 1, 1]), np.array([0]), np.array([1.0]), np.array([0.04]), width=2
    ... )
    >>> X = sparse.csr_array(np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 2.0], [1.0, 0.0]]))  # column 0: intercept
    >>> entity, offsets = np.array([0, 0, 1, -1]), np.array([0.0, 0.0, 0.0, 0.5])
    >>> print(table_scores(X, offsets, entity, table))  # means; the unknown row scores its offset
    [1.  1.  0.  0.5]
    >>> sampled = table_scores(X, offsets, entity, table, sample=True, draw_keys=np.array([7, 7, 8, 9]),
    ...                        missing_variance=1.0, seed=42)
    >>> print(np.round(sampled, 2))  # rows 0 and 1 share key 7; entity 1 explores N(0, 1 + 2^2)
    [0.91 0.91 2.29 0.5 ]
    >>> alone = table_scores(X[[2]], offsets[[2]], entity[[2]], table, sample=True, draw_keys=np.array([8]),
    ...                      missing_variance=1.0, seed=42)
    >>> bool(alone[0] == sampled[2])  # the same draw without the other rows
    True
    """
    features = sparse.csr_array(features)
    num_rows, num_columns = features.shape
    row_entity = np.asarray(row_entity, dtype=np.int64)
    if row_entity.shape != (num_rows,):
        raise ValueError(f"row_entity has shape {row_entity.shape} for {num_rows} rows")
    rows = np.repeat(np.arange(num_rows), np.diff(features.indptr))
    owners = row_entity[rows]
    if not sample:
        coefficients, _ = table.lookup(owners, features.indices)
    else:
        if not (np.isfinite(missing_variance) and missing_variance >= 0):
            raise ValueError(f"missing_variance must be finite and non-negative, got {missing_variance}")
        draw_keys = np.arange(num_rows, dtype=np.uint64) if draw_keys is None else _as_keys("draw_keys", draw_keys)
        feature_keys = (
            np.arange(num_columns, dtype=np.uint64) if feature_keys is None else _as_keys("feature_keys", feature_keys)
        )
        if draw_keys.shape != (num_rows,):
            raise ValueError(f"draw_keys has shape {draw_keys.shape} for {num_rows} rows")
        if feature_keys.shape != (num_columns,):
            raise ValueError(f"feature_keys has shape {feature_keys.shape} for {num_columns} feature columns")
        position, found = table.locate(owners, features.indices)
        coefficients = np.zeros(len(rows))
        spread = np.zeros(len(rows))
        if len(table.keys):
            coefficients[found] = table.means[position[found]]
            spread[found] = np.sqrt(table.variances[position[found]])
        spread[~found & (owners >= 0)] = np.sqrt(missing_variance)
        drawn = np.flatnonzero(spread != 0)  # a NaN variance (none stored) gives a NaN score, not the mean
        row_states = _row_states(_as_seed(seed), draw_keys)
        noise = _keyed_normals(row_states[rows[drawn]], feature_keys[features.indices[drawn]])
        coefficients[drawn] += spread[drawn] * noise
    totals = np.bincount(rows, weights=features.data * coefficients, minlength=num_rows)
    return totals + np.asarray(offsets, dtype=np.float64)


def hash_strings(values: Sequence[str] | np.ndarray) -> np.ndarray:
    """A uint64 key per string: the 8-byte BLAKE2b digest of its UTF-8 bytes, read little-endian.

    Stable across processes, platforms and Python versions (unlike ``hash``), for keying
    :func:`table_scores`' draws by request ids, entity ids or feature names. Each distinct
    value is hashed once. The result has the input's shape.

    >>> from lambda_learner.scoring import hash_strings
    >>> keys = hash_strings(["request-1", "request-2", "request-1"])
    >>> keys.dtype, bool(keys[0] == keys[2]), bool(keys[0] != keys[1])
    (dtype('uint64'), True, True)
    >>> print(hash_strings(["request-1"])[0])  # the same number on every machine
    7239539881221587450
    """
    array = values if isinstance(values, np.ndarray) else np.asarray(list(values), dtype=object)
    codes: dict[object, int] = {}
    inverse = np.fromiter(
        (codes.setdefault(value, len(codes)) for value in array.reshape(-1).tolist()), dtype=np.int64, count=array.size
    )
    digests = np.fromiter((_digest(value) for value in codes), dtype=np.uint64, count=len(codes))
    return digests[inverse].reshape(array.shape)


def _digest(value: object) -> int:
    if not isinstance(value, str):
        raise TypeError(f"hash_strings hashes strings, got {type(value).__name__}: {value!r}")
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "little")


def _as_keys(name: str, keys: np.ndarray) -> np.ndarray:
    """Integer keys as uint64 (negative int64 keys wrap, as two's complement)."""
    keys = np.asarray(keys)
    if keys.dtype.kind == "u":
        return keys.astype(np.uint64)
    if keys.dtype.kind == "i":
        return keys.astype(np.int64).view(np.uint64)
    raise TypeError(f"{name} must be integers (uint64 keys, e.g. from hash_strings), got dtype {keys.dtype}")


def _as_seed(seed: int) -> np.ndarray:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    return np.array([int(seed) & _UINT64_MASK], dtype=np.uint64)


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scatters every input bit over the output."""
    values = values ^ (values >> np.uint64(30))
    values = values * _MIX_1
    values = values ^ (values >> np.uint64(27))
    values = values * _MIX_2
    return values ^ (values >> np.uint64(31))


def _row_states(seed: np.ndarray, draw_keys: np.ndarray) -> np.ndarray:
    """The hash state after absorbing the seed and each row's draw key."""
    with np.errstate(over="ignore"):
        return _mix(_mix(seed + _GOLDEN) ^ draw_keys)


def _keyed_normals(row_states: np.ndarray, feature_keys: np.ndarray) -> np.ndarray:
    """A standard normal per (row state, feature key): two 53-bit uniforms from the hash, Box-Muller."""
    with np.errstate(over="ignore"):
        state = _mix(row_states ^ _mix(feature_keys + _FEATURE_SALT))
        first = _mix(state + _GOLDEN)
        second = _mix(state + _GOLDEN_TWICE)
    # Uniforms in (0, 1] for the radius (the logarithm stays finite) and [0, 1) for the angle.
    radius_uniform = ((first >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    angle_uniform = (second >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.sqrt(-2.0 * np.log(radius_uniform)) * np.cos(2.0 * np.pi * angle_uniform)
