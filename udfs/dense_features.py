"""The fixed effect's rows as dense feature arrays, for MLlib (which reads dense vectors from arrays)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from udfs.arrays import flatten, name_term_keys

DENSE_FIELDS = [("label", "double"), ("weight", "double"), ("offset", "double"), ("x", "array<double>")]


def dense_rows(keys: Sequence[str]) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """A ``mapInPandas`` function: each row's bag as a dense array in ``keys`` order (0 where absent)."""
    index = pd.Index(keys)

    def convert(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for frame in frames:
            splits, names = flatten(frame["names"], object)
            _, terms = flatten(frame["terms"], object)
            _, values = flatten(frame["values"], np.float64)
            columns = index.get_indexer(name_term_keys(names, terms))
            rows = np.repeat(np.arange(len(frame)), np.diff(splits))
            dense = np.zeros((len(frame), len(index)))
            known = columns >= 0
            np.add.at(dense, (rows[known], columns[known]), values[known])
            yield pd.DataFrame(
                {
                    "label": frame["label"].to_numpy(),
                    "weight": frame["weight"].to_numpy(),
                    "offset": frame["offset"].to_numpy(),
                    "x": list(dense),
                }
            )

    return convert
