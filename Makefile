# The two set-up commands (see README): `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
E2E := tests/e2e

.PHONY: serve test lint fuzz fuzz-decoders fuzz-io fuzz-stateful bench clean

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

# The fuzz suite's properties with 100,000 examples each (the `fuzz` hypothesis profile);
# `make test` runs the same properties with a few hundred. Three groups run side by side
# (about an hour on two cores).
FUZZ := $(BIN)/pytest -p no:cacheprovider --hypothesis-profile=fuzz \
	--hypothesis-show-statistics --durations=0
FUZZ_DECODERS := -k "decoder or loads or api_body"
FUZZ_IO := -k "http_reader or longpoll or config_loader"
fuzz: $(VENV)/.installed
	$(MAKE) -j3 --output-sync=target fuzz-decoders fuzz-io fuzz-stateful

fuzz-decoders: $(VENV)/.installed
	$(FUZZ) tests/test_fuzz.py $(FUZZ_DECODERS)

fuzz-io: $(VENV)/.installed
	$(FUZZ) tests/test_fuzz.py $(FUZZ_IO)

fuzz-stateful: $(VENV)/.installed
	$(FUZZ) tests/test_broker_stateful.py

clean:
	rm -rf $(VENV) $(E2E)/node_modules .pytest_cache .ruff_cache .system-packages
