"""Name-term-value features, labelled records, index maps and their indexed forms.

A feature is a (name, term, value) triple, as in the original Lambda Learner and in
Photon-ML's model format; a model coefficient is a feature whose value is the
coefficient. An :class:`IndexMap` maps each (name, term) to a column, with the
intercept at column 0, to turn records into a sparse design matrix and models into
coefficient vectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

NameTerm = tuple[str, str]

INTERCEPT: NameTerm = ("intercept", "intercept")


@dataclass(frozen=True, slots=True)
class Feature:
    """One name-term-value triple (a feature of a record, or a coefficient of a model)."""

    name: str
    term: str
    value: float

    @property
    def name_term(self) -> NameTerm:
        return self.name, self.term


@dataclass(frozen=True, slots=True)
class TrainingRecord:
    """A labelled example. ``offset`` is the score of the other parts of the model (the fixed effect).

    The label is kept as given: 0/1 or -1/+1 for classification (positive means > 0),
    any real value for regression.
    """

    label: float
    weight: float
    offset: float
    features: list[Feature]
    context: Mapping[str, str] | None = field(default=None)

    @property
    def name_terms(self) -> list[NameTerm]:
        """The record's distinct name-terms, in order of first appearance."""
        return list(dict.fromkeys(feature.name_term for feature in self.features))


class IndexMap:
    """A two-way map between name-terms and column indices; the intercept is always column 0."""

    def __init__(self, intercept_name: str = INTERCEPT[0], intercept_term: str = INTERCEPT[1]):
        self._intercept: NameTerm = (intercept_name, intercept_term)
        self._index: dict[NameTerm, int] = {}
        self._name_terms: list[NameTerm] = []
        self.push(self._intercept)

    @property
    def intercept_nt(self) -> NameTerm:
        return self._intercept

    @property
    def intercept_index(self) -> int:
        return self._index[self._intercept]

    def push(self, name_term: NameTerm) -> None:
        """Index ``name_term`` if it is new."""
        if name_term not in self._index:
            self._index[name_term] = len(self._name_terms)
            self._name_terms.append(name_term)

    def batch_push(self, name_terms: Iterable[NameTerm]) -> tuple[int, int]:
        """Index every new name-term; return (how many were new, how many distinct were given)."""
        size_before = len(self)
        distinct = set()
        for name_term in name_terms:
            distinct.add(name_term)
            self.push(name_term)
        return len(self) - size_before, len(distinct)

    def get_index(self, name_term: NameTerm) -> int:
        try:
            return self._index[name_term]
        except KeyError:
            raise IndexError(f"name-term {name_term} is not in the index map") from None

    def get_nt(self, index: int) -> NameTerm:
        if not 0 <= index < len(self._name_terms):
            raise IndexError(f"index {index} is not in the index map (size {len(self)})")
        return self._name_terms[index]

    def __contains__(self, name_term: object) -> bool:
        return name_term in self._index

    def __len__(self) -> int:
        return len(self._name_terms)

    def __iter__(self) -> Iterator[NameTerm]:
        return iter(self._name_terms)

    def __repr__(self) -> str:
        return f"IndexMap({self._name_terms!r})"

    @classmethod
    def from_records_means_and_variances(
        cls,
        training_records: Iterable[TrainingRecord],
        coefficient_means: Iterable[Feature],
        coefficient_variances: Iterable[Feature],
    ) -> tuple[IndexMap, dict[str, int]]:
        """An index map over a model's coefficients and a data set's features, with counts of each kind.

        Coefficients are indexed first, then the records' new name-terms, in order of appearance.
        """
        index_map = cls()
        coefficients = [f.name_term for f in coefficient_means] + [f.name_term for f in coefficient_variances]
        added_from_coefficients, _ = index_map.batch_push(coefficients)
        record_name_terms = (name_term for record in training_records for name_term in record.name_terms)
        added_from_records, seen_in_records = index_map.batch_push(record_name_terms)
        in_both = seen_in_records - added_from_records
        metadata = {
            "num_nts_in_both": in_both,
            "num_nts_in_coeffs_only": added_from_coefficients - in_both,
            "num_nts_in_records_only": added_from_records,
        }
        return index_map, metadata


