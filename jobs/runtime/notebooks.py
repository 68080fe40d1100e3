"""What the notebooks in ``notebooks/`` share: parameters and output that work on Databricks and locally.

On Databricks a parameter is a text widget (set by hand, or by a job's ``base_parameters``) and
output goes through ``display``. Elsewhere, where a test or a script runs the notebook's cells
with only ``spark`` defined, a parameter comes from the environment variable
``LAMBDA_LEARNER_NOTEBOOK_<NAME>`` (upper case) or its default, and frames are printed.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame

from jobs.runtime.config import load_config
from jobs.runtime.settings import Config

ENVIRONMENT_PREFIX = "LAMBDA_LEARNER_NOTEBOOK_"
# A notebook's working directory on Databricks is its own folder, one below the project's root.
DEFAULT_CONFIG = "../conf/databricks.yaml"


def _notebook_global(name: str) -> Any:
    """One of the names Databricks puts in a notebook's namespace (``dbutils``, ``display``, ...), or None."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return None if shell is None else shell.user_ns.get(name)


def parameter(name: str, default: str, label: str) -> str:
    """The notebook parameter ``name``: a text widget on Databricks, else its environment variable or ``default``."""
    dbutils = _notebook_global("dbutils")
    if dbutils is None:
        return os.environ.get(ENVIRONMENT_PREFIX + name.upper(), default)
    dbutils.widgets.text(name, default, label)
    return dbutils.widgets.get(name)


def load_settings(storage_root: bool = True) -> Config:
    """The configuration the parameters name: a config file, ``key=value`` overrides and, optionally, a tables root."""
    path = parameter("config", DEFAULT_CONFIG, "Config file")
    overrides = parameter("overrides", "", "Overrides (key=value; ...)").split(";")
    if storage_root and (root := parameter("storage_root", "", "Tables root (empty: the config file's)")):
        overrides.append(f"storage.root={root}")
    return load_config(path, [item.strip() for item in overrides if item.strip()])


def show(value: Any, rows: int = 20) -> None:
    """``display`` on Databricks (a pandas frame loses its index); elsewhere ``rows`` rows of a frame, or print."""
    display = _notebook_global("display")
    if display is not None:
        display(value)
    elif isinstance(value, DataFrame):
        value.show(rows, truncate=False)
    elif isinstance(value, pd.DataFrame):
        print(value.head(rows).to_string())
    else:
        print(value)


def show_html(html: str) -> bool:
    """``displayHTML`` on Databricks; False elsewhere, where there is no page to show it on."""
    display_html = _notebook_global("displayHTML")
    if display_html is None:
        return False
    display_html(html)
    return True
