# The two set-up commands (see README): `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
E2E := tests/e2e

.PHONY: serve test lint fuzz fuzz-properties fuzz-stateful bench clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "phxbroker needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

$(E2E)/node_modules/.installed: $(E2E)/package.json $(E2E)/package-lock.json
	cd $(E2E) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

.system-packages: scripts/install-system-packages.sh
	scripts/install-system-packages.sh
	@touch $@

serve: $(VENV)/.installed
	$(BIN)/phxbroker serve --config config.example.toml

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(VENV)/.installed $(E2E)/node_modules/.installed .system-packages lint
	$(BIN)/pytest

# The fuzz suite's properties with 100,000 examples each (the `fuzz` hypothesis profile);
# `make test` runs the same properties with a few hundred. The state machine and the other
# properties run side by side (each about 50 minutes on two cores).
FUZZ := $(BIN)/pytest -p no:cacheprovider --hypothesis-profile=fuzz \
	--hypothesis-show-statistics --durations=0
fuzz: $(VENV)/.installed
	$(MAKE) -j2 --output-sync=target fuzz-properties fuzz-stateful

fuzz-properties fuzz-stateful: $(VENV)/.installed
	$(FUZZ) $(if $(filter fuzz-stateful,$@),tests/test_broker_stateful.py,tests/test_fuzz.py)

clean:
	rm -rf $(VENV) $(E2E)/node_modules .pytest_cache .ruff_cache .system-packages
