"""What the bench prints and records: the llama-bench style table, the report lines under it, the batch tables,
the OSU table, the warnings, the JSON record's environment entry (with how busy the machine was), for
``--summarize`` the scaling, ceiling, weights and batch tables of several JSON records, with optional plots, and
for ``--cluster-table`` decode against the link rate. Nothing here measures, but for the load average and CPU
time counters the environment reads. Sizes print in decimal units (kB, MB, GB/s), like the rates.
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
from mpitp.errors import MpitpError, read_regular


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


SPREAD_LIMIT = 10  # percent: repeats whose (max - min) / mean is larger get a warning
STEAL_LIMIT = 3  # percent of the CPU time the hypervisor gave to other guests during the run


def percent(value):
    """A share of a ceiling, with the warning beside it when it is above 100%: a ceiling is a measurement too."""
    return f"{value:.0f}%" if value <= 100 else f"{value:.0f}% (warning: above its ceiling)"


def format_weights(weights):
    """The record's "weights" entry as one line: each rank's MB and the imbalance."""
    mb = ", ".join(f"{b / 1e6:.3g}" for b in weights["bytes_per_rank"])
    return f"weights per rank: {mb} MB; imbalance (max/mean) {weights['imbalance']:.2f}"


def format_breakdown(what, b):
    """Two lines for a "decode_breakdown" or "prefill_breakdown" entry: the split of the rank with the most
    compute, then every rank's wait for the slowest and what the instrument's own Barrier cost."""
    parts = b["per_rank_ms"][b["rank"]]
    total = sum(parts[k] for k in b["categories"])
    cells = " | ".join(f"{k} {parts[k]:.3f} ms ({100 * parts[k] / total:.0f}%)" for k in b["categories"])
    waits = ", ".join(f"{r['wait']:.3f}" for r in b["per_rank_ms"])
    own = np.mean([r["barrier"] for r in b["per_rank_ms"]])
    return (f"{what} (rank {b['rank']}, the one with the most compute; mean of {b['runs']} instrumented "
            f"run{'s' if b['runs'] > 1 else ''}): {cells} | total {total:.3f} ms\n"
            f"  wait for the slowest rank before the collectives, by rank: {waits} ms (the rest of each "
            f"collective is its own time above; the Barrier that separates them cost {own:.3f} ms more, left "
            f"out of these figures and absent from the timed runs)")


def format_projection(pj):
    """The record's "projection" entry: decode time from compute and the link, against the timed runs."""
    link = (f"back to back, on a link whose burst is spent, its Allreduce calls take {pj['back_to_back_us']:.1f} us "
            f"each, {pj['link_ms_per_token']:.3f} ms a token ({pj['wire_bytes_per_token'] / 1e3:.1f} kB per rank; "
            f"the link sustains {pj['link_sustained_MBps']:.1f} MB/s per rank in calls of "
            f"{pj['link']['bulk_bytes'] / 1e6:g} MB)"
            if pj["link_sustained_MBps"] else "one rank: no link")
    return (f"projection, decode: compute {pj['compute_ms_per_token']:.3f} ms (the critical path outside the "
            f"collectives, imbalance included) + {pj['allreduce_calls_per_token']} Allreduce x "
            f"{pj['allreduce_us']:.1f} us + {pj['choices_per_token']} token choice (Gather, Bcast) x "
            f"{pj['gather_bcast_us']:.1f} us at their idle-link cost = {pj['latency_ms_per_token']:.3f} ms; "
            f"{link}; {pj['bound']} binds: {pj['tokens_per_s']:.1f} tok/s projected, "
            f"{pj['measured_tokens_per_s']:.1f} measured ({pj['error_percent']:+.1f}%). Allreduce in the "
            f"instrumented runs: {pj['allreduce_in_situ_ms_per_token']:.3f} ms per token, the model's "
            f"{pj['allreduce_ms_per_token']:.3f}")


