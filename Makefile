# The two set-up commands (see README): `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
E2E := tests/e2e

.PHONY: serve test lint bench clean

$(BIN)/pip:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "phxbroker needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# What `make serve` needs: phxbroker and its runtime dependencies, nothing for the tests.
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/pip
	$(BIN)/pip install --quiet -e .
	@touch $@

# Everything the tests and the benchmarks need as well.
$(VENV)/.installed: pyproject.toml | $(BIN)/pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

$(E2E)/node_modules/.installed: $(E2E)/package.json $(E2E)/package-lock.json
	cd $(E2E) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

.system-packages: scripts/install-system-packages.sh
	scripts/install-system-packages.sh
	@touch $@

serve: $(VENV)/.serve-installed
	$(BIN)/phxbroker serve --config config.example.toml

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(VENV)/.installed $(E2E)/node_modules/.installed .system-packages lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) $(E2E)/node_modules .pytest_cache .ruff_cache .system-packages
