# The two commands of the README, each creating the virtual environment when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)/.dagster_home
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test ui lint

demo: $(VENV)/.installed  ## run the whole graph on prompts/example.csv
	$(BIN)/imagegen demo

test: $(VENV)/.installed  ## run the test suite
	$(BIN)/pytest -q

ui: $(VENV)/.installed $(DAGSTER_HOME)/dagster.yaml  ## the Dagster UI on this project
	$(BIN)/dagster dev

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME) && cp dagster.yaml $@

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@
