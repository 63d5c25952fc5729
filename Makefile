# `make demo` runs a whole federation on real data; `make test` runs the test suite.
# Both keep a virtual environment in .venv and reinstall only when a
# requirements file changed.

PYTHON_SYSTEM ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed
DEMO_ARGS ?=
PYTEST_ARGS ?=
# PostgreSQL for the second test pass; the suite also runs on SQLite.
TEST_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/test

# make serve runs the production processes locally against these services.
SERVE_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/flo
SERVE_REDIS_URL ?= redis://127.0.0.1:6379/0
SERVE_ARGS ?=

CHROMIUM := /usr/bin/chromium

.PHONY: demo serve test lint test-sqlite test-postgres chromium

$(PYTHON):
	$(PYTHON_SYSTEM) -m venv $(VENV)

$(RUNTIME_STAMP): requirements.txt | $(PYTHON)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(TEST_STAMP): requirements-test.txt requirements-flower.txt $(RUNTIME_STAMP)
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-flower.txt
	touch $@

demo: $(RUNTIME_STAMP)
	$(PYTHON) -m flo_site.demo $(DEMO_ARGS)

# ASGI server, Celery workers and beat on PostgreSQL and Redis; creates the database if missing.
serve: $(RUNTIME_STAMP)
	$(PYTHON) -m flo_site.wait_for_postgres "$(SERVE_DATABASE_URL)" --create
	DATABASE_URL="$(SERVE_DATABASE_URL)" REDIS_URL="$(SERVE_REDIS_URL)" FLO_DB_POOL_SIZE=$${FLO_DB_POOL_SIZE:-8} $(PYTHON) -m flo_site.serve $(SERVE_ARGS)

test: lint chromium test-sqlite test-postgres

# The browser tests drive the system Chromium; install it from apt only when it is missing.
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
		echo "$(CHROMIUM) is missing; installing chromium and chromium-driver with apt-get."; \
		apt-get update && apt-get install -y chromium chromium-driver; \
	fi

# ruff on the whole tree; mypy on the pure modules listed in mypy.ini.
lint: $(TEST_STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

test-sqlite: $(TEST_STAMP)
	env -u DATABASE_URL -u REDIS_URL FLO_DATA_DIR=$(CURDIR)/.flo-data/test $(PYTHON) -m pytest -m "not postgresql" $(PYTEST_ARGS)

# In CI (CI=true) an unreachable PostgreSQL fails the run; elsewhere the pass is skipped with a message.
test-postgres: $(TEST_STAMP)
	@if $(PYTHON) -m flo_site.wait_for_postgres "$(TEST_POSTGRES_URL)"; then \
		env -u REDIS_URL DATABASE_URL="$(TEST_POSTGRES_URL)" FLO_DATA_DIR=$(CURDIR)/.flo-data/test $(PYTHON) -m pytest -m "not demo" $(PYTEST_ARGS); \
	elif [ "$$CI" = "true" ]; then \
		echo "PostgreSQL at $(TEST_POSTGRES_URL) is unreachable; CI requires it." >&2; exit 1; \
	else \
		echo "PostgreSQL at $(TEST_POSTGRES_URL) is unreachable; the PostgreSQL pass is skipped (set TEST_POSTGRES_URL)."; \
	fi
