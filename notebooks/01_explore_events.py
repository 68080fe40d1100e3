# Databricks notebook source
# MAGIC %md
# MAGIC # Explore the event stream
# MAGIC
# MAGIC What the nearline job has taken in: the valid events of every micro-batch, how they spread over
# MAGIC the entities of each random-effect type, what it quarantined and why, and how each batch's update
# MAGIC went (docs/nearline.md, "Metrics").
# MAGIC
# MAGIC Parameters: `config` (a config file, read over `conf/base.yaml`), `storage_root` (the tables'
# MAGIC root, empty for the config file's) and `overrides` (`key=value` settings separated by `;`).

# COMMAND ----------

import matplotlib.pyplot as plt
import pandas as pd
from pyspark.sql import Window
from pyspark.sql import functions as F

from jobs.runtime.notebooks import load_settings, show
from jobs.storage.store import open_store

config = load_settings()
store = open_store(spark, config.storage)
events = store.read("events")
quarantine = store.read("quarantine")
print(f"tables under {store.root}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Events per micro-batch
# MAGIC
# MAGIC The valid events each batch appended, their label rate (the mean label: the share of positives
# MAGIC for `logistic`) and the time they span.

# COMMAND ----------

per_batch = (
    events.groupBy("batch_id")
    .agg(
        F.count("*").alias("events"),
        F.avg("label").alias("label_rate"),
        F.min("event_time").alias("first_event"),
        F.max("event_time").alias("last_event"),
    )
    .orderBy("batch_id")
    .toPandas()
)
label_rate = (per_batch["events"] * per_batch["label_rate"]).sum() / per_batch["events"].sum()
print(f"{per_batch['events'].sum()} events in {len(per_batch)} batches, label rate {label_rate:.4f}")
show(per_batch)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Events per entity
# MAGIC
# MAGIC For each random-effect type, how many events its entities have: a few popular entities and a
# MAGIC long tail is the usual shape; the tail is what the priors and the nearline updates are for.

# COMMAND ----------

top_entities, summaries = {}, []
for r in config.model.random_effects:
    counts = events.groupBy(F.col(r.entity_column).alias("entity_id")).count()
    top_entities[r.name] = counts.orderBy(F.col("count").desc(), "entity_id").limit(10).toPandas()
    summaries.append(
        counts.agg(
            F.lit(r.name).alias("re_type"),
            F.count("*").alias("entities"),
            F.sum("count").alias("events"),
            F.avg("count").alias("mean"),
            F.percentile_approx("count", 0.5).alias("median"),
            F.percentile_approx("count", 0.9).alias("p90"),
            F.max("count").alias("max"),
        )
    )
entity_summary = pd.concat([summary.toPandas() for summary in summaries], ignore_index=True)
print("events per entity")
show(entity_summary)
for name, top in top_entities.items():
    print(f"{name}: the most active entities")
    show(top)

# COMMAND ----------

# MAGIC %md
# MAGIC ## The quarantine
# MAGIC
# MAGIC Rejected events by reason (the first rule each broke, docs/events.md), then a few raw payloads of
# MAGIC every reason as they arrived.

# COMMAND ----------

reasons = quarantine.groupBy("reason").count().orderBy(F.col("count").desc(), "reason").toPandas()
show(reasons)
by_reason = Window.partitionBy("reason").orderBy("batch_id", "payload")
rejected_sample = (
    quarantine.withColumn("nth", F.row_number().over(by_reason))
    .where(F.col("nth") <= 2)
    .select("reason", "batch_id", "payload")
    .orderBy("reason", "batch_id")
)
show(rejected_sample)

# COMMAND ----------

# MAGIC %md
# MAGIC ## The nearline updates
# MAGIC
# MAGIC One row per micro-batch: `loss_before` is the batch's mean loss under the model before the
# MAGIC batch updated it (predict, then learn), `loss_after` after; then entities updated, new and failed
# MAGIC per random-effect type.

# COMMAND ----------

figures = ["rows_valid", "rows_quarantined", "loss_before", "loss_after"]
figures += [
    f"{figure}.{r.name}"
    for r in config.model.random_effects
    for figure in ("entities_updated", "new_entities", "failed_updates")
]
batch_metrics = (
    store.read("metrics")
    .where(F.col("job") == "nearline")
    .select("batch_id", "generation", "status", *[F.col("values")[key].alias(key) for key in figures])
    .orderBy("batch_id")
    .toPandas()
)
show(batch_metrics)

figure, axes = plt.subplots(figsize=(8, 4))
for column in ("loss_before", "loss_after"):
    axes.plot(batch_metrics["batch_id"], batch_metrics[column], marker="o", label=column)
axes.set_xlabel("micro-batch")
axes.set_ylabel("mean loss per event")
axes.set_title("Nearline: each batch's loss before and after its update")
axes.grid(alpha=0.3)
axes.legend()
show(figure)
plt.close(figure)