def format_report(rec):
    """Everything after the table: breakdown, weights, Allreduce, overhead, products, roofline, projection,
    memory, warnings."""
    out = [format_breakdown("decode, per token", rec["decode_breakdown"]),
           format_breakdown("prefill, per prompt", rec["prefill_breakdown"]), format_weights(rec["weights"])]
    hd = rec["lm_head"]
    out.append(f"LM head (vocab-parallel, rank 0): {hd['n_vocab_local']} vocabulary columns and "
               f"{hd['bytes_per_rank'] / 1e6:.3g} MB, {hd['ms_per_decode_token']:.3f} ms per decode token")
    ar = rec["allreduce"]
    out.append(f"Allreduce per decode token: {ar['measured_calls_per_token']:g} calls measured, "
               f"{ar['calls_per_token']} predicted (2 x n_layer + 1); {ar['measured_bytes_per_token']:g} B payload "
               f"measured, {ar['predicted_bytes_per_token']} B predicted (calls x n_embd x itemsize); "
               f"ring wire bytes per rank {ar['ring_wire_bytes_per_token']:.0f} B")
    ov = rec["decode_overhead"]
    out.append(f"decode overhead (collectives + other: embedding, choosing the token, Python; not the wait): "
               f"{ov['ms_per_token']:.3f} ms = {ov['percent']:.1f}% of a token; the same forward at width 4 x heads, "
               f"every weight in cache, takes {ov['fixed_cost_ms_per_token']:.3f} ms per token = "
               f"{ov['fixed_cost_percent']:.1f}% (the floor that Python, NumPy calls and collective latency set)")
    dp = rec["decode_products"]
    out.append(f"decode products alone (this rank's W_QKV, W_B, W_C, W_D of every block and its LM head, back to "
               f"back): {dp['ms_per_token']:.3f} ms per token = {dp['GBps']:.1f} GB/s = "
               f"{percent(dp['percent_of_read_bandwidth'])} of the DRAM read rate below; the whole generation step "
               f"runs at {percent(dp['forward_percent_of_products'])} of their speed")
    rf = rec["roofline"]
    bws = rf["read_bandwidth_GBps_per_repeat"]["tg"]
    out.append(f"roofline, decode: DRAM read {rf['read_bandwidth_GBps']:.1f} GB/s per rank (all ranks reading at "
               f"once; {min(bws):.1f}-{max(bws):.1f} measured before each repeat) / "
               f"{rf['decode_bytes_per_token'] / 1e6:.1f} MB read per token per rank = "
               f"{rf['decode_bound_tokens_per_s']:.1f} tok/s; measured {rf['decode_tokens_per_s']:.1f} = "
               f"{percent(rf['decode_percent'])} (mean over repeats of each against its own ceiling)")
    gemms = rf.get("gemm_GFps_per_repeat") or [rf["gemm_GFps"]]
    out.append(f"roofline, prefill: GEMM {rf['gemm_GFps']:.1f} GFLOP/s per rank ({min(gemms):.1f}-{max(gemms):.1f} "
               f"measured before each repeat, all ranks at once) on this model's products at the prompt's shapes "
               f"(block matrices and attention) for {rf['prefill_flops_per_token'] / 1e6:.2f} MFLOP "
               f"per token per rank, plus {1e3 * rf['prefill_lm_head_read_seconds']:.2f} ms to read the LM head "
               f"once = {rf['prefill_bound_tokens_per_s']:.1f} tok/s; measured {rf['prefill_tokens_per_s']:.1f} = "
               f"{percent(rf['prefill_percent'])}")
    if rec.get("projection"):
        out.append(format_projection(rec["projection"]))
    mems = rec.get("memory_per_rank") or []
    if mems and mems[0]["peak_rss_bytes"]:
        worst = max(mems, key=lambda m: m["peak_growth_over_weights_and_cache"])
        growth = worst["peak_rss_bytes"] - worst["rss_start_bytes"]
        out.append(f"memory per rank (worst rank): weights {worst['weight_bytes'] / 1e6:.1f} MB + KV cache "
                   f"{worst['kv_cache_bytes'] / 1e6:.1f} MB; peak RSS {worst['peak_rss_bytes'] / 1e6:.1f} MB, "
                   f"of which {worst['rss_start_bytes'] / 1e6:.1f} MB before loading (Python, NumPy, MPI); "
                   f"growth {growth / 1e6:.1f} MB = {worst['peak_growth_over_weights_and_cache']:.2f} x "
                   f"(weights + cache)")
    return "\n".join(out)


