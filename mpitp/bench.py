"""The benchmark: ``mpirun -n P python -m mpitp.bench`` (what ``make bench`` runs).

Prompt processing (``pp``) and generation (``tg``) tokens/s in llama-bench's table shape, where a decode
token's time goes (matmul, attention, Allreduce, the rest), the Allreduce bytes measured against what the
model's shape predicts, and a roofline measured on this machine in the same run: DRAM read bandwidth per
rank (decode reads every weight once per token) and the GEMM rate at the model's own prefill shapes.
Without ``--model`` it builds a random-weight model with the shapes of a preset, each rank only its shard.
Timings are wall clock between barriers, the slowest rank's.
"""

import dataclasses
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time

import numpy as np

from . import __version__
from . import comm as mpi
from .arena import Arena
from .config import config_from_dict
from .entry import HelpFormatter, RankParser, failed_vote, run_guarded
from .errors import MpitpError
from .generation import generate_sequence
from .memory import rss_bytes
from .model import DTYPES, Model
from .profile import CATEGORIES, Profile
from .sampling import Sampler
from .sharding import shard_for
from .threads import apply_blas_threads, blas_description, choose_threads, missing_threadpoolctl_warning
from .weights import allocate_weights

# Real model shapes, as Hugging Face config.json dicts.
PRESETS = {
    "gpt2-124m": {"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
                  "vocab_size": 50257},
    "gpt2-355m": {"model_type": "gpt2", "n_embd": 1024, "n_head": 16, "n_layer": 24, "n_positions": 1024,
                  "vocab_size": 50257},
    "llama-1b": {"model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 64, "num_hidden_layers": 16, "intermediate_size": 8192, "vocab_size": 128256,
                 "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                 "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}},
    "qwen2-0.5b": {"model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
                   "num_hidden_layers": 24, "intermediate_size": 4864, "vocab_size": 151936,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "tie_word_embeddings": True},
    "tiny": {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 128,
             "vocab_size": 256},
}

# Interconnects for the projection: (name, latency alpha in s, bandwidth beta in bytes/s). Typical published
# figures, not measurements: they only show how the measured compute and message volume would fare.
INTERCONNECTS = [
    ("10 GbE TCP", 25e-6, 1.25e9),
    ("100 Gb/s InfiniBand EDR", 1.5e-6, 12.5e9),
    ("200 Gb/s InfiniBand HDR", 1.0e-6, 25e9),
]


# --- model construction -------------------------------------------------------------------------------

def random_model(config, comm, dtype, seed=0, vocab_parallel=True):
    """A ``Model`` with random weights of ``config``'s shapes; each rank creates only its own shard, in the
    same memory layout as a loaded checkpoint."""
    rank, size = comm.Get_rank(), comm.Get_size()
    shard = shard_for(config, rank, size, vocab_parallel)
    rng = np.random.default_rng([seed, rank])

    def fill(field, layer, parts, out):
        if field.startswith("norm") and field.endswith("weight"):
            out.fill(1)
        elif field.startswith(("b_", "norm")):
            out.fill(0)
        else:  # matrices: N(0, 0.02^2) as GPT-2 initialises them, the learned positions half that
            for row in out:  # row by row: the LM head is a view with padded rows, and no temporary copy
                rng.standard_normal(out=row, dtype=out.dtype)
                row *= 0.01 if field == "W_pos" else 0.02

    blocks, glob = allocate_weights(config, shard, dtype, fill)
    return Model(config, shard, blocks, glob, comm, dtype)


def fixed_cost_config(config, size):
    """``config`` shrunk until every weight stays in cache (d_head 4, width 4 x heads, a small MLP and
    vocabulary), with the same family, depth and heads, for ``size`` ranks: its decode makes exactly the same
    calls as the real model's, so its time per token is the floor that Python, NumPy dispatch and Allreduce
    latency set."""
    width = 4 * config.n_head
    return dataclasses.replace(config, n_embd=width, d_head=4, n_ffn=max(width, size), n_vocab=max(512, size))


def measure_fixed_cost(config, comm, dtype, n_gen, vocab_parallel=True, repeats=3):
    """Seconds per decode token of ``fixed_cost_config(config)`` on ``comm`` (best of ``repeats``, slowest rank),
    with the embedding and LM head split or replicated as in the real run."""
    model = random_model(fixed_cost_config(config, comm.Get_size()), comm, dtype, vocab_parallel=vocab_parallel)
    decode_run(model, min(4, n_gen))
    return min(mpi.max_over_ranks(comm, decode_run(model, n_gen)) for _ in range(repeats)) / n_gen


