# Developer and CI entry points. `make test` is what CI runs (.ci/run).
#
# The package is installed into .venv as a regular (non-editable) install, and
# the tests run from a place where the source tree is not on sys.path, so they
# exercise what a user would install: a module missing from the wheel fails
# the suite instead of being found in the checkout.

PY ?= python3
VENV ?= .venv
PYTEST_ARGS ?=

ROOT := $(abspath .)
BIN := $(ROOT)/$(VENV)/bin
# Dependencies are (re)installed only when pyproject.toml changes.
DEPS_STAMP := $(VENV)/.deps-installed
# sslyze (the TLS scanner the suite runs against a listener) pins an older
# cryptography than pyOpenSSL needs, so it gets a virtualenv of its own.
SSLYZE := $(ROOT)/.venv-sslyze/bin/sslyze

# The Node.js drivers of the driver matrix (tests/test_drivers.py), from the
# committed package-lock.json; again only when it or package.json changes.
NODE_DRIVERS := tests/drivers/node
NODE_STAMP := $(NODE_DRIVERS)/node_modules/.installed

.PHONY: venv install test lint demo faults clean

venv: $(BIN)/python

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(DEPS_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade "setuptools>=77" wheel
	$(BIN)/pip install -q ".[test]"
	touch $@

# Always reinstall the package itself, so the tests run the current code;
# without build isolation (setuptools is already in the venv) this is quick.
# setuptools' build/ directory is removed first: a module deleted or moved
# in the checkout would otherwise linger in it and be installed again.
install: $(DEPS_STAMP)
	rm -rf build
	$(BIN)/pip install -q --force-reinstall --no-deps --no-build-isolation .

# pytest's console script, unlike `python -m pytest`, does not put the current
# directory on sys.path; PYTHONPATH is cleared for the same reason.
# PGTLS_EXPECT_INSTALLED makes tests/test_infra.py check that this worked.
$(SSLYZE):
	$(PY) -m venv .venv-sslyze
	.venv-sslyze/bin/pip install -q --upgrade pip
	.venv-sslyze/bin/pip install -q "sslyze>=6,<7"

$(NODE_STAMP): $(NODE_DRIVERS)/package.json $(NODE_DRIVERS)/package-lock.json
	cd $(NODE_DRIVERS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

test: install $(SSLYZE) $(NODE_STAMP)
	env -u PYTHONPATH PGTLS_EXPECT_INSTALLED=1 PGTLS_SSLYZE=$(SSLYZE) $(BIN)/pytest -p no:cacheprovider $(PYTEST_ARGS) tests

# ruff, and the import contracts of pyproject.toml (import-linter): the
# layers protocol < config < tls < proxy < pool < ops < app, and no cycle
# between the modules of a layer.
lint: $(DEPS_STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	PYTHONPATH=$(ROOT) $(BIN)/lint-imports

demo: install
	$(BIN)/python -m pgtls_twisted.testing.demo

# pgtls under network and process faults (issue 15): network namespaces, a
# partition, PostgreSQL and a worker killed; needs root, about 5 minutes, and
# writes bench/FAULTS.md. Not part of `make test`.
faults: install
	bench/faults

clean:
	rm -rf $(VENV) .venv-sslyze build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	rm -rf $(NODE_DRIVERS)/node_modules
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name dropin.cache -type f -delete
