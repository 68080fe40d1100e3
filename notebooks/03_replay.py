# Databricks notebook source
# MAGIC %md
# MAGIC # Replay a stream: predict, then learn
# MAGIC
# MAGIC The Lambda Learner experiment (`jobs/replay.py`): the first windows of a time-ordered stream
# MAGIC train a nightly generation; every later window is scored before anything learns from it by the
# MAGIC fixed effect alone, the stale generation, the generation kept fresh by the nearline job (one
# MAGIC variant per forgetting factor) and, optionally, a model retrained on every window. Each variant
# MAGIC runs the real jobs on its own tables under the output folder.
# MAGIC
# MAGIC Parameters: `config` and `overrides` as in the other notebooks (the tables go under `out`);
# MAGIC `stream`, a folder of `part-*` files (one window each, in time order, as `jobs.generate` writes
# MAGIC them); `out`; `train_files`; `deltas` (comma separated); `ideal` (`true` or `false`).

# COMMAND ----------

import base64
import html
from pathlib import Path

import pandas as pd

from jobs.replay import replay
from jobs.runtime.notebooks import load_settings, parameter, show, show_html

config = load_settings(storage_root=False)
stream = Path(parameter("stream", "/Volumes/main/lambda_learner/replay/landing", "Stream folder (part-* files)"))
out = Path(parameter("out", "/Volumes/main/lambda_learner/replay/out", "Output folder"))
train_files = int(parameter("train_files", "4", "Windows that train the first generation"))
deltas = [float(delta) for delta in parameter("deltas", "0.8", "Forgetting factors (comma separated)").split(",")]
ideal = parameter("ideal", "true", "Also retrain on every window (slow)").strip().lower() == "true"

# COMMAND ----------

files = sorted(path for path in stream.iterdir() if path.name.startswith("part-"))
report = replay(spark, config, files, out, train_files=train_files, deltas=deltas, ideal=ideal)
show(pd.DataFrame(report["summary"]).T.rename_axis("variant").reset_index())

# COMMAND ----------

# MAGIC %md
# MAGIC ## The summary and the plots

# COMMAND ----------

summary = (out / "summary.md").read_text()
plots = [path for path in (out / "auc.png", out / "log_loss.png", out / "per_entity_auc.png") if path.exists()]
images = "".join(
    f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" style="max-width:100%">'
    for path in plots
)
if not show_html(f"<pre>{html.escape(summary)}</pre>{images}"):
    print(summary)
    print("plots:", ", ".join(str(path) for path in plots))
