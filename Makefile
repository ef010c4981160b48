# gptforge: `make demo` and `make test` work on a fresh machine (they install first).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONWARNINGS := ignore::UserWarning

.PHONY: install test demo bench clean slurm-up slurm-down

install: $(STAMP)

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

demo: install
	bash scripts/demo.sh

bench: install
	$(PY) bench/bench_train.py

# A two-node Slurm on this host (root; installs slurm and munge if absent): try jobs locally.
slurm-up:
	bash slurm/local_cluster.sh up

slurm-down:
	bash slurm/local_cluster.sh down

clean:
	rm -rf runs build *.egg-info