def format_warnings(warnings):
    """The record's "warnings", one line each (empty when there are none)."""
    return "\n".join(f"warning: {w}" for w in warnings)


def spread_percent(values):
    """How far repeats disagree: (max - min) / mean, in percent; 0 for fewer than two."""
    return 100 * (max(values) - min(values)) / float(np.mean(values)) if len(values) > 1 else 0.0


def ceiling_percents(rec):
    """``(what, percent of its ceiling)`` of every share of a ceiling the record holds."""
    out = []
    if "roofline" in rec:
        rf, dp = rec["roofline"], rec["decode_products"]
        out += [("decode (tg) against its DRAM roofline", rf["decode_percent"]),
                ("prefill (pp) against its roofline", rf["prefill_percent"]),
                ("decode's products alone against the DRAM read rate", dp["percent_of_read_bandwidth"]),
                ("the generation step against its products alone", dp["forward_percent_of_products"])]
    out += [(f"batch {r['batch']}'s decode against its ceiling", r["percent_of_ceiling"]) for r in rec.get("batch", [])]
    return out


def find_warnings(rec):
    """Why the record's figures may not mean what they say: a busy machine (a 1-minute load average above the
    cores at the start, or above the cores + 0.5 at the end, when the bench's own ranks count in it; CPU time
    stolen by the hypervisor above ``STEAL_LIMIT``%), repeats that disagree by more than ``SPREAD_LIMIT``%,
    and any measurement above its ceiling."""
    out = []
    for m in rec.get("environment", {}).get("machine", []):
        for when, limit in (("start", m["cores"]), ("end", m["cores"] + 0.5)):
            load = m[f"load_{when}"]
            if load is not None and load[0] > limit:
                out.append(f"the machine was busy: load average {load[0]:.2f} (1 minute) at the {when} of the run on "
                           f"{', '.join(m['hosts'])} ({m['cores']} cores; the bench's own ranks, and those of a run "
                           f"just before, count in it): other processes may have taken CPU time from the run")
        if m["steal_percent"] is not None and m["steal_percent"] > STEAL_LIMIT:
            out.append(f"the hypervisor stole {m['steal_percent']:.1f}% of the CPU time of {', '.join(m['hosts'])} "
                       f"during the run (more than {STEAL_LIMIT}%): the virtual machine shares its cores")
    runs = [(t["test"], t["tokens_per_s"]) for t in rec.get("tests", [])]
    runs += [(f"batch {r['batch']}", [x["decode_tokens"] / x["decode_seconds"] for x in r["runs"]])
             for r in rec.get("batch", [])]
    for name, values in runs:
        spread = spread_percent(values)
        if spread > SPREAD_LIMIT:
            out.append(f"{name}'s {len(values)} repeats disagree by {spread:.0f}% ((max - min) / mean, more than "
                       f"{SPREAD_LIMIT}%): something changed between them (a busy machine, a memory speed that "
                       f"drifted, a network that varied), and their mean says less than it seems")
    for what, value in ceiling_percents(rec):
        if value > 100:
            out.append(f"{what} is {value:.0f}%: above 100% the ceiling, itself a measurement, came out too low "
                       f"(a busy machine, a memory speed that drifted between the probe and the run, or data "
                       f"small enough to stay in the caches)")
    return out


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
             f"{r['ceiling_tokens_per_s']:.2f}", r["bound"], percent(r["percent_of_ceiling"])] for r in batch]
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
        f"{rec['kv_cache_bytes'] / 1e6:.1f} MB per rank)",
        f"resident memory growth after the cache was allocated (largest rank): "
        f"{rec['rss_growth_bytes_after_cache'] / 1e6:.2f} MB"])


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
    lines = ["| ranks | MB per rank | imbalance (max/mean) |", "|---:|---:|---:|"]
    for r in sorted(records, key=lambda r: r["ranks"]):
        mb = ", ".join(f"{b / 1e6:.3g}" for b in r["weights"]["bytes_per_rank"])
        lines.append(f"| {r['ranks']} | {mb} | {r['weights']['imbalance']:.2f} |")
    return "\n".join(lines)


