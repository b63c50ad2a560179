# tpg: every target does its own set-up (a .venv, the CPU build of torch first, the package editable).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.tpg-installed

.PHONY: run test test-slow bench setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_CPU)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

## the main job: the proof checks on the default MDP set, then the standard verification suite
run: $(STAMP)
	$(VENV)/bin/tpg prove
	$(VENV)/bin/tpg verify --suite standard

## the default test run (slow studies excluded)
test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

## performance figures (on demand; see BENCHMARKS.md)
bench: $(STAMP)
	$(PY) benchmarks/exact_bench.py
	$(PY) benchmarks/sampler_bench.py
	$(PY) benchmarks/verify_bench.py
	$(PY) benchmarks/prefix_bench.py
	$(PY) benchmarks/train_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
