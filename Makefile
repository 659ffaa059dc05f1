# mpitp: common tasks. Every mpirun runs under `timeout`, so a hung job cannot outlive its target.
# Variables can be overridden: make run NP=4 ARGS="--dtype float64 --json"
PYTHON ?= python3
VENV ?= .venv
NP ?= 2
MPIRUN ?= mpirun
MPIFLAGS ?=
TIMEOUT ?= 900
EXTRAS ?= mpich,test
ARGS ?=

BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: install run test test-mpi ci clean

# Create $(VENV) and install mpitp into it, with an MPI from PyPI (MPICH) and the test tools.
# On a cluster use the site MPI instead: make install EXTRAS=test (after building mpi4py, see README).
install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

# Generate with the default model on NP ranks.
run: install
	timeout $(TIMEOUT) $(MPIRUN) $(MPIFLAGS) -n $(NP) python -m mpitp.generate $(ARGS)

# The serial suite, then the same suite as `mpirun -n 2 pytest` (which runs the MPI tests).
test: install
	timeout $(TIMEOUT) pytest
	timeout $(TIMEOUT) $(MPIRUN) $(MPIFLAGS) -n 2 pytest

# The suite on NP ranks (e.g. make test-mpi NP=4).
test-mpi: install
	timeout $(TIMEOUT) $(MPIRUN) $(MPIFLAGS) -n $(NP) pytest

# What CI runs: make test, then the suite on 3, 4 and 8 ranks (8 oversubscribes; the test models are tiny).
ci: test
	$(MAKE) test-mpi NP=3
	$(MAKE) test-mpi NP=4
	$(MAKE) test-mpi NP=8

# Remove the virtual environment and build leftovers.
clean:
	rm -rf $(VENV) build dist *.egg-info