def scaling_ceilings(rec, i):
    """``(label, tokens/s)`` of the ceilings of test ``i`` (0: pp, 1: tg) in a record that has them."""
    rf = rec.get("roofline")
    if rf is None:
        return []
    if i == 0:
        return [("prefill roofline (GEMM + LM head read)", rf["prefill_bound_tokens_per_s"])]
    return [("DRAM roofline", rf["decode_bound_tokens_per_s"]),
            ("products alone", 1e3 / rec["decode_products"]["ms_per_token"])]


def plot_scaling(records, path):
    """Save tokens/s against ranks (``scaling_figure``) as a PNG; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = scaling_figure(records, plt)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def scaling_figure(records, plt):
    """tokens/s against ranks, pp and tg side by side: measured, the ideal line and each rank count's
    ceilings (``scaling_ceilings``), every y axis from 0."""
    records = sorted(records, key=lambda r: r["ranks"])
    ranks = [r["ranks"] for r in records]
    fig, axes = plt.subplots(1, len(records[0]["tests"]), figsize=(10, 4))
    for i, ax in enumerate(np.atleast_1d(axes)):
        means = [r["tests"][i]["mean"] for r in records]
        sds = [r["tests"][i]["sd"] for r in records]
        ax.errorbar(ranks, means, yerr=sds, marker="o", label="measured")
        ax.plot(ranks, [means[0] * n / ranks[0] for n in ranks], "--", color="gray", label="ideal")
        if all(scaling_ceilings(r, i) for r in records):
            for k, (label, _) in enumerate(scaling_ceilings(records[0], i)):
                ax.plot(ranks, [scaling_ceilings(r, i)[k][1] for r in records], ":", marker="_",
                        label=f"ceiling: {label}")
        ax.set(title=f"{records[0]['model']}: {records[0]['tests'][i]['test']}", xlabel="ranks",
               ylabel="tokens/s", xticks=ranks)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


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


def read_records(paths):
    """The bench's JSON records in ``paths``; a file that is not one is an ``MpitpError`` naming it."""
    records = []
    for p in paths:
        try:
            record = json.loads(read_regular(p))
        except (ValueError, RecursionError) as e:
            raise MpitpError(f"{p}: not a JSON record of the bench ({type(e).__name__}).") from None
        if not isinstance(record, dict) or "tests" not in record:
            raise MpitpError(f"{p}: not a JSON record of the bench (written by python -m bench --json-out).")
        records.append(record)
    return records


def summarize(paths, plot=None, batch_plot=None):
    """``--summarize``: print the scaling table of several JSON records (and save the plots)."""
    records = read_records(paths)
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


def link_label(rec):
    """The link a record ran over: the rate scripts/cluster.sh set with tc (MPITP_CLUSTER_RATE), else its hosts."""
    env = rec["environment"]
    if env.get("cluster_rate"):
        return env["cluster_rate"]
    return f"{len(env['hosts'])} host{'s' if len(env['hosts']) > 1 else ''}"


def cluster_table(records):
    """Decode against the link, one row per record (``--cluster-table``): measured and projected tokens/s and
    the error, then per token the compute on the critical path, the Allreduce calls alone (in the instrumented
    runs, and as the projection charges them: at their idle-link cost, or back to back when the link binds),
    the most any rank waited for the slowest, and the link's sustained rate per rank."""
    head = ["link", "pp t/s", "tg t/s", "projected t/s", "error", "compute ms/tok", "Allreduce ms/tok",
            "modelled ms/tok", "wait ms/tok", "link MB/s", "bound"]
    rows = []
    for rec in records:
        pj, pp, tg = rec["projection"], rec["tests"][0], rec["tests"][1]
        wait = max(r["wait"] for r in rec["decode_breakdown"]["per_rank_ms"])
        rows.append([link_label(rec), f"{pp['mean']:.1f}", f"{tg['mean']:.2f} ± {tg['sd']:.2f}",
                     f"{pj['tokens_per_s']:.2f}", f"{pj['error_percent']:+.1f}%", f"{pj['compute_ms_per_token']:.3f}",
                     f"{pj['allreduce_in_situ_ms_per_token']:.3f}", f"{pj['allreduce_model_ms_per_token']:.3f}",
                     f"{wait:.3f}", f"{pj['link_sustained_MBps']:.1f}" if pj["link_sustained_MBps"] else "-",
                     pj["bound"]])
    return _markdown(head, rows, left={0, 10})


