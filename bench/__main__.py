"""The benchmark: ``mpirun -n P python -m bench`` from a clone's root (what ``make bench`` runs).

Prefill (pp) and generation (tg) tokens/s in llama-bench's table shape, where a decode token's time goes (the
wait for the slowest rank apart from the collectives), the Allreduce traffic against the model's shape, each
rank's weights, a roofline and the link between the ranks measured in the same run, and decode projected from
compute and the link; then batched generation at several batch sizes in llama-batched-bench's columns, each
against its ceiling; warnings when the machine was busy, repeats disagree or a figure passes its ceiling.
"""

import json
import os
import sys
from types import SimpleNamespace

import numpy as np

from mpitp import comm as mpi
from mpitp.comm import TimedComm
from mpitp.config import config_from_dict
from mpitp.cli.runner import (HelpFormatter, add_pp_layers, check_stdout, check_threads, check_writable, disagree,
                              failed_vote, out, replace_file, run_command, say, stage_count)
from mpitp.errors import MpitpError
from mpitp.resources import check_fits
from mpitp.model import DTYPES, FINGERPRINTED, Model
from mpitp.sharding import check_rank_count, shard_for
from mpitp.stages import StageGroup, check_stage_count, layer_counts, place, stage_layers
from mpitp.resources import set_blas_threads
from mpitp.weights import shard_bytes
from mpitp.wire import FORMATS

from . import PROG, BenchParser
from . import ceilings as ce
from .cluster import print_cluster_table
from .environment import environment, machine_state
from .models import PRESETS, random_model
from .plots import save_batch_plot
from .record import run_record, table_rows
from .stages import format_stages, run_stages, stage_model
from .report import (find_warnings, format_batch, format_long, format_osu, format_report, format_table,
                     format_warnings)
from .summary import summarize
from .timing import (batch_breakdown, batch_run, decode_breakdown, decode_run, long_run, measure_fixed_cost,
                     prefill_breakdown, rss_bytes, run_prefill)


def build_parser():
    p = BenchParser(prog="python -m bench",
                   description="Benchmark tensor-parallel prefill (pp) and generation (tg) on the MPI ranks, "
                               "with a per-token time breakdown and a roofline measured in the same run. Without "
                               "--model it builds a random-weight model of a preset's shapes, each rank only its "
                               "shard. Timings are wall clock between barriers, the slowest rank's.",
                   formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpt2-124m",
                   help="random-weight model with these real shapes (ignored with --model)")
    p.add_argument("--model", metavar="DIR", help="benchmark a Hugging Face checkpoint folder instead")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype")
    p.add_argument("--comm-dtype", choices=sorted(FORMATS), default=None,
                   help="what the block's partial sums cross the wire as (docs/sync-precision.md); default: --dtype")
    p.add_argument("-p", "--n-prompt", type=int, default=128, help="prompt tokens for the pp test")
    p.add_argument("-n", "--n-gen", type=int, default=64, help="generated tokens for the tg test")
    p.add_argument("-r", "--repeats", type=int, default=5, help="timed repetitions of each test (after a warm-up)")
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS threads per rank (default: cores on the node / ranks on the node)")
    p.add_argument("--osu", action="store_true", help="also print an OSU-style Allreduce latency table")
    p.add_argument("--roofline-mib", type=int, default=256,
                   help="size of the array read to measure DRAM bandwidth; keep it well above the caches")
    p.add_argument("--json-out", metavar="PATH", help="write the full JSON record (results and environment) here")
    p.add_argument("--batch", default="1,2,4,8,16,32,64", metavar="LIST",
                   help="batch sizes of the batched generation test, comma-separated; 'none' skips the test")
    p.add_argument("--batch-prompt", type=int, default=64, metavar="N", help="prompt tokens of each sequence "
                   "in the batch test")
    p.add_argument("--batch-gen", type=int, default=32, metavar="N", help="new tokens of each sequence in the "
                   "batch test (the first comes from the prefill)")
    p.add_argument("--batch-repeats", type=int, default=1, metavar="N",
                   help="timed runs of each batch size (after one warm-up run at the smallest)")
    p.add_argument("--batch-plot", metavar="PNG", help="save aggregate decode tokens/s and its ceiling against "
                   "batch size here (needs matplotlib); with --summarize, of every record")
    p.add_argument("--long", type=int, default=None, metavar="N",
                   help="instead of pp/tg: generate N tokens in one sequence and report time per token along the "
                        "run and memory growth after the KV cache was allocated")
    p.add_argument("--summarize", nargs="+", metavar="JSON",
                   help="no benchmark: print speedup and efficiency of these JSON records (e.g. one per rank count)")
    p.add_argument("--plot", metavar="PNG", help="with --summarize: also save a scaling plot here (needs matplotlib)")
    p.add_argument("--cluster-table", nargs="+", metavar="JSON",
                   help="no benchmark: print decode measured and projected against the link of these JSON records "
                        "(one per link rate: make bench-cluster)")
    p.add_argument("--pp", type=int, default=1, metavar="S",
                   help="instead of the tensor-parallel tests: the batch test (--batch, --batch-prompt, --batch-gen, "
                        "--batch-repeats) through S pipeline stages of (ranks / S) ranks each, with the bubble")
    add_pp_layers(p)
    p.add_argument("--verbose", action="store_true", help="print full tracebacks for errors")
    return p


