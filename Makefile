# Set-up is part of every target: a fresh machine needs only `make run` or `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= python3

.PHONY: install run quick paper ablation test test-fast bench tune postgres clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch on disk first, so pip never pulls a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,scale]'
	touch $(STAMP)

install: $(STAMP)

# The main job: the DVC pipeline on the embedded defaults (conf/params.yaml), under one
# MLflow parent run.
run: $(STAMP)
	$(VENV)/bin/dntsync pipeline

# The same pipeline on the reduced `quick` profile, in .profiles/quick/.
quick: $(STAMP)
	$(VENV)/bin/dntsync pipeline --profile conf/profiles/quick.yaml

# The paper-literal learner (flat head, positions-only local state, Table II) through the
# whole pipeline, in .profiles/paper/ (hours on 2 cores: the flat head); keeps its report,
# figures and headline metrics in docs/results/paper/ (scripts/keep_results.py).
paper: $(STAMP)
	$(VENV)/bin/dntsync pipeline --profile conf/profiles/paper.yaml
	$(PY) scripts/keep_results.py .profiles/paper docs/results/paper

# From the paper's learner to the default one, a change at a time, 3 seeds each (needs the
# twin: `dvc repro train_twin`); writes benchmarks/results/ablation.json (docs/learners.md).
# Then what one upload is worth at eps 0.5 and 0.8 (Fig. 4) and in the Fig. 3 setting, now
# and in the slots after it (scripts/upload_value.py; seconds), and the upload offsets of
# every saved VDN model refitted from zero (scripts/offsets_search.py; needs `make run`), and
# those models against the nearest-BS rule on held-out episodes (scripts/rule_check.py), and the
# retry rules (upload k slots after the last success) against the run's heuristics and VDN
# (scripts/retry_rules.py), and the models' upload offsets refitted by the slots since the
# last success (scripts/retry_offsets.py).
ablation: $(STAMP)
	$(PY) scripts/ablation.py
	$(PY) scripts/upload_value.py --set scenario.eps=0.5 --set scenario.n_rbs=9
	$(PY) scripts/upload_value.py --set scenario.eps=0.8 --set scenario.n_rbs=9 --out benchmarks/results/upload_value_e8.json
	$(PY) scripts/upload_value.py --out benchmarks/results/upload_value_fig3.json
	$(PY) scripts/offsets_search.py --out benchmarks/results/offsets.json
	$(PY) scripts/rule_check.py --out benchmarks/results/rule_check.json
	$(PY) scripts/rule_check.py --episodes 256 --out benchmarks/results/rule_check_256.json
	$(PY) scripts/retry_rules.py --out benchmarks/results/retry_rules.json
	$(PY) scripts/retry_offsets.py --out benchmarks/results/retry_offsets.json

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_env.py
	$(PY) benchmarks/bench_twin.py
	$(PY) benchmarks/bench_marl.py
	$(PY) benchmarks/bench_executor.py

# Hyper-parameter search (docs/tuning.md), e.g. make tune TUNE_ARGS="--objective twin --n-trials 40"
tune: $(STAMP)
	$(VENV)/bin/dntsync tune $(TUNE_ARGS)

# A local PostgreSQL for shared studies and the tests; prints its URL (needs root for apt).
postgres:
	scripts/postgres.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
