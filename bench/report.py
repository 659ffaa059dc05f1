"""One run's report: the llama-bench style table, the report lines under it, the batch tables, the OSU table, the
``--long`` report, and the warnings (why a figure may not mean what it says). Nothing here measures. Sizes print
in decimal units (kB, MB, GB/s), like the rates. The tables of several records are in ``summary`` and ``cluster``.
"""

import numpy as np

NOT_GEMM = ("row by row", "padded GEMM")  # how the model multiplies a batch where the DRAM-or-GEMM ceiling, one
# GEMM of B rows, does not bound it: at 2 to 5 rows, or a row count that is not a multiple of 4 (mpitp.matrix)


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
    """Everything after the table: breakdown, weights, LM head, Allreduce, overhead, products, roofline, projection,
    memory."""
    out = [format_breakdown("decode, per token", rec["decode_breakdown"]),
           format_breakdown("prefill, per prompt", rec["prefill_breakdown"]), format_weights(rec["weights"]),
           format_lm_head(rec["lm_head"]), format_allreduce(rec["allreduce"], rec.get("comm_dtype")),
           format_overhead(rec["decode_overhead"]),
           format_products(rec["decode_products"]), format_roofline(rec["roofline"])]
    if rec.get("projection"):
        out.append(format_projection(rec["projection"]))
    mems = rec.get("memory_per_rank") or []
    if mems and mems[0]["peak_rss_bytes"]:
        out.append(format_memory(mems))
    return "\n".join(out)


def format_lm_head(hd):
    """The record's "lm_head" entry: rank 0's share of the vocabulary and its time per decode token."""
    return (f"LM head (vocab-parallel, rank 0): {hd['n_vocab_local']} vocabulary columns and "
            f"{hd['bytes_per_rank'] / 1e6:.3g} MB, {hd['ms_per_decode_token']:.3f} ms per decode token")


def format_allreduce(ar, comm_dtype=None):
    """The record's "allreduce" entry: calls and bytes per decode token, measured against predicted."""
    return (f"Allreduce per decode token: {ar['measured_calls_per_token']:g} calls measured, "
            f"{ar['calls_per_token']} predicted (2 x n_layer + 1); {ar['measured_bytes_per_token']:g} B payload "
            f"measured, {ar['predicted_bytes_per_token']} B predicted (calls x n_embd x itemsize); "
            f"ring wire bytes per rank {ar['ring_wire_bytes_per_token']:.0f} B"
            + (f"; sent by this rank {ar['sent_bytes_per_token']:.0f} B (--comm-dtype {comm_dtype})"
               if "sent_bytes_per_token" in ar else ""))


def format_overhead(ov):
    """The record's "decode_overhead" entry: what is not the model's products, and the floor a tiny model sets."""
    return (f"decode overhead (collectives + other: embedding, choosing the token, Python; not the wait): "
            f"{ov['ms_per_token']:.3f} ms = {ov['percent']:.1f}% of a token; the same forward at width 4 x heads, "
            f"every weight in cache, takes {ov['fixed_cost_ms_per_token']:.3f} ms per token = "
            f"{ov['fixed_cost_percent']:.1f}% (the floor that Python, NumPy calls and collective latency set)")


def format_products(dp):
    """The record's "decode_products" entry: decode's matrix products alone against the DRAM read rate."""
    return (f"decode products alone (this rank's W_QKV, W_B, W_C, W_D of every block and its LM head, back to "
            f"back): {dp['ms_per_token']:.3f} ms per token = {dp['GBps']:.1f} GB/s = "
            f"{percent(dp['percent_of_read_bandwidth'])} of the DRAM read rate below; the whole generation step "
            f"runs at {percent(dp['forward_percent_of_products'])} of their speed")


def format_roofline(rf):
    """The record's "roofline" entry: decode against the DRAM read rate, prefill against the GEMM rate."""
    bws = rf["read_bandwidth_GBps_per_repeat"]["tg"]
    gemms = rf.get("gemm_GFps_per_repeat") or [rf["gemm_GFps"]]
    return (f"roofline, decode: DRAM read {rf['read_bandwidth_GBps']:.1f} GB/s per rank (all ranks reading at "
            f"once; {min(bws):.1f}-{max(bws):.1f} measured before each repeat) / "
            f"{rf['decode_bytes_per_token'] / 1e6:.1f} MB read per token per rank = "
            f"{rf['decode_bound_tokens_per_s']:.1f} tok/s; measured {rf['decode_tokens_per_s']:.1f} = "
            f"{percent(rf['decode_percent'])} (mean over repeats of each against its own ceiling)\n"
            f"roofline, prefill: GEMM {rf['gemm_GFps']:.1f} GFLOP/s per rank ({min(gemms):.1f}-{max(gemms):.1f} "
            f"measured before each repeat, all ranks at once) on this model's products at the prompt's shapes "
            f"(block matrices and attention) for {rf['prefill_flops_per_token'] / 1e6:.2f} MFLOP "
            f"per token per rank, plus {1e3 * rf['prefill_lm_head_read_seconds']:.2f} ms to read the LM head "
            f"once = {rf['prefill_bound_tokens_per_s']:.1f} tok/s; measured {rf['prefill_tokens_per_s']:.1f} = "
            f"{percent(rf['prefill_percent'])}")


