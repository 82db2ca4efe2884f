# The two commands of the README: `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test check lint typecheck pytest venv clean brokers

# Recreate the venv's install when the project's dependencies change.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	@bash tools/run-dev.sh

test: check pytest

check: lint typecheck

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The bridge against aedes (npm) and amqtt (own venv) under .run/brokers; not part of `make test`.
# BROKER_ARGS='--brokers aedes --scenarios live -n 200' runs a subset (see docs/brokers.md).
brokers: $(STAMP)
	$(PY) -m tools.broker_matrix $(BROKER_ARGS)

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache
