"""A walk through one incremental update of one entity's model, with the per-entity API.

Picture one ad whose click model is personalised by season: its random effect has an
intercept and one coefficient per season. Yesterday's batch job left a prior for it
(means and variances); today a mini-batch of impressions arrives, each scored by the
global fixed-effect model (the offset). We update the ad's coefficients on the
mini-batch, check the update on held-out impressions, and turn the model back into
name-term-value coefficients to store.

Users of lambda-learner 0.1.0 know these steps: only the import block differs.

    python examples/tutorial.py
"""

import json
import random
import sys

from lambda_learner import (
    Feature,
    IndexMap,
    TrainerSequentialBayesianLogisticLossWithL2,
    TrainingRecord,
    evaluate,
    index_domain_coeffs_to_nt_domain_coeffs,
    nt_domain_coeffs_to_index_domain_coeffs,
    nt_domain_data_to_index_domain_data,
    score_linear_model,
)

SEASONS = ["winter", "spring", "summer", "fall"]
# How much more (or less) this ad is clicked in each season than the global model expects.
TRUE_SEASON_EFFECT = {"winter": 1.2, "spring": -0.4, "summer": -1.0, "fall": 0.3}


def impressions(count: int, rng: random.Random) -> list:
    """Labelled impressions: a one-hot season, the fixed effect's score as offset, a click or not."""
    records = []
    for _ in range(count):
        season = rng.choice(SEASONS)
        offset = rng.gauss(-1.0, 0.5)
        margin = offset + TRUE_SEASON_EFFECT[season]
        clicked = rng.random() < 1.0 / (1.0 + 2.718281828459045 ** (-margin))
        features = [Feature("season", name, 1.0 if name == season else 0.0) for name in SEASONS]
        records.append(TrainingRecord(label=1.0 if clicked else 0.0, weight=1.0, offset=offset, features=features))
    return records


def main() -> dict:
    rng = random.Random(42)
    training_data = impressions(400, rng)
    test_data = impressions(400, rng)

    # Yesterday's model for this ad: it knew winter was good, little else.
    model_coefficients = [
        Feature("intercept", "intercept", 0.0),
        Feature("season", "winter", 0.8),
        Feature("season", "spring", 0.0),
        Feature("season", "summer", 0.0),
        Feature("season", "fall", 0.0),
    ]
    model_coefficient_variances = [Feature(c.name, c.term, 0.25) for c in model_coefficients]

    # Name-terms to column indices, over the model's coefficients and the data's features.
    index_map, index_map_metadata = IndexMap.from_records_means_and_variances(
        training_data, model_coefficients, model_coefficient_variances
    )

    indexed_training_data = nt_domain_data_to_index_domain_data(training_data, index_map)
    indexed_test_data = nt_domain_data_to_index_domain_data(test_data, index_map)
    regularization_penalty = 10.0
    initial_model = nt_domain_coeffs_to_index_domain_coeffs(
        model_coefficients, model_coefficient_variances, index_map, regularization_penalty
    )

    # The incremental update: the prior weighs delta, the fresh data the rest.
    forgetting_factor = 0.8
    trainer = TrainerSequentialBayesianLogisticLossWithL2(
        training_data=indexed_training_data,
        initial_model=initial_model,
        penalty=regularization_penalty,
        delta=forgetting_factor,
    )
    updated_model, updated_model_loss, training_metadata = trainer.train()
    print(f"training: {training_metadata}", file=sys.stderr)

    # Does the update rank held-out impressions better than yesterday's model?
    initial_scores = score_linear_model(initial_model, indexed_test_data)
    updated_scores = score_linear_model(updated_model, indexed_test_data)
    initial_metrics = evaluate(metric_list=["auc"], y_scores=initial_scores, y_targets=indexed_test_data.y)
    updated_metrics = evaluate(metric_list=["auc"], y_scores=updated_scores, y_targets=indexed_test_data.y)

    # Back to name-term-value, to store and to update again on the next mini-batch.
    means, variances = index_domain_coeffs_to_nt_domain_coeffs(updated_model, index_map)

    report = {
        "index_map": index_map_metadata,
        "loss": float(updated_model_loss),
        "auc_before": float(initial_metrics["auc"]),
        "auc_after": float(updated_metrics["auc"]),
        "means": {f"{name}:{term}": float(value) for (name, term), value in means.items()},
        "variances": {f"{name}:{term}": float(value) for (name, term), value in variances.items()},
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
