# mpitp: common tasks. Every mpirun runs under `timeout`, so a hung job cannot outlive its target.
# Variables can be overridden: make run NP=4 ARGS="--dtype float64 --json"
PYTHON ?= python3
VENV ?= .venv
NP ?= 2
MPIRUN ?= mpirun
MPIFLAGS ?=
TIMEOUT ?= 900
EXTRAS ?= mpich,threads,text,test
ARGS ?=
PRESET ?= gpt2-124m
MODEL ?=
BENCH_ARGS ?=
BENCH_OUT ?= bench/results
MAX_NP ?= $(shell nproc 2>/dev/null || echo 2)
BENCH_MODEL = $(if $(MODEL),--model $(MODEL),--preset $(PRESET))
BENCH_NAME = $(if $(MODEL),$(notdir $(patsubst %/,%,$(MODEL))),$(PRESET))
# MPICH: force TCP sockets between ranks on one machine. Open MPI: make bench-tcp TCP_ENV= MPIFLAGS="--mca pml ob1 --mca btl tcp,self"
TCP_ENV ?= MPIR_CVAR_NOLOCAL=1 MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp

BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: install run test test-mpi test-tcp test-cluster fuzz ci bench bench-scaling bench-tcp clean

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

# The suite on NP ranks with MPI forced onto TCP sockets (a stand-in for ranks on different nodes).
test-tcp: install
	env $(TCP_ENV) timeout $(TIMEOUT) $(MPIRUN) $(MPIFLAGS) -n $(NP) pytest

# The MPI suite across 2 emulated nodes (network namespaces on a bridge, each with its own host name, TCP
# between them; scripts/cluster.sh): 2 nodes x 1 rank and 2 x 2, then every command-line and fault test with
# its ranks spread over the nodes. Needs root and iproute2; leaves no namespace, link or process behind.
test-cluster: install
	timeout $(TIMEOUT) scripts/cluster.sh run 2 1 -- env MPITP_RANKS_PER_NODE=1 pytest tests/test_mpi.py
	timeout $(TIMEOUT) scripts/cluster.sh run 2 2 -- env MPITP_RANKS_PER_NODE=2 pytest tests/test_mpi.py
	MPITP_CLUSTER_NODES=2 timeout $(TIMEOUT) pytest tests/test_faults.py tests/test_cli.py

# The checkpoint-reader fuzz tests with 10,000 generated files and 10,000 generated indexes (CI runs 300).
fuzz: install
	MPITP_FUZZ_EXAMPLES=10000 timeout $(TIMEOUT) pytest tests/test_fuzz.py

# What CI runs: make test; the suite on 3, 4 and 8 ranks (8 oversubscribes; the test models are tiny), over
# TCP and across emulated nodes; then every bench target once on the tiny preset, to prove they run end to end.
SMOKE = PRESET=tiny BENCH_OUT=$(BENCH_OUT)/smoke BENCH_ARGS="-r 2 -p 16 -n 8 --roofline-mib 16"
ci: test
	$(MAKE) test-mpi NP=3
	$(MAKE) test-mpi NP=4
	$(MAKE) test-mpi NP=8
	$(MAKE) test-tcp NP=2
	$(MAKE) test-cluster
	$(MAKE) bench $(SMOKE)
	$(MAKE) bench-tcp $(SMOKE)
	$(MAKE) bench-scaling MAX_NP=2 $(SMOKE)

# The benchmark on NP ranks: table, per-token breakdown, roofline, batch 1..64 against its ceilings; JSON and
# the batch plot (if matplotlib is installed) in $(BENCH_OUT)/.
bench: install
	timeout $(TIMEOUT) $(MPIRUN) $(MPIFLAGS) -n $(NP) python -m bench $(BENCH_MODEL) \
		--json-out $(BENCH_OUT)/bench-$(BENCH_NAME)-np$(NP).json \
		--batch-plot $(BENCH_OUT)/batch-$(BENCH_NAME)-np$(NP).png $(BENCH_ARGS)

# The benchmark at 1..MAX_NP ranks, 1 BLAS thread each; speedup/efficiency table and PNG plots (scaling, batch).
bench-scaling: install
	$(BIN)/python -m pip install --quiet -e ".[plot]"
	for n in $$(seq 1 $(MAX_NP)); do \
		timeout $(TIMEOUT) $(MPIRUN) $(MPIFLAGS) -n $$n python -m bench $(BENCH_MODEL) --threads 1 \
			--json-out $(BENCH_OUT)/scaling-$(BENCH_NAME)-np$$n.json $(BENCH_ARGS) || exit 1; done
	python -m bench --summarize $$(seq -f "$(BENCH_OUT)/scaling-$(BENCH_NAME)-np%g.json" 1 $(MAX_NP)) \
		--plot $(BENCH_OUT)/scaling-$(BENCH_NAME).png --batch-plot $(BENCH_OUT)/scaling-batch-$(BENCH_NAME).png

# The benchmark with MPI forced onto TCP on this machine (a stand-in for a network), with an OSU-style
# Allreduce latency table at the model's message sizes.
bench-tcp: install
	env $(TCP_ENV) timeout $(TIMEOUT) $(MPIRUN) $(MPIFLAGS) -n $(NP) python -m bench $(BENCH_MODEL) --osu \
		--json-out $(BENCH_OUT)/bench-tcp-$(BENCH_NAME)-np$(NP).json $(BENCH_ARGS)

# Remove the virtual environment and build leftovers.
clean:
	rm -rf $(VENV) build dist *.egg-info
