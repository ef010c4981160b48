# gptforge: `make demo` and `make test` work on a fresh machine (they install first).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONWARNINGS := ignore::UserWarning

.PHONY: install test quick demo bench gpu-wheels clean slurm-up slurm-down

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

# The quick pass: no test that starts ranks (those are marked slow); under 2 minutes on 2 cores.
quick: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow" tests

demo: install
	bash scripts/demo.sh

bench: install
	$(PY) bench/bench_train.py

# The wheels the lent GPU machine lacks (it has torch, Python 3.12, no network): carried with the
# working tree as .gpu_wheels; bench/on_gpu.sh installs them there (see docs/PERFORMANCE.md).
GPU_PYTHON ?= 3.12
gpu-wheels: install
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu_wheels \
	  megatron-core==0.16.1 webdataset==$$($(PY) -c 'import importlib.metadata as m; print(m.version("webdataset"))') \
	  braceexpand

# A two-node Slurm on this host (root; installs slurm and munge if absent): try jobs locally.
slurm-up:
	bash slurm/local_cluster.sh up

slurm-down:
	bash slurm/local_cluster.sh down

clean:
	rm -rf runs build *.egg-info
