"""Per-entity AUC over groups of whole entities: a pandas frame of scored rows in, one row per entity out."""

from __future__ import annotations

import pandas as pd

from lambda_learner.metrics import auc_by_entity

ENTITY_AUC_FIELDS = [("entity_id", "string"), ("auc", "double")]


def entity_aucs(rows: pd.DataFrame) -> pd.DataFrame:
    """The AUC of each entity of the group that has both labels (``entity_id``, ``score``, ``label`` columns)."""
    if rows.empty:
        return pd.DataFrame({"entity_id": [], "auc": []})
    entities, values = auc_by_entity(rows["score"].to_numpy(), rows["label"].to_numpy(), rows["entity_id"].to_numpy())
    return pd.DataFrame({"entity_id": entities.astype(str), "auc": values})
