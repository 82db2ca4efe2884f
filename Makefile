# The two commands of the README: `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test check lint typecheck pytest venv clean bench bench-docs

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

# The bridge beside the broker's own ceiling; writes docs/benchmarks.json and docs/benchmarks.md.
# BENCH_SCALE=1 for the big goals; BENCH_ARGS='--variant NAME:--transport X' etc. (python -m bench -h)
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

bench-docs: $(STAMP)
	$(PY) -m bench docs

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache
