# Set-up and entry points. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export RTS_DATA_DIR ?= $(CURDIR)/data
export DAGSTER_HOME ?= $(RTS_DATA_DIR)/dagster_home
export WANDB_ERROR_REPORTING := false

.PHONY: install demo test lint format ui bench chromium clean-data

$(BIN)/rts: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/rts

# kaleido renders static PNGs through a system Chromium; without one the report is HTML-only.
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for static plot images (kaleido)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "WARNING: chromium install failed; reports will be HTML-only"; \
	else echo "NOTE: no chromium found; install it (apt-get install chromium) for PNG figures"; fi

demo: install chromium
	$(BIN)/rts simulate --if-missing
	$(BIN)/rts refresh

test: install chromium lint
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Run from $DAGSTER_HOME (which `rts instance` fills with our dagster.yaml), so dagster dev
# does not warn that the repo's dagster.yaml "will not be used". Dagster 1.13 calls
# `dagster dev` superseded by `dg dev` (package dagster-dg-cli, not installed here); that
# one warning is filtered by its exact text, every other warning still shows.
UI_PORT ?= 3000
ui: install
	$(BIN)/rts instance
	cd "$(DAGSTER_HOME)" && \
	  PYTHONWARNINGS='ignore:Function `dev_command` is superseded:FutureWarning' \
	  "$(abspath $(BIN))/dagster" dev -w "$(CURDIR)/workspace.yaml" -p $(UI_PORT)

bench: install
	@for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-data:
	rm -rf $(RTS_DATA_DIR)/wandb $(RTS_DATA_DIR)/report $(RTS_DATA_DIR)/dagster_home

# The scale-out path run for real (docs/scale_out.md): Postgres storage, Redis broker, two
# Celery workers, the daemon's run queue and the UI, all started here and stopped at the end.
.PHONY: scale-demo
scale-demo: install
	$(BIN)/pip install --quiet -e '.[scale]'
	PYTHON_BIN=$(abspath $(BIN))/python bash deploy/scale_demo.sh
