# tpg: every target does its own set-up (a .venv, the CPU build of torch first, the package editable).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.tpg-installed

.PHONY: run figures test test-distributed test-slow bench setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_CPU)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

## the main job: proof checks, the standard verification suite, all eleven studies in quick form,
## the 15 figures and the claims report (figures/, figures/REPORT.md); 83 s on 2 cores once .venv exists
run: $(STAMP)
	$(VENV)/bin/tpg prove
	$(VENV)/bin/tpg verify --suite standard
	$(VENV)/bin/tpg study all --quick
	$(VENV)/bin/tpg figures
	$(VENV)/bin/tpg report
	@echo "claims report: figures/REPORT.md (figures in figures/)"

## the full studies, their figures and report in figures/full/ (about 8.5 minutes on 2 cores, measured:
## studies 7.0 min, figures 63 s, report 15 s)
figures: $(STAMP)
	$(VENV)/bin/tpg study all
	$(VENV)/bin/tpg figures --out-dir figures/full
	$(VENV)/bin/tpg report --out figures/full/REPORT.md
	@echo "claims report: figures/full/REPORT.md"

## the default test run (slow studies excluded)
test: $(STAMP)
	$(PY) -m pytest -q

## the distributed runs too costly for the default run: a local ray instance, a `ray start --head`
## cluster, the README's dask/ray commands that start their own cluster, a worker that always dies
test-distributed: $(STAMP)
	$(PY) -m pytest -q -m slow tests/test_experiments_distributed.py

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

## performance figures (on demand; see BENCHMARKS.md, which also names the commands of
## benchmarks/markov_bench.py and benchmarks/offpolicy_bench.py, not run here)
bench: $(STAMP)
	$(PY) benchmarks/exact_bench.py
	$(PY) benchmarks/sampler_bench.py
	$(PY) benchmarks/verify_bench.py
	$(PY) benchmarks/prefix_bench.py
	$(PY) benchmarks/train_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
