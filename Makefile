# The two commands most people need:
#   make demo   set up, then fine-tune the default base on the bundled sample and compare predictions
#   make test   set up with test tools, then run the test suite
PY := $(shell [ -n "$$VIRTUAL_ENV$$CONDA_PREFIX" ] && command -v python || echo .venv/bin/python)

.PHONY: setup setup-dev demo test test-fast lint web

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
	$(PY) -m mypy

# The dashboard: its unit tests, a rebuild, and a check that the shipped assets are that build.
web:
	cd web && npm ci --no-audit --no-fund --loglevel=error && npm test && npm run build
	@test -z "$$(git status --porcelain -- src/tunery/server/static)" || \
	  { echo "src/tunery/server/static differs from a fresh build of web/: commit the build"; \
	    git status --short -- src/tunery/server/static; exit 1; }
