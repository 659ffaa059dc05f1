"""What the bench prints and records: the llama-bench style table, the report lines under it, the batch tables,
the OSU table, the JSON record's environment entry, and for ``--summarize`` the scaling, ceiling, weights and
batch tables of several JSON records, with optional plots. Nothing here measures.
"""

import datetime
import json
import os
import platform
import socket
import subprocess

import numpy as np

from mpitp import __version__
from mpitp import comm as mpi


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


def format_weights(weights):
    """The record's "weights" entry as one line: each rank's MiB and the imbalance."""
    mib = ", ".join(f"{b / 2**20:.3g}" for b in weights["bytes_per_rank"])
    return f"weights per rank: {mib} MiB; imbalance (max/mean) {weights['imbalance']:.2f}"


def format_report(rec):
    """Everything after the table: breakdown, weights, Allreduce, overhead, products, roofline, memory."""
    out = []
    for what, key in (("decode, per token", "decode_breakdown_ms"), ("prefill, per prompt", "prefill_breakdown_ms")):
        b = rec[key]
        total = sum(b.values())
        parts = " | ".join(f"{k} {v:.3f} ms ({100 * v / total:.0f}%)" for k, v in b.items())
        out.append(f"{what} (slowest rank): {parts} | total {total:.3f} ms")
    out.append(format_weights(rec["weights"]))
    hd = rec["lm_head"]
    out.append(f"LM head (vocab-parallel, rank 0): {hd['n_vocab_local']} vocabulary columns and "
               f"{hd['bytes_per_rank'] / 2**20:.3g} MiB, {hd['ms_per_decode_token']:.3f} ms per decode token")
    ar = rec["allreduce"]
    out.append(f"Allreduce per decode token: {ar['measured_calls_per_token']:g} calls measured, "
               f"{ar['calls_per_token']} predicted (2 x n_layer + 1); {ar['measured_bytes_per_token']:g} B payload "
               f"measured, {ar['predicted_bytes_per_token']} B predicted (calls x n_embd x itemsize); "
               f"ring wire bytes per rank {ar['ring_wire_bytes_per_token']:.0f} B")
    ov = rec["decode_overhead"]
    out.append(f"decode overhead (allreduce + other: embedding, choosing the token, Python): "
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
    return "\n".join(out)


def _markdown(head, rows, left=()):
    """A markdown table of strings, columns padded to their widest cell, right-aligned but for ``left``."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i in left else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "| " + " | ".join("-" * w if i in left else "-" * (w - 1) + ":" for i, w in enumerate(widths)) + " |"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def batched_bench_table(batch):
    """The record's "batch" entries in llama-batched-bench's columns: PP, TG, B, N_KV, T_PP s, S_PP t/s,
    T_TG s, S_TG t/s (aggregate decode tokens/s), T s, S t/s (means over the runs)."""
    head = ["PP", "TG", "B", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s", "S t/s"]
    rows = [[str(r["n_prompt"]), str(r["n_gen"]), str(r["batch"]), str(r["n_kv"]), f"{r['prefill_seconds']:.3f}",
             f"{r['prefill_tokens_per_s']:.2f}", f"{r['decode_seconds']:.3f}", f"{r['decode_tokens_per_s']:.2f}",
             f"{r['total_seconds']:.3f}", f"{r['total_tokens_per_s']:.2f}"] for r in batch]
    return _markdown(head, rows)


def batch_ceiling_table(batch):
    """Aggregate and per-sequence decode tokens/s per batch size, the speedup over the smallest batch, what a
    step reads and computes per rank, the rates measured, the ceiling, what binds and the share reached."""
    base = batch[0]
    head = ["batch", "aggregate t/s", "per sequence t/s", f"x batch {base['batch']}", "MB read/step",
            "MFLOP/step", "DRAM GB/s", "GEMM GFLOP/s", "ceiling t/s", "bound", "% of ceiling"]
    rows = [[str(r["batch"]), f"{r['decode_tokens_per_s']:.2f}", f"{r['decode_tokens_per_s_per_sequence']:.2f}",
             f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x", f"{r['read_bytes_per_step'] / 1e6:.2f}",
             f"{r['flops_per_step'] / 1e6:.1f}", f"{np.mean(r['read_bandwidth_GBps']):.1f}", f"{r['gemm_GFps']:.1f}",
             f"{r['ceiling_tokens_per_s']:.2f}", r["bound"], f"{r['percent_of_ceiling']:.0f}%"] for r in batch]
    return _markdown(head, rows, left={9})


def format_batch(rec):
    """The batched decode test's two tables with their headings."""
    b = rec["batch"]
    runs = len(b[0]["runs"])
    return "\n".join([
        f"# batched generation: generate_batch of B random prompts of {b[0]['n_prompt']} tokens, {b[0]['n_gen']} "
        f"new tokens each (the first from the prefill, in T_PP), greedy; mean of {runs} run(s) per batch size, "
        f"the slowest rank's times",
        batched_bench_table(b), "",
        "# batched decode against its ceiling, per rank: a step reads every weight once plus the KV cache of all B "
        "sequences (DRAM rate measured right before each run) and computes B tokens (GEMM rate of [B, n_embd] "
        "products with this model's block matrices); the slower binds",
        batch_ceiling_table(b)])


def format_long(rec):
    """The report of a ``--long`` run."""
    per = rec["seconds_per_token_by_tenth"]
    return "\n".join([
        f"# long run: {rec['model']}, {rec['ranks']} ranks, {rec['n_gen']} tokens in one sequence",
        "ms per token, by tenth of the run: " + " ".join(f"{1e3 * t:.2f}" for t in per),
        f"last tenth / first tenth: {per[-1] / per[0]:.2f}x (attention reads a KV cache that grows to "
        f"{rec['kv_cache_bytes'] / 2**20:.1f} MiB per rank)",
        f"resident memory growth after the cache was allocated (largest rank): "
        f"{rec['rss_growth_bytes_after_cache'] / 2**20:.2f} MiB"])


def format_osu(rows, dtype):
    lines = ["# OSU-style MPI Allreduce Latency Test (python -m bench, in place)",
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
    rows = [(r["ranks"], r["tests"][1]["mean"], r["roofline"]["decode_bound_tokens_per_s"],
             1e3 / r["decode_products"]["ms_per_token"]) for r in sorted(records, key=lambda r: r["ranks"])]
    base = rows[0]
    lines = ["| ranks | tg t/s | speedup | DRAM-bound t/s | its speedup | products-only t/s | its speedup |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, tg, dram, products in rows:
        lines.append(f"| {n} | {tg:.2f} | {tg / base[1]:.2f}x | {dram:.2f} | {dram / base[2]:.2f}x | "
                     f"{products:.2f} | {products / base[3]:.2f}x |")
    return "\n".join(lines)


def weights_table(records):
    """Each rank's weights and their imbalance per rank count, as markdown."""
    lines = ["| ranks | MiB per rank | imbalance (max/mean) |", "|---:|---:|---:|"]
    for r in sorted(records, key=lambda r: r["ranks"]):
        mib = ", ".join(f"{b / 2**20:.3g}" for b in r["weights"]["bytes_per_rank"])
        lines.append(f"| {r['ranks']} | {mib} | {r['weights']['imbalance']:.2f} |")
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


def plot_batch(records, path):
    """Save aggregate decode tokens/s and its ceiling against batch size (one line pair per record) as a PNG,
    y from 0; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rec in records:
        b = rec["batch"]
        sizes = [r["batch"] for r in b]
        label = f"{rec['ranks']} rank{'s' if rec['ranks'] > 1 else ''}"
        line, = ax.plot(sizes, [r["decode_tokens_per_s"] for r in b], marker="o", label=f"{label}: measured")
        ax.plot(sizes, [r["ceiling_tokens_per_s"] for r in b], "--", color=line.get_color(),
                label=f"{label}: ceiling (GEMM or DRAM)")
    sizes = sorted({r["batch"] for rec in records for r in rec["batch"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_ylim(bottom=0)
    first = records[0]["batch"][0]
    ax.set(title=f"{records[0]['model']}: batched decode, pp{first['n_prompt']} tg{first['n_gen']}",
           xlabel="batch size (sequences)", ylabel="aggregate decode tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def save_batch_plot(records, path):
    """``--batch-plot``: the plot of the records that have a batch test, and one line saying what happened."""
    records = [r for r in records if r.get("batch")]
    if not records:
        return "batch plot: skipped (no batch test in the record: it ran with --batch none or --long)"
    return (f"batch plot: {path}" if plot_batch(records, path) else
            "batch plot: skipped (matplotlib is not installed: pip install 'mpitp[plot]')")


def summarize(paths, plot=None, batch_plot=None):
    """``--summarize``: print the scaling table of several JSON records (and save the plots)."""
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
    if all("weights" in r for r in records):
        print("\n# weights each rank holds")
        print(weights_table(records))
    for r in sorted((r for r in records if r.get("batch")), key=lambda r: r["ranks"]):
        print(f"\n# batched decode against its ceiling, {r['ranks']} rank{'s' if r['ranks'] > 1 else ''}")
        print(batch_ceiling_table(r["batch"]))
    if plot:
        print(f"plot: {plot}" if plot_scaling(records, plot) else
              "plot: skipped (matplotlib is not installed: pip install 'mpitp[plot]')")
    if batch_plot:
        print(save_batch_plot(records, batch_plot))
    return 0


def environment(comm, threads):
    """Where and with what the run happened: hosts, MPI library and transport settings, NumPy, BLAS, CPU, git."""
    hosts = sorted(set(comm.allgather(socket.gethostname())))
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


def blas_description():
    """e.g. 'openblas 0.3.31 (SkylakeX)'; 'unknown BLAS' without threadpoolctl."""
    try:
        import threadpoolctl
    except ImportError:
        return "unknown BLAS (install threadpoolctl to see it)"
    libs = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    if not libs:
        return "no BLAS found"
    p = libs[0]
    return f"{p['internal_api']} {p.get('version') or ''} ({p.get('architecture') or p.get('threading_layer')})"
