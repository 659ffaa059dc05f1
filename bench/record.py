"""The JSON record of a pp/tg run, from its measurements: the tests, the breakdowns, the weights, the Allreduce
traffic, the decode costs, the roofline, the projection and the memory (pure arithmetic on what ``__main__``
measured), and the rows of its llama-bench table.
"""

import numpy as np

from mpitp.weights import n_params

from . import ceilings as ce
from .timing import CATEGORIES, mean_sd


def breakdown_entry(records, per):
    """The mean of instrumented runs (``timing.combine`` records), in ms per ``per`` tokens: each rank's split,
    the critical path's compute, and which rank had the most compute (the one the report shows)."""
    n = len(records[0]["ranks"])
    per_rank = [{k: 1e3 * float(np.mean([r["ranks"][i][k] for r in records])) / per for k in records[0]["ranks"][i]}
                for i in range(n)]
    rank = max(range(n), key=lambda i: sum(per_rank[i][k] for k in ("blocks", "lm_head", "other")))
    return {"categories": list(CATEGORIES), "rank": rank, "runs": len(records), "per_rank_ms": per_rank,
            "critical_compute_ms": 1e3 * float(np.mean([r["critical_s"] for r in records])) / per}


def projection(cfg, size, itemsize, link, decode_records, n_gen, tg):
    """The record's "projection": each timed repeat's decode time projected (``ceilings.project_decode``) from
    the compute of the instrumented run right before it and the link measured in this run, against its
    measurement. ``itemsize``: bytes per value on the wire (with --comm-dtype, its encoding's, which the link
    was measured with; the encoding's own time is not in the projection)."""
    _, calls, choices = ce.per_step(decode_records[0])
    wire = ce.ring_wire_bytes(ce.allreduce_payload_bytes(cfg, 1, itemsize), size)
    compute = [ce.per_step(r)[0] for r in decode_records]
    costs = (calls, link["allreduce_s"], choices, link["gather_bcast_s"], link["back_to_back_s"])
    projected = [ce.project_decode(c, *costs) for c in compute]
    tokens_per_s = float(np.mean([1 / s for s, _ in projected]))
    measured = float(np.mean(tg))
    latency = float(np.mean(compute)) + calls * link["allreduce_s"] + choices * link["gather_bcast_s"]
    bound = ce.project_decode(float(np.mean(compute)), *costs)[1]  # of the mean compute
    in_situ = float(np.mean([np.mean([r["allreduce"] for r in d["ranks"]]) for d in decode_records])) / n_gen
    return {"compute_ms_per_token": 1e3 * float(np.mean(compute)), "allreduce_calls_per_token": calls,
            "allreduce_us": 1e6 * link["allreduce_s"], "allreduce_ms_per_token": 1e3 * calls * link["allreduce_s"],
            "choices_per_token": choices, "gather_bcast_us": 1e6 * link["gather_bcast_s"],
            "latency_ms_per_token": 1e3 * latency,
            "link_sustained_MBps": link["sustained_Bps"] / 1e6 if link["sustained_Bps"] else None,
            "wire_bytes_per_token": wire, "back_to_back_us": 1e6 * link["back_to_back_s"],
            "link_ms_per_token": 1e3 * (calls * link["back_to_back_s"] + choices * link["gather_bcast_s"]),
            "bound": bound, "allreduce_model_ms_per_token": 1e3 * calls * (
                link["back_to_back_s"] if bound == "link rate" else link["allreduce_s"]),
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_repeat": [1 / s for s, _ in projected],
            "measured_tokens_per_s": measured, "error_percent": 100 * (tokens_per_s - measured) / measured,
            "allreduce_in_situ_ms_per_token": 1e3 * in_situ, "link": link}


