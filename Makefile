# ledgergate: `make run` serves the example, `make test` runs the whole suite.
# Both set up everything on a fresh machine (python3 + pip, node + npm, registry access).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/ledgergate.toml

.PHONY: run test check lint bench browser upstreams upstreams-bench upstreams-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# the runtime install + the MCP SDK examples/client.py uses, redone when pyproject.toml changes
$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[fast,example]'
	touch $@

# runtime + example, test and Kafka extras
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,kafka,fast,example]'
	touch $@ $(VENV)/.run-installed

# what the example config serves: the whatsapp venv only (no node/npm needed)
upstreams:
	bash scripts/install-upstreams.sh

# + the everything reference server (npm) the bench compares against
upstreams-bench:
	bash scripts/install-upstreams.sh --everything

upstreams-test:
	bash scripts/install-upstreams.sh --test

run: $(VENV)/.run-installed upstreams
	$(BIN)/ledgergate run --config $(CONFIG)

check: $(VENV)/.run-installed
	$(BIN)/ledgergate check -c $(CONFIG)

# Debian's chromium for the dashboard's browser tests (playwright drives it; never
# `playwright install`, which downloads a browser). CI runs as root on a fresh Debian.
browser:
	command -v chromium || (apt-get update && apt-get install -y chromium)

test: $(VENV)/.dev-installed upstreams-test browser
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(VENV)/.dev-installed upstreams-bench
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .upstreams .ledgergate