# --- what the model's shape predicts (pure arithmetic, unit-tested) -----------------------------------

def allreduce_payload_bytes(config, n_seq, itemsize, vocab_parallel):
    """Bytes one rank hands to Allreduce in one forward of ``n_seq`` tokens: two [n_seq, n_embd] messages
    per block, and one more for a vocab-parallel embedding."""
    return (2 * config.n_layer + (1 if vocab_parallel else 0)) * n_seq * config.n_embd * itemsize


def ring_wire_bytes(payload, size):
    """Bytes each rank sends (and receives) for a ring Allreduce of ``payload`` bytes over ``size`` ranks."""
    return 0 if size == 1 else 2 * (size - 1) / size * payload


def decode_read_bytes(model, n_kv):
    """Bytes one rank must read from memory per decode token with ``n_kv`` cached positions: every weight
    it holds once (of the embedding only one row, unless it doubles as the LM head), plus its KV cache."""
    g = model.globals
    arrays = [a for b in model.blocks for a in b.arrays()]
    arrays += [a for a in (g.norm_f_weight, g.norm_f_bias, g.W_head) if a is not None]
    return sum(a.nbytes for a in arrays) + model.cache_bytes(n_kv)


def prefill_flops(model, n_seq, include_head=True):
    """Floating-point operations one rank performs in a prefill of ``n_seq`` tokens (with its LM-head columns for
    the last position unless ``include_head`` is False)."""
    cfg, s = model.config, model.shard
    d, dh = cfg.n_embd, cfg.d_head
    q, kv, f = s.n_head_local * dh, s.n_kv_head_local * dh, s.n_ffn_local
    n_mlp_in = 2 if cfg.family == "llama" else 1
    per_token = 2 * (d * q + 2 * d * kv + q * d + n_mlp_in * d * f + f * d)
    # causal attention: Q K^T and P V, each 2 * d_head flops per (query, visible key) pair and head
    attention = 2 * 2 * dh * s.n_head_local * n_seq * (n_seq + 1) / 2
    return cfg.n_layer * (n_seq * per_token + attention) + (2 * d * s.n_vocab_local if include_head else 0)


def project_tokens_per_s(compute_s, n_messages, message_bytes, size, alpha, beta):
    """Decode tokens/s if each token took ``compute_s`` plus ``n_messages`` ring Allreduces of ``message_bytes``
    over a network with latency ``alpha`` and bandwidth ``beta`` (the standard alpha-beta model)."""
    if size == 1:
        return 1 / compute_s
    per_message = 2 * (size - 1) * alpha + ring_wire_bytes(message_bytes, size) / beta
    return 1 / (compute_s + n_messages * per_message)


def roofline(tg, tg_bw, decode_bytes, pp, pp_bw, n_prompt, flops_per_token, gemm, head_bytes):
    """Each repeat against the ceiling measured right before it: the record's "roofline" entry.

    ``tg``, ``pp``: tokens/s of each repeat; ``tg_bw``, ``pp_bw``: bytes/s one rank read just before each.
    Decode is bound by reading ``decode_bytes`` per token; a prefill of ``n_prompt`` tokens by its
    ``flops_per_token`` at ``gemm`` flop/s plus reading the LM head (``head_bytes``) once.
    """
    roof_decode = [bw / decode_bytes for bw in tg_bw]
    roof_prefill = [n_prompt / (n_prompt * flops_per_token / gemm + head_bytes / bw) for bw in pp_bw]
    return {"read_bandwidth_GBps": float(np.mean(tg_bw)) / 1e9,
            "read_bandwidth_GBps_per_repeat": {"pp": [b / 1e9 for b in pp_bw], "tg": [b / 1e9 for b in tg_bw]},
            "decode_bytes_per_token": decode_bytes,
            "decode_bound_tokens_per_s": float(np.mean(roof_decode)), "decode_tokens_per_s": float(np.mean(tg)),
            "decode_percent": 100 * float(np.mean(np.divide(tg, roof_decode))),
            "gemm_GFps": gemm / 1e9, "prefill_flops_per_token": flops_per_token,
            "prefill_lm_head_read_seconds": head_bytes / float(np.mean(pp_bw)),
            "prefill_bound_tokens_per_s": float(np.mean(roof_prefill)), "prefill_tokens_per_s": float(np.mean(pp)),
            "prefill_percent": 100 * float(np.mean(np.divide(pp, roof_prefill)))}


def mean_sd(values):
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


# --- measurements -------------------------------------------------------------------------------------

def _timed(comm, fn, repeats):
    """Run ``fn`` ``repeats`` times between barriers; the slowest rank's seconds for each run."""
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t = time.perf_counter()
        fn()
        times.append(mpi.max_over_ranks(comm, time.perf_counter() - t))
    return times