def format_memory(mems):
    """The record's "memory_per_rank", of the rank whose peak grew most against its weights and cache."""
    worst = max(mems, key=lambda m: m["peak_growth_over_weights_and_cache"])
    growth = worst["peak_rss_bytes"] - worst["rss_start_bytes"]
    return (f"memory per rank (worst rank): weights {worst['weight_bytes'] / 1e6:.1f} MB + KV cache "
            f"{worst['kv_cache_bytes'] / 1e6:.1f} MB; peak RSS {worst['peak_rss_bytes'] / 1e6:.1f} MB, "
            f"of which {worst['rss_start_bytes'] / 1e6:.1f} MB before loading (Python, NumPy, MPI); "
            f"growth {growth / 1e6:.1f} MB = {worst['peak_growth_over_weights_and_cache']:.2f} x "
            f"(weights + cache)")


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
    out += [(f"batch {r['batch']}'s decode against its ceiling", r["percent_of_ceiling"]) for r in rec.get("batch", [])
            if r.get("product") not in NOT_GEMM]
    out += [(f"batch {r['batch']}'s decode against its products ceiling", r["percent_of_products_ceiling"])
            for r in rec.get("batch", []) if "percent_of_products_ceiling" in r]
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


def markdown(head, rows, left=()):
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
    return markdown(head, rows)


def batch_ceiling_table(batch):
    """Aggregate and per-sequence decode tokens/s per batch size, the speedup over the smallest batch, what a
    step reads and computes per rank, the rates measured, the ceiling, what binds and the share reached; then
    the product the model chose, the fastest one measured, and the measured ceiling and the share of it
    (older records have neither: "-"). At 2 to 5 rows the model does not multiply by GEMM, nor by a GEMM of
    B rows where it pads them, and the first ceiling does not bound it: its share stands without a warning
    there."""
    base = batch[0]
    head = ["batch", "aggregate t/s", "per sequence t/s", f"x batch {base['batch']}", "MB read/step",
            "MFLOP/step", "DRAM GB/s", "GEMM GFLOP/s", "ceiling t/s", "bound", "% of ceiling", "product",
            "fastest", "products ceiling t/s", "% of it"]
    rows = [[str(r["batch"]), f"{r['decode_tokens_per_s']:.2f}", f"{r['decode_tokens_per_s_per_sequence']:.2f}",
             f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x", f"{r['read_bytes_per_step'] / 1e6:.2f}",
             f"{r['flops_per_step'] / 1e6:.1f}", f"{np.mean(r['read_bandwidth_GBps']):.1f}", f"{r['gemm_GFps']:.1f}",
             f"{r['ceiling_tokens_per_s']:.2f}", r["bound"], gemm_share(r), r.get("product", "-"),
             r.get("fastest_product", "-")] + ([f"{r['products_ceiling_tokens_per_s']:.2f}",
                                               percent(r["percent_of_products_ceiling"])]
                                              if "fastest_product" in r else ["-", "-"]) for r in batch]
    return markdown(head, rows, left={9, 11, 12})


def gemm_share(r):
    """A batch's share of its DRAM-or-GEMM ceiling; no warning above 100% where the model did not multiply its rows
    as that ceiling's GEMM does."""
    return f"{r['percent_of_ceiling']:.0f}%" if r.get("product") in NOT_GEMM else percent(r["percent_of_ceiling"])


def batch_projection_table(batch):
    """Each batch size's decode measured against its projection (``ceilings.project_batch``)."""
    head = ["batch", "decode t/s", "projected t/s", "error", "compute ms/step", "Allreduce calls/step",
            "link ms/step", "bound"]
    rows = [[str(r["batch"]), f"{r['decode_tokens_per_s']:.2f}", f"{p['tokens_per_s']:.2f}",
             f"{p['error_percent']:+.1f}%", f"{p['compute_ms_per_step']:.3f}", f"{p['allreduce_calls_per_step']:.0f}",
             f"{p['link_ms_per_step']:.3f}", p["bound"]] for r, p in ((r, r["projection"]) for r in batch)]
    return markdown(head, rows, left={7})


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
        "products with this model's block matrices); the slower binds. Product: how the model multiplies B rows "
        "(mpitp.matrix: row by row at 2 to 5; beyond, one GEMM, padded with zero rows to a multiple of 4; where the "
        "rows go row by row or are padded, that ceiling does not bound them); fastest: the fastest of one B-row "
        "GEMM, one padded so, and B GEMVs, timed on every weight matrix of the model as a step reads them; products "
        "ceiling: those products the fastest way, plus reading the KV cache at the DRAM rate",
        batch_ceiling_table(b)] + ([] if "projection" not in b[0] else [  # records before 2026-12-07 have none
        "",
        "# batched decode projected (as tg is: the compute of an instrumented run's decode steps on the critical path, "
        "plus its collectives at the cost the link showed for a step's Allreduce message, or back to back when the "
        "link's rate binds)",
        batch_projection_table(b)]))


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

