# Mailroom's developer commands. `make` (or `make help`) lists them.
#
# Works from a fresh clone on Debian 12 with python3 and python3-venv: `make test` installs
# the missing system packages, creates .venv, builds the web page, and runs the whole suite.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Written after a successful install; pip runs again only when one of these files changes.
STAMP := $(VENV)/.installed
REQUIREMENTS := requirements.txt requirements-dev.txt pyproject.toml
# apt-get needs root: use sudo unless we are root already.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
# Test processes: most tests wait on real servers and workers, so two pytest processes (each
# with its own private servers) keep 2 cores busy; a whole file always runs in one process.
TEST_PROCESSES ?= 2
# Test and coverage options (`make test PYTEST_ARGS="-x -k launcher"` narrows a run).
PYTEST_ARGS ?= -n $(TEST_PROCESSES) --dist loadfile --cov --cov-report=term --cov-fail-under=90 tests
# Extra options for `mailroom run`, e.g. `make run ARGS="--port 8080 --flower"`.
ARGS ?=

.PHONY: help venv system-deps node-deps browser-deps web web-test run test lint bench clean distclean

# The web page (web/): npm ci when the lock file changes, a Vite build when a source changes.
WEB := web
WEB_MODULES := $(WEB)/node_modules/.installed
WEB_STAMP := $(WEB)/.built
WEB_SOURCES := $(shell find $(WEB)/src -type f 2>/dev/null) \
	$(addprefix $(WEB)/,index.html package.json package-lock.json tsconfig.json vite.config.ts)
# Vite 8 needs Node 20.19 or newer; Debian 12's own nodejs package is 18.
NODE_OK := node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)' >/dev/null 2>&1
NODE_TOO_OLD := echo "web page: needs Node.js 20.19 or newer (found: $$(node --version 2>/dev/null || echo none)); install a newer nodejs, then make web"

help: ## List the targets
	@echo "Mailroom: make <target>"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(STAMP) ## Create .venv and install requirements-dev.txt and Mailroom (-e); again only when they change

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(REQUIREMENTS) | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -r requirements-dev.txt -e .
	touch $@

# One check per package: the file it provides must exist, else the package is installed.
system-deps: ## Install the Debian packages the tests use (Redis, PostgreSQL, PgBouncer, Dovecot, venv) if any is missing
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing="$$missing postgresql"; \
	[ -x /usr/sbin/dovecot ] || missing="$$missing dovecot-core"; \
	[ -x /usr/lib/dovecot/imap ] || missing="$$missing dovecot-imapd"; \
	[ -x /usr/sbin/pgbouncer ] || missing="$$missing pgbouncer"; \
	$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if command -v docker >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1 \
		&& ! command -v docker-compose >/dev/null 2>&1; then missing="$$missing docker-compose"; fi; \
	if [ -z "$$missing" ]; then echo "system packages: all present"; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "missing:$$missing (no apt-get here: install them with your package manager)"; exit 1; \
	fi; \
	echo "installing:$$missing"; \
	$(SUDO) apt-get update && \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing

# One check per package, as in system-deps; apt-get only when something is missing.
node-deps: ## Install Node.js and npm from Debian's packages if missing (they build the web page)
	@missing=""; \
	command -v node >/dev/null 2>&1 || missing="$$missing nodejs"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "missing:$$missing (no apt-get here: install them with your package manager)"; exit 1; \
	fi; \
	echo "installing:$$missing"; \
	$(SUDO) apt-get update && \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing

browser-deps: node-deps ## Install Debian's Chromium if missing (the web page's browser test drives it)
	@[ -x /usr/bin/chromium ] && exit 0; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "missing: chromium"; exit 1; fi; \
	echo "installing: chromium"; \
	$(SUDO) apt-get update && \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

$(WEB_MODULES): $(WEB)/package.json $(WEB)/package-lock.json | node-deps
	@$(NODE_OK) || { $(NODE_TOO_OLD); exit 1; }
	cd $(WEB) && npm ci --no-audit --no-fund
	touch $@

$(WEB_STAMP): $(WEB_MODULES) $(WEB_SOURCES)
	cd $(WEB) && npm run build
	touch $@

web: $(WEB_STAMP) ## Build the web page into web/dist (npm ci and Vite), again only when its sources change

web-test: web ## Vitest: the page's components and its task polling
	cd $(WEB) && npm test

run: venv ## Run everything locally: private Redis, API and web page, workers, Beat (prints URLs and an admin key)
	@$(MAKE) --no-print-directory web || echo "web page not built (see above); the API still answers, with /docs"
	$(BIN)/mailroom run $(ARGS)

# The web page's end-to-end test runs inside pytest (tests/web/), against the real stack.
test: system-deps browser-deps venv ## Run the test suite with the coverage gate, the web page's Vitest tests first
	@if $(NODE_OK); then $(MAKE) --no-print-directory web-test; else $(NODE_TOO_OLD); echo "web page: its tests are skipped"; fi
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv ## ruff check, ruff format --check, mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: system-deps venv ## Run every bench/*.py (they print measured figures; not pass/fail)
	@set -e; for script in bench/*.py; do \
		[ -e "$$script" ] || continue; \
		case "$$script" in bench/bench_*.py) ;; *) continue ;; esac; \
		echo "== $$script"; $(BIN)/python "$$script"; \
	done

clean: ## Remove caches, coverage data and build output (keeps .venv and the local data in var/)
	rm -rf .pytest_cache .mypy_cache .ruff_cache htmlcov build dist .coverage .coverage.* coverage.xml
	rm -rf $(WEB)/dist $(WEB_STAMP) $(WEB)/test-results
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -path ./$(VENV) -prune -o -name '*.egg-info' -type d -prune -exec rm -rf {} +

distclean: clean ## clean, and also delete .venv, var/ (the local database and admin key) and web/node_modules
	rm -rf $(VENV) var $(WEB)/node_modules