def run_record(args, comm, model, name, threads, m):
    """The JSON record of a pp/tg run from its measurements ``m`` (``_before_timed`` and ``_timed``)."""
    cfg, size, itemsize = model.config, comm.Get_size(), np.dtype(model.dtype).itemsize
    comm_dtype = args.comm_dtype or np.dtype(model.dtype).name
    pp, tg, decode_bds = m["pp"], m["tg"], m["decode_bds"]
    decode_entry, prefill_entry = breakdown_entry(decode_bds, args.n_gen), breakdown_entry([m["prefill_bd"]], 1)
    breakdown = {k: decode_entry["per_rank_ms"][decode_entry["rank"]][k] for k in CATEGORIES}
    head_bytes = model.weights.W_vocab.nbytes
    # The LM head of the last position is a matrix-vector product: the roofline counts it as a read, not as flops.
    flops_per_token = ce.prefill_product_flops(model, args.n_prompt) / args.n_prompt
    predicted = ce.allreduce_payload_bytes(cfg, 1, itemsize)
    return {
        "model": name, "params": n_params(cfg), "dtype": np.dtype(model.dtype).name, "comm_dtype": comm_dtype,
        "ranks": size,
        "threads": threads, "n_prompt": args.n_prompt, "n_gen": args.n_gen, "repeats": args.repeats,
        "tests": [dict(zip(("test", "tokens_per_s", "mean", "sd"), (f"pp{args.n_prompt}", pp, *mean_sd(pp)))),
                  dict(zip(("test", "tokens_per_s", "mean", "sd"), (f"tg{args.n_gen}", tg, *mean_sd(tg))))],
        "decode_breakdown_ms": breakdown, "decode_breakdown": decode_entry,
        "prefill_breakdown_ms": {k: prefill_entry["per_rank_ms"][prefill_entry["rank"]][k] for k in CATEGORIES},
        "prefill_breakdown": prefill_entry,
        "weights": {"bytes_per_rank": m["weights"], "imbalance": ce.imbalance(m["weights"])},
        "lm_head": {"n_vocab_local": model.shard.n_vocab_local, "bytes_per_rank": head_bytes,
                    "ms_per_decode_token": breakdown["lm_head"]},
        "allreduce": {"calls_per_token": ce.allreduce_calls(cfg),
                      "measured_calls_per_token": decode_bds[0]["calls"] / args.n_gen,
                      "measured_bytes_per_token": decode_bds[0]["bytes"] / args.n_gen,
                      "predicted_bytes_per_token": predicted,
                      "ring_wire_bytes_per_token": ce.ring_wire_bytes(predicted, size),
                      "sent_bytes_per_token": decode_bds[0]["sent"] / args.n_gen},
        **decode_costs(model, m, breakdown),
        "roofline": ce.roofline(tg, m["tg_bw"], ce.decode_read_bytes(model, n_kv=1 + args.n_gen // 2), pp,
                                m["pp_bw"], args.n_prompt, flops_per_token, m["pp_gemm"], head_bytes),
        "projection": projection(cfg, size, m["wire_itemsize"], m["link"], decode_bds, args.n_gen, tg),
        "memory_per_rank": m["memory"],
    }


def decode_costs(model, m, breakdown):
    """The record's "decode_products" (decode's matrix products alone, against the DRAM rate and the whole step)
    and "decode_overhead" (collectives and other work, and the fixed cost) entries."""
    matrix_bytes = sum(a.nbytes for a in ce.decode_matrices(model))
    products, tg, fixed_s = m["products"], m["tg"], m["fixed_s"]
    total_ms = sum(breakdown.values())
    overhead_ms = breakdown["allreduce"] + breakdown["gather_bcast"] + breakdown["other"]
    return {"decode_products": {"ms_per_token": 1e3 * float(np.mean(products)),
                                "GBps": float(np.mean([matrix_bytes / p for p in products])) / 1e9,
                                "percent_of_read_bandwidth": 100 * float(np.mean(
                                    [matrix_bytes / p / bw for p, bw in zip(products, m["tg_bw"])])),
                                "forward_percent_of_products": 100 * float(np.mean([t * p for t, p in
                                                                                    zip(tg, products)]))},
            "decode_overhead": {"ms_per_token": overhead_ms, "percent": 100 * overhead_ms / total_ms,
                                "fixed_cost_ms_per_token": 1e3 * fixed_s,
                                "fixed_cost_percent": 100 * 1e3 * fixed_s / total_ms}}


def table_rows(rec):
    """The llama-bench table's rows (``format_table``) of a record: one per test."""
    return [dict(model=rec["model"], params=rec["params"], dtype=rec["dtype"], ranks=rec["ranks"],
                 threads=rec["threads"] if rec["threads"] is not None else "?", test=t["test"], mean=t["mean"],
                 sd=t["sd"]) for t in rec["tests"]]
