# Mailroom's developer commands. `make` (or `make help`) lists them.
#
# Works from a fresh clone on Debian 12 with python3 and python3-venv: `make test` installs
# the missing system packages, creates .venv, and runs the whole suite.

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
# Test and coverage options (`make test PYTEST_ARGS="-x -k launcher"` narrows a run).
PYTEST_ARGS ?= --cov --cov-report=term --cov-fail-under=90 tests
# Extra options for `mailroom run`, e.g. `make run ARGS="--port 8080 --no-flower"`.
ARGS ?=

.PHONY: help venv system-deps run test lint bench clean distclean

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
system-deps: ## Install the Debian packages the tests use (Redis, PostgreSQL, Dovecot, venv) if any is missing
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing="$$missing postgresql"; \
	[ -x /usr/sbin/dovecot ] || missing="$$missing dovecot-core"; \
	[ -x /usr/lib/dovecot/imap ] || missing="$$missing dovecot-imapd"; \
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

run: venv ## Run everything locally: private Redis, API, workers, Beat, Flower (prints URLs and an admin key)
	$(BIN)/mailroom run $(ARGS)

test: system-deps venv ## Run the test suite with the coverage gate
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
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -path ./$(VENV) -prune -o -name '*.egg-info' -type d -prune -exec rm -rf {} +

distclean: clean ## clean, and also delete .venv and var/ (the local database and admin key)
	rm -rf $(VENV) var