class BandwidthProbe:
    """Measures the bytes/s one rank reads from DRAM with decode's own operation, a vector times a matrix
    stored [in, out] (``x @ W``) in a huge-page ``Arena`` like the weights, all ranks of the node reading at
    once; the slowest rank's figure.

    The matrix (``nbytes``, well above the caches) is allocated once, so the bench can measure again right
    before every timed repeat: on a shared or virtual machine the memory speed drifts by tens of percent
    within a minute, and a ceiling measured at another moment says little about the run it is compared with.
    """

    def __init__(self, comm, dtype, nbytes=256 << 20):
        cols = 4096
        rows = max(1, nbytes // (cols * np.dtype(dtype).itemsize))
        self.comm = comm
        self.W = Arena(Arena.size_of([(rows, cols)], dtype)).take((rows, cols), dtype)
        self.W.fill(1)
        self.x = np.ones(rows, dtype)
        self.x @ self.W

    def measure(self, repeats=3):
        return self.W.nbytes / min(_timed(self.comm, lambda: self.x @ self.W, repeats))


def decode_matrices(model):
    """The matrices one decode token multiplies, in order: every block's W_QKV, W_B, W_C, W_D, then the LM head."""
    return [m for w in model.blocks for m in (w.W_QKV, w.W_B, w.W_C, w.W_D)] + [model.globals.W_head]


def measure_decode_products(model, repeats=3):
    """Seconds for decode's matrix products alone: one token through every block's W_QKV, W_B, W_C, W_D and
    the LM head of this rank's own weights, back to back, with nothing else (all ranks at once; the slowest
    rank's best). What NumPy and the BLAS reach at this model's shapes: the forward's floor."""
    pairs = [(np.ones(m.shape[0], model.dtype), m) for m in decode_matrices(model)]

    def run():
        for x, m in pairs:
            x @ m

    run()
    return min(_timed(model.comm, run, repeats))


def measure_gemm_rate(model, n_seq, repeats=5):
    """Flop/s one rank reaches on the matrix products of one block at ``n_seq`` tokens (all ranks at once)."""
    w = model.blocks[0]
    mats = [w.W_QKV, w.W_B, w.W_C, w.W_D]
    inputs = [np.ones((n_seq, m.shape[0]), model.dtype) for m in mats]

    def run():
        for x, m in zip(inputs, mats):
            x @ m

    run()
    t = min(_timed(model.comm, run, repeats))
    return sum(2 * n_seq * m.shape[0] * m.shape[1] for m in mats) / t


def run_prefill(model, n_prompt, repeats, rng, before=None):
    """Prefill tokens/s of ``repeats`` runs (the slowest rank's time each), with ``before()`` (untimed) ahead of
    each run. One cache serves every run: it is allocated beforehand and reset in between."""
    prompt = rng.integers(0, model.config.n_vocab, n_prompt)
    cache = model.new_cache(n_prompt)
    out = []
    for _ in range(repeats):
        cache.reset()
        if before is not None:
            before()
        out += [n_prompt / t for t in _timed(model.comm, lambda: model.forward(prompt, cache, gather=False), 1)]
    return out


def profiled_prefill(model, n_prompt, profile):
    """One prefill with ``profile``; returns this rank's seconds."""
    prompt = np.arange(n_prompt) % model.config.n_vocab
    cache = model.new_cache(n_prompt)
    model.comm.Barrier()
    t = time.perf_counter()
    model.forward(prompt, cache, profile=profile, gather=False)
    return time.perf_counter() - t


def slowest_breakdown(comm, own_seconds, profile):
    """``(seconds, {category: seconds})`` of the slowest rank; "other" is the rest of its own time."""
    parts = dict(profile.seconds)
    parts["other"] = own_seconds - sum(v for k, v in parts.items() if k != "other")
    return max(mpi.allgather(comm, (own_seconds, parts)), key=lambda r: r[0])


def decode_run(model, n_gen, profile=None, on_token=None):
    """Generate ``n_gen`` tokens greedily after a one-token prompt, with mpitp's own generation loop (rank 0
    decides and broadcasts each token); returns this rank's seconds for the ``n_gen`` decode forwards."""
    model.comm.Barrier()
    out = generate_sequence(model, [0], n_gen + 1, Sampler(), on_token=on_token, profile=profile)
    return out.timing.decode_seconds


def long_run(model, n_gen):
    """Generate ``n_gen`` tokens in one sequence: per-token seconds (the slowest rank's, per tenth of the
    run) and how much each rank's resident memory grew after its cache was allocated and the prompt ran."""
    stamps, rss = [], []

    def on_token(token):
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            rss.append(rss_bytes())

    decode_run(model, n_gen, on_token=on_token)
    grown = max(mpi.allgather(model.comm, (rss_bytes() - rss[0]) if rss[0] else 0))
    tenths = [float(np.mean(chunk)) for chunk in np.array_split(np.diff(stamps), 10)]
    return {"n_gen": n_gen, "seconds_per_token_by_tenth": [mpi.max_over_ranks(model.comm, t) for t in tenths],
            "rss_growth_bytes_after_cache": grown, "kv_cache_bytes": model.cache_bytes(n_gen + 1)}


def allreduce_latency(comm, sizes, dtype, iterations=200):
    """OSU-style: average microseconds of an in-place Allreduce per message size (bytes), slowest rank."""
    out = []
    for nbytes in sizes:
        buf = np.ones(max(1, nbytes // np.dtype(dtype).itemsize), dtype)
        for _ in range(10):
            mpi.allreduce_sum(comm, buf)
        comm.Barrier()
        t = time.perf_counter()
        for _ in range(iterations):
            mpi.allreduce_sum(comm, buf)
        out.append((buf.nbytes, mpi.max_over_ranks(comm, (time.perf_counter() - t) / iterations) * 1e6))
    return out


# --- environment and output ---------------------------------------------------------------------------

def environment(comm, threads):
    hosts = sorted(set(mpi.allgather(comm, socket.gethostname())))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    transport = {k: v for k, v in os.environ.items()
                 if k.startswith(("MPIR_CVAR_", "FI_", "UCX_", "OMPI_MCA_", "I_MPI_"))}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hosts": hosts, "ranks": comm.Get_size(), "ranks_on_node": mpi.ranks_on_node(comm),
            "threads_per_rank": threads, "mpi_library": mpi.library_version(), "transport_env": transport,
            "numpy": np.__version__, "blas": blas_description(), "python": platform.python_version(),
            "cpu": _cpu_name(), "mpitp": __version__, "git_revision": rev}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(rows):
    """llama-bench style markdown table from dicts with model, params, dtype, ranks, threads, test, mean, sd."""
    head = ["model", "params", "dtype", "ranks", "threads", "test", "t/s"]
    body = [[r["model"], f"{r['params'] / 1e6:.2f} M", r["dtype"], str(r["ranks"]), str(r["threads"]), r["test"],
             f"{r['mean']:.2f} ± {r['sd']:.2f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    right = {1, 3, 4, 6}

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(head), sep] + [line(b) for b in body])


def format_report(rec):
    """Everything after the table: breakdown, Allreduce bytes, roofline, projections."""
    out = []
    for what, key in (("decode, per token", "decode_breakdown_ms"), ("prefill, per prompt", "prefill_breakdown_ms")):
        b = rec[key]
        total = sum(b.values())
        parts = " | ".join(f"{k} {v:.3f} ms ({100 * v / total:.0f}%)" for k, v in b.items())
        out.append(f"{what} (slowest rank): {parts} | total {total:.3f} ms")
    hd = rec["lm_head"]
    out.append(f"LM head: {'vocab-parallel' if hd['vocab_parallel'] else 'replicated'}, {hd['n_vocab_local']} "
               f"vocabulary columns and {hd['bytes_per_rank'] / 2**20:.1f} MiB per rank, "
               f"{hd['ms_per_decode_token']:.3f} ms per decode token")
    ar = rec["allreduce"]
    out.append(f"Allreduce per decode token: {ar['calls_per_token']} calls, {ar['measured_bytes_per_token']} B "
               f"payload measured, {ar['predicted_bytes_per_token']} B predicted ((2 x n_layer + 1 if the "
               f"embedding is vocab-parallel) x n_embd x itemsize); "
               f"ring wire bytes per rank {ar['ring_wire_bytes_per_token']:.0f} B")
    ov = rec["decode_overhead"]
    out.append(f"decode overhead (allreduce + other: norms, activations, residual adds, choosing the token, Python): "
               f"{ov['ms_per_token']:.3f} ms = {ov['percent']:.1f}% of a token; the same forward at width 4 x heads, "
               f"every weight in cache, takes {ov['fixed_cost_ms_per_token']:.3f} ms per token = "
               f"{ov['fixed_cost_percent']:.1f}% (the floor that Python, NumPy calls and Allreduce latency set)")
    dp = rec["decode_products"]
    out.append(f"decode products alone (this rank's W_QKV, W_B, W_C, W_D of every block and its LM head, back to "
               f"back): {dp['ms_per_token']:.3f} ms per token = {dp['GBps']:.1f} GB/s = "
               f"{dp['percent_of_read_bandwidth']:.0f}% of the DRAM read rate below; the whole generation step "
               f"runs at {dp['forward_percent_of_products']:.0f}% of their speed")
    rf = rec["roofline"]
    bws = rf["read_bandwidth_GBps_per_repeat"]["tg"]
    out.append(f"roofline, decode: DRAM read {rf['read_bandwidth_GBps']:.1f} GB/s per rank (all ranks reading at "
               f"once; {min(bws):.1f}-{max(bws):.1f} measured before each repeat) / "
               f"{rf['decode_bytes_per_token'] / 1e6:.1f} MB read per token per rank = "
               f"{rf['decode_bound_tokens_per_s']:.1f} tok/s; measured {rf['decode_tokens_per_s']:.1f} = "
               f"{rf['decode_percent']:.0f}% (mean over repeats of each against its own ceiling)")
    out.append(f"roofline, prefill: GEMM {rf['gemm_GFps']:.1f} GFLOP/s per rank at this model's shapes for "
               f"{rf['prefill_flops_per_token'] / 1e6:.2f} MFLOP per token per rank, plus "
               f"{1e3 * rf['prefill_lm_head_read_seconds']:.2f} ms to read the LM head once = "
               f"{rf['prefill_bound_tokens_per_s']:.1f} tok/s; measured {rf['prefill_tokens_per_s']:.1f} = "
               f"{rf['prefill_percent']:.0f}%")
    mems = rec.get("memory_per_rank") or []
    if mems and mems[0]["peak_rss_bytes"]:
        worst = max(mems, key=lambda m: m["peak_growth_over_weights_and_cache"])
        growth = worst["peak_rss_bytes"] - worst["rss_start_bytes"]
        out.append(f"memory per rank (worst rank): weights {worst['weight_bytes'] / 2**20:.1f} MiB + KV cache "
                   f"{worst['kv_cache_bytes'] / 2**20:.1f} MiB; peak RSS {worst['peak_rss_bytes'] / 2**20:.1f} MiB, "
                   f"of which {worst['rss_start_bytes'] / 2**20:.1f} MiB before loading (Python, NumPy, MPI); "
                   f"growth {growth / 2**20:.1f} MiB = {worst['peak_growth_over_weights_and_cache']:.2f} x "
                   f"(weights + cache)")
    if rec.get("projection"):
        proj = ", ".join(f"{p['interconnect']}: {p['decode_tokens_per_s']:.1f}" for p in rec["projection"])
        out.append(f"projected decode tok/s over a network (alpha-beta model, compute as measured): {proj}")
    return "\n".join(out)


def format_osu(rows, dtype):
    lines = ["# OSU-style MPI Allreduce Latency Test (mpitp.bench, in place)",
             f"# Datatype: {np.dtype(dtype).name}", f"# {'Size':<10} {'Avg Latency(us)':>16}"]
    lines += [f"{size:<12} {lat:>16.2f}" for size, lat in rows]
    return "\n".join(lines)


def scaling_table(records):
    """Speedup and efficiency of pp and tg against the fewest-ranks record, as a markdown table."""
    records = sorted(records, key=lambda r: r["ranks"])
    base = records[0]
    tests = [t["test"] for t in base["tests"]]
    head = ["ranks"] + [f"{t} {col}" for t in tests for col in ("t/s", "speedup", "efficiency")]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for r in records:
        cells = [str(r["ranks"])]
        for i, _ in enumerate(tests):
            speedup = r["tests"][i]["mean"] / base["tests"][i]["mean"]
            cells += [f"{r['tests'][i]['mean']:.2f}", f"{speedup:.2f}x",
                      f"{100 * speedup * base['ranks'] / r['ranks']:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ceiling_table(records):
    """Decode tokens/s per rank count against its two ceilings and the speedup each allows, as markdown:
    the DRAM read rate (bytes per token / bandwidth) and the matrix products alone (no other work)."""
    records = sorted(records, key=lambda r: r["ranks"])
    rows = []
    for r in records:
        tg = r["tests"][1]["mean"]
        dram = r["roofline"]["decode_bound_tokens_per_s"]
        products = 1e3 / r["decode_products"]["ms_per_token"]
        rows.append((r["ranks"], tg, dram, products))
    base = rows[0]
    lines = ["| ranks | tg t/s | speedup | DRAM-bound t/s | its speedup | products-only t/s | its speedup |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, tg, dram, products in rows:
        lines.append(f"| {n} | {tg:.2f} | {tg / base[1]:.2f}x | {dram:.2f} | {dram / base[2]:.2f}x | "
                     f"{products:.2f} | {products / base[3]:.2f}x |")
    return "\n".join(lines)


def plot_scaling(records, path):
    """Save tokens/s against ranks (pp and tg, with the ideal line) as a PNG; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = sorted(records, key=lambda r: r["ranks"])
    ranks = [r["ranks"] for r in records]
    fig, axes = plt.subplots(1, len(records[0]["tests"]), figsize=(10, 4))
    for i, ax in enumerate(np.atleast_1d(axes)):
        means = [r["tests"][i]["mean"] for r in records]
        sds = [r["tests"][i]["sd"] for r in records]
        ax.errorbar(ranks, means, yerr=sds, marker="o", label="measured")
        ax.plot(ranks, [means[0] * n / ranks[0] for n in ranks], "--", color="gray", label="ideal")
        ax.set(title=f"{records[0]['model']}: {records[0]['tests'][i]['test']}", xlabel="ranks",
               ylabel="tokens/s", xticks=ranks)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def summarize(paths, plot=None):
    """``--summarize``: print the scaling table of several JSON records (and save the plot)."""
    records = []
    for p in paths:
        with open(p) as f:
            records.append(json.load(f))
    print(f"# scaling: {records[0]['model']}, {records[0]['dtype']}, threads per rank "
          f"{sorted({r['threads'] for r in records}, key=str)}")
    print(scaling_table(records))
    if all("decode_products" in r for r in records):
        print("\n# decode against its ceilings: DRAM read rate per rank (all ranks reading at once) and the matrix "
              "products alone")
        print(ceiling_table(records))
    if plot:
        print(f"plot: {plot}" if plot_scaling(records, plot) else
              "plot: skipped (matplotlib is not installed: pip install 'mpitp[plot]')")
    return 0


# --- main ---------------------------------------------------------------------------------------------

def build_parser():
    p = RankParser(prog="python -m mpitp.bench",
                   description="Benchmark tensor-parallel prefill (pp) and generation (tg) on the MPI ranks, "
                               "with a per-token time breakdown and a roofline measured in the same run.",
                                formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpt2-124m",
                   help="random-weight model with these real shapes (ignored with --model)")
    p.add_argument("--model", metavar="DIR", help="benchmark a Hugging Face checkpoint folder instead")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype")
    p.add_argument("-p", "--n-prompt", type=int, default=128, help="prompt tokens for the pp test")
    p.add_argument("-n", "--n-gen", type=int, default=64, help="generated tokens for the tg test")
    p.add_argument("-r", "--repeats", type=int, default=5, help="timed repetitions of each test (after a warm-up)")
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS threads per rank (default: cores on the node / ranks on the node)")
    p.add_argument("--replicated-head", action="store_true",
                   help="replicate the embedding and LM head on every rank instead of splitting them by vocabulary "
                        "(to compare)")
    p.add_argument("--osu", action="store_true", help="also print an OSU-style Allreduce latency table")
    p.add_argument("--roofline-mib", type=int, default=256,
                   help="size of the array read to measure DRAM bandwidth; keep it well above the caches")
    p.add_argument("--json-out", metavar="PATH", help="write the full JSON record (results and environment) here")
    p.add_argument("--long", type=int, default=None, metavar="N",
                   help="instead of pp/tg: generate N tokens in one sequence and report time per token along the "
                        "run and memory growth after the KV cache was allocated")
    p.add_argument("--summarize", nargs="+", metavar="JSON",
                   help="no benchmark: print speedup and efficiency of these JSON records (e.g. one per rank count)")
    p.add_argument("--plot", metavar="PNG", help="with --summarize: also save a scaling plot here (needs matplotlib)")
    p.add_argument("--verbose", action="store_true", help="print full tracebacks for errors")
    return p


def main(argv=None):
    """Entry point; returns the process exit status (0 ok, 2 bad input, 1 unexpected error)."""
    comm = mpi.world()
    parser = build_parser()
    parser.rank = comm.Get_rank()
    args = parser.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize, args.plot) if comm.Get_rank() == 0 else 0
    return run_guarded(comm, lambda: _run(args, comm), args.verbose, "mpitp.bench")


def _run(args, comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    rss_start = rss_bytes()  # the interpreter, NumPy and MPI, before any model memory
    error = None
    try:
        if args.threads is not None and args.threads < 1:
            raise MpitpError(f"--threads must be >= 1, got {args.threads}.")
        if args.n_prompt < 1 or args.n_gen < 1 or args.repeats < 1:
            raise MpitpError("--n-prompt, --n-gen and --repeats must be >= 1.")
        if args.model:
            model = Model.load(args.model, comm, args.dtype, vocab_parallel=not args.replicated_head)
            name = os.path.basename(os.path.normpath(args.model))
        else:
            config = config_from_dict(PRESETS[args.preset], f"preset {args.preset}")
            shard_for(config, rank, size)  # refuses a bad rank count before building anything
            name = f"{args.preset} (random)"
        cfg_ctx = (model.config if args.model else config).n_ctx
        # a decode test is a 1-token prompt and n_gen + 1 generated tokens (the first comes from the prompt's forward)
        if max(args.n_prompt, args.n_gen + 2, (args.long or 0) + 2) > cfg_ctx:
            raise MpitpError(f"--n-prompt must be at most {cfg_ctx} and --n-gen/--long at most {cfg_ctx - 2}: the "
                             f"model's context is {cfg_ctx} positions.")
    except MpitpError as e:
        error = e
    if failed_vote(comm, error, "mpitp.bench"):  # the first collective
        return 2
    threads = apply_blas_threads(choose_threads(args.threads, mpi.ranks_on_node(comm)))
    warning = missing_threadpoolctl_warning(args.threads)
    if warning and rank == 0:
        print(f"mpitp.bench: {warning}", file=sys.stderr, flush=True)
    if not args.model:
        model = random_model(config, comm, DTYPES[args.dtype], vocab_parallel=not args.replicated_head)
    cfg, itemsize = model.config, np.dtype(model.dtype).itemsize
    rng = np.random.default_rng(0)
    if args.long:
        return _report_long(args, comm, name, model, long_run(model, args.long), threads)

    # Warm-up, then one profiled decode run (the breakdown and the Allreduce byte count) and one profiled prefill.
    run_prefill(model, args.n_prompt, 1, rng)
    decode_run(model, min(4, args.n_gen))
    profile = Profile()
    mpi.allreduce_bytes = 0
    own_s = decode_run(model, args.n_gen, profile)
    measured_bytes = mpi.allreduce_bytes // (args.n_gen + 1)  # decode_run also makes the prompt's forward
    decode_s, parts = slowest_breakdown(comm, own_s, profile)  # "other" includes choosing the token
    breakdown = {k: 1e3 * parts[k] / args.n_gen for k in CATEGORIES}
    prefill_profile = Profile()
    _, prefill_parts = slowest_breakdown(comm, profiled_prefill(model, args.n_prompt, prefill_profile),
                                         prefill_profile)

    # Memory: the peak so far covers loading, the caches and the activations of both tests (measured before
    # the bandwidth probe's array exists: that is the bench's instrument, not the model's memory).
    kv_bytes = model.cache_bytes(max(args.n_prompt, args.n_gen + 1))
    memory = {"rss_start_bytes": rss_start, "peak_rss_bytes": rss_bytes("VmHWM"), "weight_bytes": model.weight_bytes,
              "kv_cache_bytes": kv_bytes}
    memory["peak_growth_over_weights_and_cache"] = (
        (memory["peak_rss_bytes"] - rss_start) / (model.weight_bytes + kv_bytes) if rss_start else None)

    # The timed tests. Each repeat runs right after a measurement of the DRAM read bandwidth on the same
    # ranks and threads, and is compared with that ceiling.
    probe = BandwidthProbe(comm, model.dtype, args.roofline_mib << 20)
    pp_bw, tg_bw, tg, products = [], [], [], []
    pp = run_prefill(model, args.n_prompt, args.repeats, rng, before=lambda: pp_bw.append(probe.measure()))
    for _ in range(args.repeats):
        tg_bw.append(probe.measure())
        products.append(measure_decode_products(model))
        tg.append(args.n_gen / mpi.max_over_ranks(comm, decode_run(model, args.n_gen)))
    probe = None  # its matrix is freed before the rest is measured
    fixed_s = measure_fixed_cost(cfg, comm, model.dtype, args.n_gen, model.vocab_parallel)
    gemm = measure_gemm_rate(model, args.n_prompt)
    read_bytes = decode_read_bytes(model, n_kv=1 + args.n_gen // 2)
    # The LM head of the last position is a matrix-vector product: the roofline counts it as a read, not as flops.
    flops_per_token = prefill_flops(model, args.n_prompt, include_head=False) / args.n_prompt
    pp_mean, pp_sd = mean_sd(pp)
    tg_mean, tg_sd = mean_sd(tg)
    matrix_bytes = sum(m.nbytes for m in decode_matrices(model))
    overhead_ms = breakdown["allreduce"] + breakdown["other"]
    predicted = allreduce_payload_bytes(cfg, 1, itemsize, model.vocab_parallel)
    n_calls = 2 * cfg.n_layer + (1 if model.vocab_parallel else 0)
    compute_s = (decode_s - parts["allreduce"]) / args.n_gen
    rec = {
        "model": name, "params": cfg.n_params, "dtype": np.dtype(model.dtype).name, "ranks": size,
        "threads": threads, "n_prompt": args.n_prompt, "n_gen": args.n_gen, "repeats": args.repeats,
        "tests": [{"test": f"pp{args.n_prompt}", "tokens_per_s": pp, "mean": pp_mean, "sd": pp_sd},
                  {"test": f"tg{args.n_gen}", "tokens_per_s": tg, "mean": tg_mean, "sd": tg_sd}],
        "decode_breakdown_ms": breakdown,
        "lm_head": {"vocab_parallel": model.vocab_parallel, "n_vocab_local": model.shard.n_vocab_local,
                    "bytes_per_rank": model.globals.W_head.nbytes, "ms_per_decode_token": breakdown["lm_head"]},
        "prefill_breakdown_ms": {k: 1e3 * v for k, v in prefill_parts.items()},
        "allreduce": {"calls_per_token": n_calls, "measured_bytes_per_token": int(measured_bytes),
                      "predicted_bytes_per_token": predicted,
                      "ring_wire_bytes_per_token": ring_wire_bytes(predicted, size)},
        "decode_products": {"ms_per_token": 1e3 * float(np.mean(products)),
                            "GBps": float(np.mean([matrix_bytes / p for p in products])) / 1e9,
                            "percent_of_read_bandwidth": 100 * float(np.mean([matrix_bytes / p / bw for p, bw in
                                                                               zip(products, tg_bw)])),
                            "forward_percent_of_products": 100 * float(np.mean([t * p for t, p in
                                                                                zip(tg, products)]))},
        "decode_overhead": {"ms_per_token": overhead_ms, "percent": 100 * overhead_ms / sum(breakdown.values()),
                            "fixed_cost_ms_per_token": 1e3 * fixed_s,
                            "fixed_cost_percent": 100 * 1e3 * fixed_s / sum(breakdown.values())},
        "roofline": roofline(tg, tg_bw, read_bytes, pp, pp_bw, args.n_prompt, flops_per_token, gemm,
                             model.globals.W_head.nbytes),
        "projection": [{"interconnect": n, "alpha_s": a, "beta_Bps": b,
                        "decode_tokens_per_s": project_tokens_per_s(compute_s, n_calls, predicted / n_calls, size,
                                                                     a, b)}
                       for n, a, b in INTERCONNECTS] if size > 1 else [],
        "memory_per_rank": mpi.allgather(comm, memory),
        "environment": environment(comm, threads),
    }
    if args.osu:
        sizes = sorted({4 << i for i in range(0, 21, 2)} | {cfg.n_embd * itemsize, args.n_prompt * cfg.n_embd * itemsize})
        rec["allreduce_latency_us"] = allreduce_latency(comm, sizes, model.dtype)
    if rank == 0:
        rows = [dict(model=name, params=cfg.n_params, dtype=rec["dtype"], ranks=size,
                     threads=threads if threads is not None else "?", test=t["test"], mean=t["mean"], sd=t["sd"])
                for t in rec["tests"]]
        print(format_table(rows))
        print()
        print(format_report(rec))
        if args.osu:
            print()
            print(format_osu(rec["allreduce_latency_us"], model.dtype))
        if args.json_out:
            _write_json(args.json_out, rec)
            print(f"\nJSON record: {args.json_out}")
        sys.stdout.flush()
    return 0


def _report_long(args, comm, name, model, rec, threads):
    rec.update(model=name, ranks=comm.Get_size(), threads=threads, dtype=np.dtype(model.dtype).name,
               environment=environment(comm, threads))
    if comm.Get_rank() == 0:
        per = rec["seconds_per_token_by_tenth"]
        print(f"# long run: {name}, {rec['ranks']} ranks, {rec['n_gen']} tokens in one sequence")
        print("ms per token, by tenth of the run: " + " ".join(f"{1e3 * t:.2f}" for t in per))
        print(f"last tenth / first tenth: {per[-1] / per[0]:.2f}x (attention reads a KV cache that grows to "
              f"{rec['kv_cache_bytes'] / 2**20:.1f} MiB per rank)")
        print(f"resident memory growth after the cache was allocated (largest rank): "
              f"{rec['rss_growth_bytes_after_cache'] / 2**20:.2f} MiB")
        if args.json_out:
            _write_json(args.json_out, rec)
    return 0


def _write_json(path, rec):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
