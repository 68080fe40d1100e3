"""The import arrows point down only: entry points -> jobs' packages -> udfs -> lambda_learner.

Read from the source (every import statement, module level or not), so a new upward import fails
here before it fails on a cluster.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIRD_PARTY_CORE = {"numpy", "scipy"}
# What each room may import besides the standard library and itself.
ALLOWED: dict[str, set[str]] = {
    "lambda_learner": THIRD_PARTY_CORE,
    "udfs": THIRD_PARTY_CORE | {"pandas", "pyarrow", "lambda_learner"},
    "jobs.runtime": {"pyspark", "yaml", "pandas", "IPython", "jobs.runtime"},
    "jobs.storage": {"pyspark", "pyarrow", "deltalake", "delta", "jobs.runtime"},
    "jobs.streaming": {"pyspark", "jobs.runtime", "jobs.storage"},
    "jobs.game": THIRD_PARTY_CORE | {"pyspark", "jobs.runtime", "jobs.storage", "udfs", "lambda_learner"},
    "jobs.simulate": THIRD_PARTY_CORE | {"pyarrow", "lambda_learner"},
    "jobs.evaluate": THIRD_PARTY_CORE
    | {
        "pyspark",
        "pandas",
        "matplotlib",
        "jobs.runtime",
        "jobs.storage",
        "jobs.game",
        "jobs.simulate",
        "lambda_learner",
    },
    "jobs.labels": {"pyspark", "jobs.runtime", "jobs.storage", "jobs.streaming"},
}
# Executors unpickle the settings: they must not need YAML (or Spark) to do it.
STANDARD_LIBRARY_ONLY = {"jobs.runtime.settings", "jobs.runtime.errors"}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, by its full dotted name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def allowed(name: str, rules: set[str]) -> bool:
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or top == "__future__":
        return True
    return any(name == rule or name.startswith(rule + ".") for rule in rules)


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_each_room_imports_only_what_lies_below_it(room):
    wrong = {
        str(path.relative_to(ROOT)): sorted(
            name for name in imported(path) if not allowed(name, ALLOWED[room] | {room})
        )
        for path in modules(room)
    }
    assert not {path: names for path, names in wrong.items() if names}


def test_no_package_imports_an_entry_point():
    entry_points = {f"jobs.{path.stem}" for path in (ROOT / "jobs").glob("*.py") if path.stem != "__init__"}
    assert entry_points >= {"jobs.nightly_retrain", "jobs.nearline_update", "jobs.score", "jobs.generate"}
    rooms = ["lambda_learner", "udfs", *[room for room in ALLOWED if room.startswith("jobs.")]]
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported(path) & entry_points) for room in rooms for path in modules(room)
    }
    assert not {path: names for path, names in offenders.items() if names}


def test_the_settings_executors_unpickle_need_only_the_standard_library():
    for name in STANDARD_LIBRARY_ONLY:
        path = ROOT / (name.replace(".", "/") + ".py")
        assert all(allowed(module, STANDARD_LIBRARY_ONLY) for module in imported(path)), name


def test_a_rule_breaker_is_caught(tmp_path):
    upward = tmp_path / "upward.py"
    upward.write_text("import numpy\n\ndef f():\n    from jobs.nearline_update import NearlineUpdater\n")
    assert not all(allowed(name, ALLOWED["lambda_learner"]) for name in imported(upward))


def called(path: Path) -> set[str]:
    """The names ``path`` calls: ``f(...)`` as ``f``, ``x.f(...)`` as ``.f``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            names.add(node.func.id)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            names.add(f".{node.func.attr}")
    return names


def test_every_streaming_job_numbers_and_fences_its_batches_with_the_one_sequence():
    """jobs.streaming.sequence numbers every stream's batches and claims each number (jobs.storage.store fences a
    second writer there): a streaming job takes its guards from its tickets and makes none of its own."""
    streaming = {path.stem for path in (ROOT / "jobs").glob("*.py") if "jobs.streaming.runner" in imported(path)}
    assert streaming == {"nearline_update", "label_join"}, "a new streaming job: add its batch module below"
    batch_modules = [ROOT / "jobs" / "nearline_update.py", ROOT / "jobs" / "labels" / "joiner.py"]
    for path in batch_modules:
        names = called(path)
        assert {"BatchSequence", ".ticket", ".claim"} <= names, path.name
        assert "Guard" not in names, path.name
    ticketed = {path for path in modules("jobs") if ".ticket" in called(path)}
    assert ticketed == set(batch_modules)
