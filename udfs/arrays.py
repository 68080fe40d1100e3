"""Columns of arrays (as pandas hands them over) to flat numpy arrays, and name-term keys."""

from __future__ import annotations

import numpy as np
import pandas as pd

SEPARATOR = "\x1f"


def flatten(column: pd.Series, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Splits and concatenated values of a column of arrays (a missing array counts as empty)."""
    arrays = [() if item is None else item for item in column.to_numpy()]
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays).astype(dtype, copy=False) if lengths.sum() else np.zeros(0, dtype=dtype)
    return np.concatenate([[0], np.cumsum(lengths)]), flat


def name_term_codes(names: np.ndarray, terms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A code per (name, term) pair, numbered in (name, term) order, and the pairs' names and terms by code."""
    name_codes, unique_names = pd.factorize(names)
    term_codes, unique_terms = pd.factorize(terms)
    pair_codes, unique_pairs = pd.factorize(name_codes * len(unique_terms) + term_codes)
    pair_names = np.asarray(unique_names, dtype=object)[unique_pairs // len(unique_terms)]
    pair_terms = np.asarray(unique_terms, dtype=object)[unique_pairs % len(unique_terms)]
    # Renumber in (name, term) order, so an entity's coefficients come out the same in any group.
    order = np.lexsort((pair_terms, pair_names))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[pair_codes], pair_names[order], pair_terms[order]


def name_term_keys(names: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """One string per (name, term): the two joined by a separator that sorts before any printable character."""
    return (pd.Series(names, dtype=object) + SEPARATOR + pd.Series(terms, dtype=object)).to_numpy(dtype=object)