def main(argv=None):
    """Entry point; returns the process exit status (0 ok, 2 bad input, 1 unexpected error)."""
    return run_command(build_parser, _dispatch, PROG, argv)


def _dispatch(args, comm, node_ranks):
    if args.summarize or args.cluster_table:
        return _tables(args) if comm.Get_rank() == 0 else 0
    args.pp = stage_count(args)  # as in generate
    return _run(args, comm, node_ranks) if args.pp == 1 else _run_stages(args, comm, node_ranks)


def _run_stages(args, comm, node_ranks):
    """``--pp S``: the batch test through S pipeline stages (bench/stages.py), after the same vote and agreement."""
    error = config = None
    try:
        if args.model or args.long or args.osu or args.batch_plot:
            raise MpitpError("--pp runs the batch test of a preset: leave out --model, --long, --osu and "
                             "--batch-plot.")
        check_threads(args.threads)
        config = config_from_dict(PRESETS[args.preset], f"preset {args.preset}")
        check_stage_count(comm.Get_size(), args.pp)
        tp = comm.Get_size() // args.pp
        check_rank_count(config, tp, args.pp)
        group = StageGroup(index=comm.Get_rank() // tp, count=args.pp, tp=tp, pipe=None)  # before the Split
        stage = place(group, layer_counts(config, group, args.pp_layers))  # more stages than layers, counts that lie
        if comm.Get_rank() == 0:
            check_outputs((("--json-out", args.json_out),))
        args.batches = parse_batches(args.batch) or [1]
        _check_batch_sizes(args)
        dtype, shard = DTYPES[args.dtype], shard_for(config, comm.Get_rank() % tp, tp)
        _check_batch_memory(args, config, shard, dtype, shard_bytes(config, shard, dtype, stage), node_ranks, stage)
    except MpitpError as e:
        error = e
    facts = [(f"--{k.replace('_', '-')}", v) for k, v in sorted(vars(args).items()) if k not in PER_RANK]
    if failed_vote(comm, error, PROG) or disagree(comm, facts, PROG):
        return 2
    threads, warning = set_blas_threads(args.threads, node_ranks)
    screen = Screen(comm.Get_rank())
    if warning:
        screen.progress(warning)
    model = stage_model(config, comm, DTYPES[args.dtype], args.pp, args.pp_layers, args.comm_dtype)
    rec = run_stages(args, comm, model, f"{args.preset} (random)", threads, args.batches, screen.progress)
    screen.show(format_stages(rec))
    return _output(args, comm, rec, screen)


def _tables(args):
    """``--summarize`` and ``--cluster-table``: no benchmark, on rank 0; the plots' files checked first."""
    check_outputs((("--plot", args.plot), ("--batch-plot", args.batch_plot)))
    if args.cluster_table:
        return print_cluster_table(args.cluster_table)
    return summarize(args.summarize, args.plot, args.batch_plot)


def check_outputs(options):
    """On rank 0, before any work: stdout is open (the report goes there), and ``check_writable`` for each
    ``(option, path)`` given."""
    check_stdout()
    for option, path in options:
        if path is not None:
            check_writable(path, f"{option} {path}".strip())


PER_RANK = {"threads", "json_out", "batch_plot", "verbose", "plot", "model"}  # may differ (the model: by content)


def _validate(args, comm, tc, node_ranks):
    """Every check bad input can fail, on every rank, without communicating: ``(model or None, config, name)``."""
    check_threads(args.threads)
    if min(args.n_prompt, args.n_gen, args.repeats, args.roofline_mib) < 1:
        raise MpitpError("--n-prompt, --n-gen, --repeats and --roofline-mib must be >= 1.")
    check_fits(2 * args.roofline_mib << 20, f"--roofline-mib {args.roofline_mib} (the probe's matrix, twice)",
               "give a smaller --roofline-mib", node_ranks)
    if args.long is not None and args.long < 10:
        raise MpitpError(f"--long must be >= 10 (its report is by tenth of the run), got {args.long}.")
    if comm.Get_rank() == 0:  # rank 0 writes them
        check_outputs((("--json-out", args.json_out), ("--batch-plot", args.batch_plot)))
    args.batches = parse_batches(args.batch) if args.long is None else []
    if args.batches:
        _check_batch_sizes(args)
    model = None
    if args.model:
        model = Model.load(args.model, tc, args.dtype, node_ranks=node_ranks, comm_dtype=args.comm_dtype)
        config, shard, name = model.config, model.shard, os.path.basename(os.path.normpath(args.model))
    else:
        config, name = config_from_dict(PRESETS[args.preset], f"preset {args.preset}"), f"{args.preset} (random)"
        shard = shard_for(config, comm.Get_rank(), comm.Get_size())  # refuses a bad rank count
        check_fits(shard_bytes(config, shard, DTYPES[args.dtype]), f"this rank's shard of {name}",
                   "use more ranks, on more nodes", node_ranks)
    if args.pp_layers:  # one stage (--pp-layers N): the usual bench, once N is the model's layers
        stage_layers(config.n_layer, 1, 1, 0, 0, args.pp_layers)
    # a decode test is a 1-token prompt and n_gen + 1 generated tokens (the first comes from the prompt's forward)
    if max(args.n_prompt, args.n_gen + 2, (args.long or 0) + 2) > config.n_ctx:
        raise MpitpError(f"--n-prompt must be at most {config.n_ctx} and --n-gen/--long at most {config.n_ctx - 2}: "
                         f"the model's context is {config.n_ctx} positions.")
    if args.batches:
        dtype = model.dtype if model is not None else DTYPES[args.dtype]
        _check_batch_memory(args, config, shard, dtype, 0 if model is not None else shard_bytes(config, shard, dtype),
                            node_ranks)
    return model, config, name


def _check_batch_sizes(args):
    if args.batch_prompt < 1 or args.batch_gen < 2 or args.batch_repeats < 1:
        raise MpitpError("--batch-prompt and --batch-repeats must be >= 1 and --batch-gen >= 2 (a decode step "
                         "follows the prefill's token).")


def _check_batch_memory(args, config, shard, dtype, weight_bytes, node_ranks, stage=None):
    """The batch test's prompts and new tokens against the context, and this rank's KV cache for the largest batch
    (of its ``stage``'s layers, with --pp) next to ``weight_bytes`` of weights not loaded yet."""
    if args.batch_prompt + args.batch_gen > config.n_ctx:
        raise MpitpError(f"--batch-prompt plus --batch-gen must be at most the model's context of "
                         f"{config.n_ctx} positions, got {args.batch_prompt} + {args.batch_gen}.")
    # The largest batch's cache, counted by the model's own method before the model exists (the bench
    # allocates it with new_batch_cache, which checks it again).
    n, capacity = max(args.batches), args.batch_prompt + args.batch_gen - 1
    kv = Model.cache_bytes(SimpleNamespace(config=config, shard=shard, dtype=dtype, stage=stage), capacity, n)
    check_fits(kv + weight_bytes, f"this rank's {'shard of the model and its ' if weight_bytes else ''}KV cache for "
               f"--batch {n} ({n} x {capacity} positions)",
               "use smaller --batch sizes, a shorter --batch-prompt or --batch-gen, or more ranks or nodes",
               node_ranks)


def parse_batches(text):
    """``--batch``: "1,2,4" -> [1, 2, 4] (sorted, each once); "none" -> []."""
    if text.strip().lower() == "none":
        return []
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise MpitpError(f"--batch must be batch sizes >= 1, comma-separated (e.g. 1,2,4), or none; got {text!r}.")
    return sorted(set(sizes))


def batch_test(model, sizes, n_prompt, n_gen, repeats, read_rate, rng, progress=None, itemsize=None):
    """The batched generation test: per batch size, ``repeats`` runs of ``generate_batch`` on that many random
    prompts, each right after ``read_rate()`` (the DRAM read rate, bytes/s) was measured, against the ceiling
    at that rate and at the GEMM rate of that batch's products, and against its projection from an instrumented
    run and the link (``ceilings.project_batch``; ``itemsize``: bytes per value on the wire). One warm-up run at
    the smallest size first. Returns the record's "batch" list (``ceilings.batch_record`` per size);
    ``progress(line)`` names each size."""
    n_kv = n_prompt + n_gen // 2  # positions each sequence's attention sees, on average over the decode steps
    flops = ce.decode_flops(model, n_kv)
    out = []
    for i, b in enumerate(sizes):
        if progress is not None:
            progress(f"batch {b} ({i + 1} of {len(sizes)} sizes, {repeats} run(s) each)")
        prompts = [rng.integers(0, model.config.n_vocab, n_prompt) for _ in range(b)]  # the same on every rank
        if not out:
            batch_run(model, prompts, n_gen)
        gemm = ce.measure_gemm_rate(model, b)
        bd = batch_breakdown(model, prompts, n_gen)
        link = ce.measure_link(model.comm, model.dtype, round(b * model.config.n_embd * (
            itemsize or np.dtype(model.dtype).itemsize)), round(bd["calls"] / bd["steps"]))
        rates, runs = [], []
        for _ in range(repeats):
            rates.append(read_rate())
            runs.append(batch_run(model, prompts, n_gen))
        products = {way: ce.measure_decode_products(model, n_rows=b, way=way) for way in ce.product_ways(b)}
        out.append(ce.batch_record(b, n_prompt, n_gen, runs, rates, ce.decode_read_bytes(model, n_kv, b), flops,
                                   gemm, products, model.cache_bytes(n_kv, b)))
        projection = out[-1]["projection"] = ce.project_batch(bd, link, b)
        projection["error_percent"] = 100 * (projection["tokens_per_s"] / out[-1]["decode_tokens_per_s"] - 1)
    return out


class Screen:
    """Rank 0's output while the bench runs: each section of the report on stdout as soon as it is known, flushed
    (through the launcher's pipe stdout is block-buffered: the whole report would come at the end), and a
    progress line on stderr before each slow phase. The other ranks print nothing."""

    def __init__(self, rank):
        self.rank, self.blank = rank, ""

    def show(self, *sections):
        text = "\n\n".join(s for s in sections if s)
        if self.rank == 0 and text:
            out(self.blank + text)
            self.blank = "\n"  # sections apart by one empty line

    def progress(self, line):
        if self.rank == 0:
            say(f"{PROG}: {line} ...")


def _run(args, comm, node_ranks):
    start = machine_state()  # load average and CPU time counters: how busy the machine was during the run
    rss_start = rss_bytes()  # the interpreter, NumPy and MPI, before any model memory
    ready = _prepare(args, comm, node_ranks)
    if isinstance(ready, int):
        return ready
    model, name, threads = ready
    screen, rng = Screen(comm.Get_rank()), np.random.default_rng(0)
    if args.long:
        screen.progress(f"generating {args.long} tokens in one sequence")
        rec = long_run(model, args.long)
        rec.update(model=name, ranks=comm.Get_size(), threads=threads, dtype=np.dtype(model.dtype).name,
                   environment=environment(comm, threads, start))
        rec["warnings"] = find_warnings(rec)
        screen.show(format_long(rec), format_warnings(rec["warnings"]))
        return _output(args, comm, rec, screen)
    before = _before_timed(args, comm, model, rss_start, rng, screen)
    probe = ce.BandwidthProbe(comm, model.dtype, args.roofline_mib << 20)  # after the memory was measured
    rec = run_record(args, comm, model, name, threads, dict(before, **_timed(args, comm, model, probe, rng, screen)))
    screen.show(format_table(table_rows(rec)), format_report(rec))
    rec["batch"] = batch_test(model, args.batches, args.batch_prompt, args.batch_gen, args.batch_repeats,
                              probe.measure, rng, screen.progress, wire_itemsize(args, model))
    probe = None  # its matrix is freed before the rest is measured
    screen.show(format_batch(rec) if rec["batch"] else "")
    if args.osu:
        screen.progress("Allreduce latency (OSU-style)")
        message = model.config.n_embd * np.dtype(model.dtype).itemsize  # a decode token's; a prefill's: n_prompt x
        sizes = sorted({4 << i for i in range(0, 21, 2)} | {message, args.n_prompt * message})
        rec["allreduce_latency_us"] = ce.allreduce_latency(comm, sizes, model.dtype)
        screen.show(format_osu(rec["allreduce_latency_us"], model.dtype))
    rec["environment"] = environment(comm, threads, start)
    rec["warnings"] = find_warnings(rec)
    screen.show(format_warnings(rec["warnings"]))
    return _output(args, comm, rec, screen)


def _prepare(args, comm, node_ranks):
    """Validation, the vote on it and the ranks' agreement, the BLAS threads, the model (built if a preset):
    ``(model, name, threads)``, or the exit status when the run must not go on."""
    tc = TimedComm(comm)  # the model runs on it: its Allreduce calls are timed and counted
    error = model = None
    try:
        model, config, name = _validate(args, comm, tc, node_ranks)
    except MpitpError as e:
        error = e
    if failed_vote(comm, error, PROG):
        return 2
    facts = [(f"--{k.replace('_', '-')}", v) for k, v in sorted(vars(args).items()) if k not in PER_RANK]
    if disagree(comm, facts + ([(FINGERPRINTED, model.fingerprint)] if model is not None else []), PROG):
        return 2
    threads, warning = set_blas_threads(args.threads, node_ranks)
    if warning and comm.Get_rank() == 0:
        say(f"{PROG}: {warning}")
    if model is None:
        model = random_model(config, tc, DTYPES[args.dtype]).sync_in(args.comm_dtype)
    return model, name, threads


def _before_timed(args, comm, model, rss_start, rng, screen):
    """What the record needs from before the timed tests: a warm-up (a whole decode run: its cache is the largest),
    one instrumented prefill (its breakdown), each rank's memory and weights, the link between the ranks and the
    fixed cost of a token."""
    screen.progress("warm-up, an instrumented prefill, the link between the ranks and the fixed cost")
    run_prefill(model, args.n_prompt, 1, rng)
    decode_run(model, args.n_gen)
    prefill_bd = prefill_breakdown(model, args.n_prompt)
    # Memory: the peak so far covers loading, the caches and the activations of both tests (measured before the
    # bandwidth probe's array and the fixed cost's model exist: those are the bench's instruments, not the model).
    kv_bytes = model.cache_bytes(max(args.n_prompt, args.n_gen + 1))
    memory = {"rss_start_bytes": rss_start, "peak_rss_bytes": rss_bytes("VmHWM"), "weight_bytes": model.weight_bytes,
              "kv_cache_bytes": kv_bytes}
    memory["peak_growth_over_weights_and_cache"] = (
        (memory["peak_rss_bytes"] - rss_start) / (model.weight_bytes + kv_bytes) if rss_start else None)
    cfg = model.config
    # The link between the ranks: its sustained rate, and a decode token's collectives on it when idle.
    # (with --comm-dtype: an Allreduce of as many bytes as a block's encoded row: the same bytes on the wire)
    link = ce.measure_link(comm, model.dtype, round(cfg.n_embd * wire_itemsize(args, model)), ce.allreduce_calls(cfg))
    return {"prefill_bd": prefill_bd, "memory": comm.allgather(memory), "weights": comm.allgather(model.weight_bytes),
            "link": link, "fixed_s": measure_fixed_cost(cfg, comm, model.dtype, args.n_gen),
            "wire_itemsize": wire_itemsize(args, model)}


def wire_itemsize(args, model):
    """Bytes per value of the block's reductions on the wire: the model's itemsize, or --comm-dtype's."""
    fmt = FORMATS.get(args.comm_dtype or np.dtype(model.dtype).name)
    return fmt.block_bytes / fmt.block if fmt else np.dtype(model.dtype).itemsize


def _timed(args, comm, model, probe, rng, screen):
    """The timed tests. Each repeat runs right after a measurement of the DRAM read bandwidth on the same ranks and
    threads (``probe``), and is compared with that ceiling; each prefill also right after the GEMM rate of its own
    products, each decode repeat right after an instrumented decode run (the breakdown, the wait apart from the
    collectives, the projection's compute) and the decode products alone."""
    screen.progress(f"pp{args.n_prompt} and tg{args.n_gen}, {args.repeats} repeats each, every one after its "
                    f"ceilings were measured")
    t = {k: [] for k in ("pp_bw", "pp_gemm", "tg_bw", "tg", "products", "decode_bds")}

    def before_prefill():
        t["pp_bw"].append(probe.measure())
        t["pp_gemm"].append(ce.measure_gemm_rate(model, args.n_prompt, n_kv=args.n_prompt))

    t["pp"] = run_prefill(model, args.n_prompt, args.repeats, rng, before=before_prefill)
    for _ in range(args.repeats):
        t["tg_bw"].append(probe.measure())
        t["products"].append(ce.measure_decode_products(model))
        t["decode_bds"].append(decode_breakdown(model, args.n_gen))
        t["tg"].append(args.n_gen / mpi.max_over_ranks(comm, decode_run(model, args.n_gen)))
    return t


def _output(args, comm, rec, screen):
    """Write the JSON record and the batch plot on rank 0, each whole or not at all, and say where; a file that
    cannot be written is one line and status 2 on every rank."""
    error, lines = None, []
    if comm.Get_rank() == 0:
        try:
            if args.json_out:
                replace_file(args.json_out, lambda f: f.write(json.dumps(rec, indent=1).encode()),
                             f"--json-out {args.json_out}")
                lines.append(f"JSON record: {args.json_out}")
            if args.batch_plot:
                lines.append(save_batch_plot([rec], args.batch_plot))
        except MpitpError as e:
            error = e
    screen.show("\n".join(lines))
    return failed_vote(comm, error, PROG) or 0


if __name__ == "__main__":
    sys.exit(main())
