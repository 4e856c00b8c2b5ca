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

# Every package, transitive ones included, comes from the lock with its hash; then the project
# itself, without resolving anything again.
$(STAMP): pyproject.toml requirements/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Install into ./.venv from requirements/dev.lock (again when it changes)

LOCK := $(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe \
	--no-emit-index-url --no-emit-find-links --no-emit-trusted-host

.PHONY: lock
lock: install ## Re-resolve requirements/*.lock after changing pyproject.toml (needs the index)
	$(LOCK) --output-file requirements/runtime.lock pyproject.toml
	$(LOCK) --extra dev --extra run --output-file requirements/dev.lock pyproject.toml

# The page tests drive a real headless Chromium; Debian's package, installed when missing and
# we may (root with apt). Elsewhere those tests skip, or fail under CI=true.
.PHONY: browser
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (Debian package) for the page tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: install it for the page tests"; fi; }

# The alert rules are checked by promtool: Debian's prometheus package, installed the same way.
.PHONY: promtool
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing promtool (Debian package prometheus) for the alert rule tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool not found: install Prometheus for the alert rule tests"; fi; }

.PHONY: test
test: install browser promtool ## Lint, then run every test (CI=true: nothing may skip)
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
bench: install ## Run the benchmarks against PostgreSQL, Redis and RabbitMQ; writes docs/benchmarks.md
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.stream
	$(BIN)/python -m bench.brokers
	$(BIN)/python -m bench.profile --label after

.PHONY: profile
profile: install ## Sample the receiver and a worker with py-spy; the top costs go into docs/benchmarks.md
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.profile --label after

.PHONY: clean
clean: ## Remove the virtual environment and local data
	rm -rf $(VENV) var .pytest_cache .ruff_cache
