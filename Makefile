# The two commands most people need:
#   make demo   set up, then fine-tune the default base on the bundled sample and compare predictions
#   make test   set up with test tools, then run the test suite
PY := $(shell [ -n "$$VIRTUAL_ENV$$CONDA_PREFIX" ] && command -v python || echo .venv/bin/python)

.PHONY: setup setup-dev demo test test-fast lint

setup:
	@scripts/setup.sh >/dev/null

setup-dev:
	@scripts/setup.sh dev >/dev/null

demo: setup
	$(PY) -m tunery.cli demo

test: setup-dev
	$(PY) -m pytest -q

test-fast: setup-dev
	$(PY) -m pytest -q -m "not slow"

lint: setup-dev
	$(PY) -m ruff check src tests
