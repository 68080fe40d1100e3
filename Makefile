# Everything runs from a project-local virtual environment, created on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PYSPARK_PYTHON := $(abspath $(BIN)/python)
export PYSPARK_DRIVER_PYTHON := $(abspath $(BIN)/python)

.PHONY: venv jars test lint bench demo dist clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[spark,replay,test,dist]"
	touch $(STAMP)

venv: $(STAMP)

# The JVM jars (Delta Lake, Spark's Kafka connector, a Kafka broker for the tests) fetched by Maven into .jars/;
# a no-op when jvm/'s poms have not changed.
jars: venv
	$(BIN)/python jvm/fetch.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The slowest tests at the end of every run, so each CI log shows where the time goes.
test: lint jars
	$(BIN)/pytest --durations=25

demo: venv jars
	$(BIN)/python -m jobs.demo --out var/demo

bench: venv
	$(BIN)/python bench/trainer_throughput.py

# The wheel, the --py-files zip and the executors' packed environment (docs/deploy.md).
dist: venv
	$(BIN)/python scripts/build_dist.py

clean:
	rm -rf $(VENV) .jars .pytest_cache .hypothesis build *.egg-info var
