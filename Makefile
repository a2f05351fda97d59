# ledgergate: `make run` serves the example, `make test` runs the whole suite.
# Both set up everything on a fresh machine (python3 + pip, node + npm, registry access).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/ledgergate.toml

.PHONY: run test check lint bench upstreams upstreams-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# the runtime install, redone when pyproject.toml changes
$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[fast]'
	touch $@

# runtime + test and Kafka extras
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,kafka,fast]'
	touch $@ $(VENV)/.run-installed

upstreams:
	bash scripts/install-upstreams.sh

upstreams-test:
	bash scripts/install-upstreams.sh --test

run: $(VENV)/.run-installed upstreams
	$(BIN)/ledgergate run --config $(CONFIG)

check: $(VENV)/.run-installed
	$(BIN)/ledgergate check $(CONFIG)

test: $(VENV)/.dev-installed upstreams-test
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(VENV)/.dev-installed upstreams
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .upstreams .ledgergate
