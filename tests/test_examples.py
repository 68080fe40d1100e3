"""The tutorial runs, and runs the same on lambda-learner 0.1.0 with only its import block changed."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIAL = Path(__file__).resolve().parents[1] / "examples" / "tutorial.py"

ORIGINAL_IMPORTS = """\
from linkedin.learner.ds.feature import Feature
from linkedin.learner.ds.index_map import IndexMap
from linkedin.learner.ds.record import TrainingRecord
from linkedin.learner.ds.representation_utils import (
    index_domain_coeffs_to_nt_domain_coeffs,
    nt_domain_coeffs_to_index_domain_coeffs,
    nt_domain_data_to_index_domain_data,
)
from linkedin.learner.prediction.evaluator import evaluate
from linkedin.learner.prediction.linear_scorer import score_linear_model
from linkedin.learner.prediction.trainer_sequential_bayesian_logistic_loss_with_l2 import (
    TrainerSequentialBayesianLogisticLossWithL2,
)
"""


def run(source: str, tmp_path: Path) -> dict:
    script = tmp_path / "tutorial.py"
    script.write_text(source)
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout)


def with_original_imports(source: str) -> str:
    """The tutorial with its `from lambda_learner import ...` block swapped for the original's imports."""
    tree = ast.parse(source)
    block = next(node for node in tree.body if isinstance(node, ast.ImportFrom) and node.module == "lambda_learner")
    lines = source.splitlines(keepends=True)
    return "".join(lines[: block.lineno - 1]) + ORIGINAL_IMPORTS + "".join(lines[block.end_lineno :])


def test_the_tutorial_learns(tmp_path):
    report = run(TUTORIAL.read_text(), tmp_path)
    assert report["auc_after"] > report["auc_before"]
    # Summer lowers clicks for this ad; the prior did not know, the update found out.
    assert report["means"]["season:summer"] < -0.3
    assert all(0 < value < 0.25 for value in report["variances"].values())


def test_the_tutorial_runs_on_the_original_with_only_the_imports_changed(tmp_path):
    ours = run(TUTORIAL.read_text(), tmp_path)
    theirs = run(with_original_imports(TUTORIAL.read_text()), tmp_path)
    assert theirs["index_map"] == ours["index_map"]
    assert theirs["auc_after"] == pytest.approx(ours["auc_after"], abs=1e-3)
    for name, value in ours["means"].items():
        assert theirs["means"][name] == pytest.approx(value, abs=1e-3)
        assert theirs["variances"][name] == pytest.approx(ours["variances"][name], rel=1e-3)
