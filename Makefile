# Every target creates/refreshes the virtual environment it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv bytecode demo test lint bench crds k8s-bins e2e clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# the package's bytecode, as an installed wheel has it: where PYTHONDONTWRITEBYTECODE is set,
# every `datasync` process (the demo's, each test's, each benchmark round's) compiled it anew
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q operator/datasync

demo: bytecode
	$(BIN)/datasync demo

lint: $(STAMP)
	$(BIN)/ruff check operator tests bench
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

test: lint bytecode k8s-bins
	$(BIN)/python -m datasync.api --output crds --check
	$(BIN)/pytest -q tests

# the generated CRDs (checked in; a test fails when they drift from datasync/api)
crds: $(STAMP)
	$(BIN)/python -m datasync.api --output crds

# kube-apiserver, kube-controller-manager, kubectl, etcd, helm, kwok built from Go modules,
# cached outside the repository (first build ~20 min on 2 cores)
k8s-bins:
	bash hack/k8s-bins.sh

e2e: bytecode k8s-bins
	$(BIN)/pytest -q tests/e2e

bench: bytecode
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo.duckdb demo.duckdb.wal
