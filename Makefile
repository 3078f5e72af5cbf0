# Two commands do everything on a fresh machine with Python 3.11:
#   make run   - install into .venv, then the whole pipeline on the default preset
#                (make run SEED=1 RUN_DIR=runs/seed1: another independent run; run seeds are 0-9)
#   make test  - install into .venv (if needed), then the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/quick
SEED ?= 0
export SDL_VIDEODRIVER ?= dummy

.PHONY: install run test test-fast bench lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,ray,sb3]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/worldmodels run --preset quick --run-dir $(RUN_DIR) --seed $(SEED)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/worldmodels bench

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: install
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) .pytest_cache
