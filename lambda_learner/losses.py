"""Per-row losses as element-wise functions of the margin.

A margin is ``x.theta + offset``. Every function works on arrays of any shape, so
the same code serves one entity (rows of a sparse matrix) and many entities at
once (a padded ``(entities, rows)`` block).
"""

from __future__ import annotations

import enum

import numpy as np


class Loss(enum.Enum):
    """The per-row loss of a task."""

    LOGISTIC = "logistic"
    SQUARE = "square"

    @classmethod
    def for_task(cls, task: str) -> Loss:
        """``logistic`` (binary labels) or ``linear`` (real labels)."""
        tasks = {"logistic": cls.LOGISTIC, "linear": cls.SQUARE}
        if task not in tasks:
            raise ValueError(f"task must be one of {sorted(tasks)}, got {task!r}")
        return tasks[task]

    def prepare_labels(self, labels: np.ndarray) -> np.ndarray:
        """Labels as the loss uses them: +-1 for logistic (positive means y > 0), as given for square."""
        labels = np.asarray(labels, dtype=np.float64)
        if self is Loss.LOGISTIC:
            return np.where(labels > 0, 1.0, -1.0)
        return labels

    def value(self, margins: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per-row loss (unweighted); labels as given by :meth:`prepare_labels`."""
        if self is Loss.LOGISTIC:
            return softplus(-labels * margins)
        residuals = margins - labels
        return 0.5 * residuals * residuals

    def derivatives(self, margins: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First and second derivative of the per-row loss with respect to the margin."""
        _, first, second = self.evaluate(margins, labels)
        return first, second

    def evaluate(self, margins: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-row loss (unweighted) and its first and second derivative, in one pass over the margins."""
        if self is Loss.LOGISTIC:
            # All three from one exp(-|z|), exact at any margin: q = expit(z) is the probability of
            # the wrong label, and q (1 - q) = exp(-|z|) / (1 + exp(-|z|))^2 has no cancellation.
            z = -labels * margins
            small = np.exp(-np.abs(z))
            denominator = 1.0 + small
            q = np.where(z > 0.0, 1.0, small) / denominator
            return np.maximum(z, 0.0) + np.log1p(small), -labels * q, small / (denominator * denominator)
        residuals = margins - labels
        return 0.5 * residuals * residuals, residuals, np.ones_like(margins)


def softplus(z: np.ndarray) -> np.ndarray:
    """``log(1 + exp(z))`` without overflow at any ``z``."""
    return np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))
