"""The examples in lambda_learner's docstrings run, and say what they print."""

import doctest
import importlib
import pkgutil

import pytest

import lambda_learner

MODULES = sorted(
    [lambda_learner.__name__]
    + [info.name for info in pkgutil.walk_packages(lambda_learner.__path__, prefix=f"{lambda_learner.__name__}.")]
)

# Where examples must be: module -> the objects (qualified names within it) with at least one.
EXPECTED_EXAMPLES = {
    "lambda_learner.batched": {"BatchedSolver", "EntityBatch"},
    "lambda_learner.trainers": {
        "TrainerSquareLossWithL2",
        "TrainerLogisticLossWithL2",
        "TrainerSequentialBayesianLogisticLossWithL2",
        "TrainerSequentialBayesianSquareLossWithL2",
    },
    "lambda_learner.scoring": {"thompson_sample", "table_scores", "CoefficientTable", "hash_strings"},
}

OPTIONS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def test_the_expected_modules_exist():
    assert set(EXPECTED_EXAMPLES) <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    tests = [test for test in doctest.DocTestFinder().find(module, name) if test.examples]
    with_examples = {test.name.removeprefix(f"{name}.") for test in tests}
    missing = EXPECTED_EXAMPLES.get(name, set()) - with_examples
    assert not missing, f"{name}: no docstring examples in {sorted(missing)}"

    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report: list[str] = []
    failed = sum(runner.run(test, out=report.append).failed for test in tests)
    assert failed == 0, "".join(report)
