# Every target creates/refreshes the virtual environment it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint unit integration bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/datasync demo

lint: $(STAMP)
	$(BIN)/ruff check operator tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q tests/unit tests/integration

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo.duckdb demo.duckdb.wal
