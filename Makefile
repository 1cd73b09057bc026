# The two commands most people need:
#   make demo   set up, then fine-tune the default base on the bundled sample and compare predictions
#   make test   set up with test tools, then run the test suite
PY := $(shell [ -n "$$VIRTUAL_ENV$$CONDA_PREFIX" ] && command -v python || echo .venv/bin/python)
# Test files run in this many pytest-xdist workers (one file stays on one worker, so its
# module-scoped servers and trained runs are built once); each computes on one thread.
TEST_WORKERS ?= 2

.PHONY: setup setup-dev demo test test-fast lint web

setup:
	@scripts/setup.sh >/dev/null

setup-dev:
	@scripts/setup.sh dev >/dev/null

demo: setup
	$(PY) -m tunery.cli demo

test: setup-dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: setup-dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: setup-dev
	$(PY) -m ruff check src tests
	$(PY) -m mypy

# The dashboard: its unit tests, a rebuild, and a check that the shipped assets are that build.
web:
	cd web && npm ci --no-audit --no-fund --loglevel=error && npm test && npm run build
	@test -z "$$(git status --porcelain -- src/tunery/server/static)" || \
	  { echo "src/tunery/server/static differs from a fresh build of web/: commit the build"; \
	    git status --short -- src/tunery/server/static; exit 1; }
