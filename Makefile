# Two commands a newcomer runs:  make repro  (whole pipeline)  and  make test  (test suite).
# Both set up the virtual environment first; setup is a no-op once done.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -ec
# pip on these machines warns about every missing local index folder; keep real messages only.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
# uv installs the locked set in one to two minutes where pip takes three or four (same versions, same
# wheels). It honours pip's find-links (e.g. a local CPU torch wheel) so both resolve alike. Bytecode is
# compiled at install (as pip does): where PYTHONDONTWRITEBYTECODE is set, every stage process would
# otherwise compile torch and transformers from source again (measured: each stage 2x slower).
UV_VERSION := 0.13.9
PIP_LINKS   = $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_LINKS    = $(foreach d,$(PIP_LINKS),--find-links $(d))

.PHONY: setup browser repro test test-fast compare ui dag clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION) $(QUIET_PIP)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(UV_LINKS) torch==2.13.0 -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . $(QUIET_PIP)
	@touch $(STAMP)

# Debian's Chromium for the MLflow UI browser test (tests/test_compare_ui.py); installed once, as root or with sudo.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo -E"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-liberation; \
	fi

repro: setup
	$(BIN)/dvc repro

# Two pytest-xdist workers: the tests that share the reproduced tiny projects run on one (built once),
# everything else on the other. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
TEST_ARGS    = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

test: setup browser
	$(BIN)/python -m pytest $(TEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest $(TEST_ARGS) -m "not slow"

# The comparison grid of compare.yaml (strategies x r x calibration sets), each point a DVC experiment,
# paired with this workspace's reproduced default run (make repro first); summary in outputs/compare/.
compare: setup
	$(BIN)/python scripts/compare.py

# MLflow UI over the project's store, bound to loopback (HOST=0.0.0.0 to expose it).
HOST ?= 127.0.0.1
PORT ?= 5000
ui: setup
	$(BIN)/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" --host $(HOST) --port $(PORT)

dag: setup
	$(BIN)/dvc dag
