# The two commands of the README, each creating the virtual environment when it is missing.
PYTHON ?= python3
PORT ?= 3000
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export IMAGEGEN_CONFIG ?= $(CURDIR)/imagegen.toml
export HF_HUB_OFFLINE ?= 1
# Test processes: the suite's tests are independent, except those sharing a module-scoped
# fixture, which run together on one worker (tests/conftest.py groups them).
TEST_WORKERS ?= 3

.PHONY: demo test ui review lint

demo: $(VENV)/.installed  ## run the whole graph on every CSV in prompts/
	$(BIN)/imagegen demo

# The project's own modules are compiled first: where PYTHONDONTWRITEBYTECODE is set (as on CI
# here), each of the suite's few hundred processes would otherwise compile them again.
test: $(VENV)/.installed  ## run the test suite
	$(BIN)/python -m compileall -q imagegen_pipeline tests >/dev/null
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25

# `imagegen home` copies the project's dagster.yaml into DAGSTER_HOME and creates its databases
# under a file lock (two first starts at once could corrupt them). dagster dev runs from
# DAGSTER_HOME so that it does not warn about the (unused) copy in the project folder.
ui: $(VENV)/.installed  ## the Dagster UI (and daemon) on PORT
	$(BIN)/imagegen home
	cd $(DAGSTER_HOME) && $(CURDIR)/$(BIN)/dagster dev -w $(CURDIR)/workspace.yaml -p $(PORT)

# The review app over the project's storage, on 127.0.0.1 (imagegen review --help for more).
REVIEW_PORT ?= 8765
review: $(VENV)/.installed  ## the review web app on REVIEW_PORT
	$(BIN)/imagegen review --port $(REVIEW_PORT)

lint: $(VENV)/.installed  ## ruff, and the import layers of pyproject.toml's [tool.importlinter]
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@
