# Databricks notebook source
# MAGIC %md
# MAGIC # Inspect the model generation
# MAGIC
# MAGIC The generation in force (the newest in `fixed_effect`): its fixed effect, its data cutoff and
# MAGIC its random-effect priors; what every nightly run measured and decided; then one entity's live
# MAGIC coefficients through the history of `re_state`, read version by version (Delta time travel).
# MAGIC
# MAGIC Parameters: `config`, `storage_root` and `overrides` as in the other notebooks; `re_type` and
# MAGIC `entity` pick the entity (empty: the one with the most updates since its prior), `versions` how
# MAGIC far back its history goes.

# COMMAND ----------

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from pyspark.sql import functions as F

from jobs.game.generation import current_generation
from jobs.runtime.notebooks import load_settings, parameter, show
from jobs.storage.store import open_store

config = load_settings()
store = open_store(spark, config.storage)
generation = current_generation(store, config.model)
if generation is None:
    raise LookupError(f"no generation is published under {store.root} yet: run the nightly job first")
print(f"generation {generation.number}, trained on the micro-batches up to {generation.cutoff_batch_id}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## The fixed effect
# MAGIC
# MAGIC One coefficient per row (`__score__` alone when the fixed effect is an outside model's score).

# COMMAND ----------

model = generation.fixed_effect
fixed_effect = pd.DataFrame(
    {"name": model.names, "term": model.terms, "mean": model.means, "variance": model.variances}
)
show(fixed_effect, rows=len(fixed_effect))

# COMMAND ----------

# MAGIC %md
# MAGIC ## The priors
# MAGIC
# MAGIC Per random-effect type: the entities the generation gave a prior, and the training rows behind them.

# COMMAND ----------

priors = (
    store.read("re_priors")
    .where(F.col("generation") == generation.number)
    .groupBy("re_type")
    .agg(
        F.count("*").alias("entities"),
        F.sum("rows").alias("rows"),
        F.percentile_approx("rows", 0.5).alias("median_rows"),
        F.max("rows").alias("max_rows"),
        F.avg(F.size("coefficients")).alias("coefficients_per_entity"),
    )
    .orderBy("re_type")
    .toPandas()
)
show(priors)

# COMMAND ----------

# MAGIC %md
# MAGIC ## The nightly runs
# MAGIC
# MAGIC One row per run: `published` or `kept` (and `note` says why), with its hold-out figures: the new
# MAGIC fixed effect alone (`fixed_only.*`), the new full model (`full.*`) and the generation it had to
# MAGIC beat (`current.*`).

# COMMAND ----------

runs = store.read("metrics").where(F.col("job") == "nightly").orderBy("recorded_at").collect()
nightly = pd.DataFrame(
    [
        {
            "run_id": run["run_id"],
            "cutoff_batch_id": run["batch_id"],
            "generation": run["generation"],
            "status": run["status"],
            "note": run["note"],
            **{key: value for key, value in sorted(run["values"].items()) if not key.startswith("seconds.")},
        }
        for run in runs
    ]
)
show(nightly)

# COMMAND ----------

# MAGIC %md
# MAGIC ## One entity's coefficients over time
# MAGIC
# MAGIC The newest `versions` versions of `re_state` that hold the entity, oldest first (one Spark read
# MAGIC each; versions older than the table's retention are gone): a `MERGE` is a micro-batch's update,
# MAGIC a `WRITE` a rebase on a new generation's priors.

# COMMAND ----------

re_type = parameter("re_type", "", "Random-effect type (empty: the most-updated entity's)")
entity = parameter("entity", "", "Entity id (empty: the most-updated one)")
versions = int(parameter("versions", "30", "Newest re_state versions to read"))
candidates = store.read("re_state")
if re_type:
    candidates = candidates.where(F.col("re_type") == re_type)
if entity:
    candidates = candidates.where(F.col("entity_id") == entity)
chosen = candidates.orderBy(F.col("updates").desc(), "re_type", "entity_id").first()
if chosen is None:
    raise LookupError(f"re_state holds no entity {entity or '(any)'} of type {re_type or '(any)'}")
re_type, entity = chosen.re_type, chosen.entity_id

key = (F.col("re_type") == re_type) & (F.col("entity_id") == entity)
snapshots = []
for commit in store.history("re_state")[-versions:]:
    row = store.read("re_state", version=commit.version).where(key).first()
    if row is None:
        continue
    snapshots += [
        {
            "version": commit.version,
            "operation": commit.operation,
            "committed_at": commit.timestamp,
            "generation": row.generation,
            "last_batch_id": row.last_batch_id,
            "updates": row.updates,
            "coefficient": f"{c.name}:{c.term}" if c.term else c.name,
            "mean": c.mean,
            "variance": c.variance,
        }
        for c in row.coefficients
    ]
history = pd.DataFrame(snapshots)
means = history.pivot(index="version", columns="coefficient", values="mean")
print(f"{re_type} {entity}: {len(means)} versions of re_state hold it")
show(history.drop_duplicates("version")[["version", "operation", "committed_at", "generation", "last_batch_id"]])
print("means by version, then their moves from one version to the next")
show(means.reset_index())
show(means.diff().iloc[1:].reset_index())

# COMMAND ----------

deviations = np.sqrt(history.pivot(index="version", columns="coefficient", values="variance"))
figure, axes = plt.subplots(figsize=(9, 4.5))
for coefficient in means.columns:
    line = axes.plot(means.index, means[coefficient], marker="o", label=coefficient)[0]
    low, high = means[coefficient] - deviations[coefficient], means[coefficient] + deviations[coefficient]
    axes.fill_between(means.index, low, high, color=line.get_color(), alpha=0.12)
axes.set_xlabel("re_state version")
axes.set_ylabel("coefficient mean (band: one standard deviation)")
axes.set_title(f"{re_type} {entity}: coefficients over time")
axes.grid(alpha=0.3)
axes.legend(fontsize="small", ncol=2)
show(figure)
plt.close(figure)
