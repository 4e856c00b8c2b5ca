# Skillpay. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Install into ./.venv (once, and again when pyproject.toml changes)

# The page tests drive a real headless Chromium; Debian's package, installed when missing and
# we may (root with apt). Elsewhere those tests skip, or fail under CI=true.
.PHONY: browser
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (Debian package) for the page tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: install it for the page tests"; fi; }

.PHONY: test
test: install browser ## Lint, then run every test (CI=true: nothing may skip)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

.PHONY: unit
unit: install ## Only the unit tests
	$(BIN)/pytest tests/unit

.PHONY: run
run: install ## Start web, worker, beat, simulator and Flower on embedded defaults
	$(BIN)/python -m config.devrun

.PHONY: migrate
migrate: install ## Apply the database migrations (DATABASE_URL)
	$(BIN)/skillpay db upgrade

.PHONY: fmt
fmt: install ## Format and fix what ruff can
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

.PHONY: bench
bench: install ## Run the benchmarks against PostgreSQL and Redis; writes docs/benchmarks.md
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.run

.PHONY: clean
clean: ## Remove the virtual environment and local data
	rm -rf $(VENV) var .pytest_cache .ruff_cache