def print_cluster_table(paths):
    """``--cluster-table``: the table of several JSON records (one per link rate) and their warnings."""
    records = read_records(paths)
    first = records[0]
    print(f"# decode against the link: {first['model']}, {first['dtype']}, {first['ranks']} ranks on "
          f"{len(first['environment']['hosts'])} hosts, {first['threads']} BLAS thread(s) each, "
          f"{first['tests'][0]['test']} {first['tests'][1]['test']}, {first['repeats']} repeats; projected = "
          f"compute + each collective at its idle-link cost, or the collectives back to back on a link whose "
          f"burst is spent if that is slower (docs/benchmark.md, \"Across nodes\"); Allreduce = the calls "
          f"alone (measured in the instrumented runs, and as the projection charges them), wait = the most a rank "
          f"waited for the slowest; link MB/s = its sustained rate per rank in 1 MB calls")
    print(cluster_table(records))
    worst = max(abs(r["projection"]["error_percent"]) for r in records)
    print(f"largest projection error: {worst:.1f}%")
    for rec in records:
        for w in rec.get("warnings", []):
            print(f"warning ({link_label(rec)}): {w}")
    return 0


def machine_state():
    """This machine's load averages (1, 5, 15 minutes) and CPU time counters (jiffies: all, stolen), from /proc;
    None where unknown."""
    state = {"load": None, "jiffies": None, "steal_jiffies": None}
    try:
        with open("/proc/loadavg") as f:
            state["load"] = [float(v) for v in f.read().split()[:3]]
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        state["jiffies"], state["steal_jiffies"] = sum(fields), fields[7]
    except (OSError, ValueError, IndexError):
        pass
    return state


def machine_entry(comm, start):
    """How busy each machine was (one entry per kernel, naming its hosts): its cores, the load averages at
    ``start`` (a ``machine_state()`` taken when the run began) and now, and the share of CPU time stolen in
    between."""
    end = machine_state()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    steal = None
    if start["jiffies"] is not None and end["jiffies"] is not None and end["jiffies"] > start["jiffies"]:
        steal = 100 * (end["steal_jiffies"] - start["steal_jiffies"]) / (end["jiffies"] - start["jiffies"])
    mine = {"hosts": [socket.gethostname()], "machine_id": _boot_id(), "cores": cores, "load_start": start["load"],
            "load_end": end["load"], "steal_percent": steal}
    machines = {}  # emulated nodes (scripts/cluster.sh) share one kernel, and its load and CPU counters
    for m in comm.allgather(mine):
        key = m["machine_id"] or m["hosts"][0]
        if key in machines:
            machines[key]["hosts"] = sorted(set(machines[key]["hosts"] + m["hosts"]))
        else:
            machines[key] = m
    return list(machines.values())


def _boot_id():
    """The running kernel's random boot id: the same on every emulated node of one machine."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def environment(comm, threads, start=None):
    """Where and with what the run happened: how busy each host was since ``start`` (``machine_state()``), the
    link rate scripts/cluster.sh set, hosts, MPI library and transport settings, NumPy, BLAS, CPU, git."""
    hosts = sorted(set(comm.allgather(socket.gethostname())))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    transport = {k: v for k, v in os.environ.items()
                 if k.startswith(("MPIR_CVAR_", "FI_", "UCX_", "OMPI_MCA_", "I_MPI_"))}
    machine = machine_entry(comm, start if start is not None else machine_state())
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "cluster_rate": os.environ.get("MPITP_CLUSTER_RATE"),
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