class IndexedDataset:
    """Records in the index domain: a sparse design matrix (intercept column included) and row arrays."""

    def __init__(self, data: sparse.spmatrix | sparse.sparray, labels, labels_weights, offsets):
        self.X = sparse.csr_array(data, dtype=np.float64)
        self.y = np.asarray(labels, dtype=np.float64)
        self.w = np.asarray(labels_weights, dtype=np.float64)
        self.offsets = np.asarray(offsets, dtype=np.float64)
        self.num_examples, self.num_features = self.X.shape
        if not (len(self.y) == len(self.w) == len(self.offsets) == self.num_examples):
            raise ValueError(
                f"{self.num_examples} rows but {len(self.y)} labels, {len(self.w)} weights, {len(self.offsets)} offsets"
            )

    @property
    def num_rows(self) -> int:
        return self.num_examples

    @property
    def num_cols(self) -> int:
        return self.num_features


class IndexedModel:
    """Coefficients in the index domain, with an optional posterior precision matrix (the Hessian)."""

    def __init__(self, theta, hessian: sparse.spmatrix | sparse.sparray | np.ndarray | None = None):
        self.theta = np.asarray(theta, dtype=np.float64)
        self.hessian = hessian
        if hessian is not None and hessian.shape != (len(self.theta), len(self.theta)):
            raise ValueError(f"hessian shape {hessian.shape} does not fit {len(self.theta)} coefficients")

    @property
    def variances(self) -> np.ndarray | None:
        """Per-coefficient variances, ``1 / precision diagonal``; None without a Hessian."""
        if self.hessian is None:
            return None
        return 1.0 / np.asarray(self.hessian.diagonal(), dtype=np.float64)


def nt_domain_data_to_index_domain_data(records: Iterable[TrainingRecord], index_map: IndexMap) -> IndexedDataset:
    """Records as an :class:`IndexedDataset`; every name-term must be in ``index_map``."""
    rows: list[int] = []
    columns: list[int] = []
    values: list[float] = []
    labels: list[float] = []
    weights: list[float] = []
    offsets: list[float] = []
    intercept = index_map.intercept_index
    for row, record in enumerate(records):
        rows.append(row)
        columns.append(intercept)
        values.append(1.0)
        for feature in record.features:
            rows.append(row)
            columns.append(index_map.get_index(feature.name_term))
            values.append(feature.value)
        labels.append(record.label)
        weights.append(record.weight)
        offsets.append(record.offset)
    matrix = sparse.coo_array((values, (rows, columns)), shape=(len(labels), len(index_map)), dtype=np.float64)
    return IndexedDataset(matrix.tocsr(), labels, weights, offsets)


def nt_domain_coeffs_to_index_domain_coeffs(
    coeff_means: Iterable[Feature],
    coeff_variances: Iterable[Feature],
    index_map: IndexMap,
    regularization_param: float,
) -> IndexedModel:
    """A model as an :class:`IndexedModel` with a diagonal precision.

    A coefficient without a variance gets precision ``regularization_param``; one without
    a mean starts at 0.
    """
    theta = np.zeros(len(index_map))
    for coefficient in coeff_means:
        theta[index_map.get_index(coefficient.name_term)] = coefficient.value
    precision = np.full(len(index_map), float(regularization_param))
    for coefficient in coeff_variances:
        if not coefficient.value > 0:
            raise ValueError(f"variance of {coefficient.name_term} must be positive, got {coefficient.value}")
        precision[index_map.get_index(coefficient.name_term)] = 1.0 / coefficient.value
    return IndexedModel(theta, sparse.dia_array((precision[None, :], [0]), shape=(len(precision),) * 2).tocsc())


def index_domain_coeffs_to_nt_domain_coeffs(
    model: IndexedModel, index_map: IndexMap
) -> tuple[dict[NameTerm, float], dict[NameTerm, float] | None]:
    """Means and variances keyed by name-term; variances are None for a model without a Hessian."""
    name_terms = list(index_map)
    means = dict(zip(name_terms, model.theta.tolist(), strict=True))
    variances = model.variances
    if variances is None:
        return means, None
    return means, dict(zip(name_terms, variances.tolist(), strict=True))
