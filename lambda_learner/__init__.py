"""Incremental learning of per-entity models (GAME random effects) on data streams.

Pure numpy/scipy. The names a user of lambda-learner 0.1.0 knows import from here.
"""

from lambda_learner.batched import BatchedSolver, BatchResult, EntityBatch
from lambda_learner.losses import Loss
from lambda_learner.metrics import auc, auc_by_entity, calibration, evaluate, log_loss, per_entity_auc, rmse
from lambda_learner.representation import (
    Feature,
    IndexedDataset,
    IndexedModel,
    IndexMap,
    TrainingRecord,
    index_domain_coeffs_to_nt_domain_coeffs,
    nt_domain_coeffs_to_index_domain_coeffs,
    nt_domain_data_to_index_domain_data,
)
from lambda_learner.scoring import (
    CoefficientTable,
    hash_strings,
    probabilities,
    score_linear_model,
    table_scores,
    thompson_sample,
)
from lambda_learner.trainers import (
    HessianType,
    Trainer,
    TrainerLogisticLossWithL2,
    TrainerSequentialBayesianLogisticLossWithL2,
    TrainerSequentialBayesianSquareLossWithL2,
    TrainerSquareLossWithL2,
    TrainingMetadata,
)

__all__ = [
    "BatchResult",
    "BatchedSolver",
    "CoefficientTable",
    "EntityBatch",
    "Feature",
    "HessianType",
    "IndexMap",
    "IndexedDataset",
    "IndexedModel",
    "Loss",
    "Trainer",
    "TrainerLogisticLossWithL2",
    "TrainerSequentialBayesianLogisticLossWithL2",
    "TrainerSequentialBayesianSquareLossWithL2",
    "TrainerSquareLossWithL2",
    "TrainingMetadata",
    "TrainingRecord",
    "auc",
    "auc_by_entity",
    "calibration",
    "evaluate",
    "hash_strings",
    "index_domain_coeffs_to_nt_domain_coeffs",
    "log_loss",
    "nt_domain_coeffs_to_index_domain_coeffs",
    "nt_domain_data_to_index_domain_data",
    "per_entity_auc",
    "probabilities",
    "rmse",
    "score_linear_model",
    "table_scores",
    "thompson_sample",
]
