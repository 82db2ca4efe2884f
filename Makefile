# The two commands of the README: `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast check lint typecheck pytest faults brokers bench bench-docs screenshots venv clean

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

# Everything but the tests marked slow (see README, Development), spread over the cores. The
# `serial` tests are slow too (tests/conftest.py refuses one that is not), so none runs here.
test-fast: check
	$(VENV)/bin/pytest -n auto --dist loadgroup -m "not slow" $(PYTEST_ARGS)

check: lint typecheck

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# make test's pytest runs two passes (tools/pytest_passes.py): every test not marked `serial`
# spread over PYTEST_WORKERS pytest-xdist workers (--dist loadgroup: an xdist_group keeps to one
# worker), then the `serial` ones (the real full-disk tests) alone in one process. A `-m EXPR` in
# PYTEST_ARGS narrows both passes; one pass may find nothing when the other ran tests.
# PYTEST_WORKERS=0 runs everything in one process, in one pass. Times: README, Development.
PYTEST_WORKERS ?= auto

pytest: $(STAMP)
	$(PY) -m tools.pytest_passes --workers $(PYTEST_WORKERS) -- $(PYTEST_ARGS)

# The bridge against aedes (npm) and amqtt (own venv) under .run/brokers; not part of `make test`.
# BROKER_ARGS='--brokers aedes --scenarios live -n 200' runs a subset (see docs/brokers.md).
brokers: $(STAMP)
	$(PY) -m tools.broker_matrix $(BROKER_ARGS)

# The fault suite at big sizes (`make test` runs it at small ones); writes docs/reliability.md,
# from the results file docs/reliability.json, even when a case fails (the page says which).
faults: $(STAMP)
	FAULTS_SCALE=big FAULTS_RESULTS=docs/reliability.json $(VENV)/bin/pytest tests/faults \
		-p no:cacheprovider --timeout=3600 $(PYTEST_ARGS); status=$$?; \
	$(PY) -m tools.reliability docs/reliability.json docs/reliability.md && exit $$status

# The bridge beside the broker's own ceiling; writes docs/benchmarks.json and docs/benchmarks.md.
# BENCH_SCALE=1 for the big goals; BENCH_ARGS='--variant NAME:--transport X' etc. (python -m bench -h)
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

bench-docs: $(STAMP)
	$(PY) -m bench docs

# The README's pictures of the web view (docs/web-*.png), taken in headless Chromium.
screenshots: $(STAMP)
	$(PY) -m tools.web_screenshots docs

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache
