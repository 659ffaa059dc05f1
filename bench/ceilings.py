"""What bounds the model on this machine: the DRAM read rate, the matrix products alone, the GEMM rate,
Allreduce latency and the link between the ranks (measured), and what the model's shape predicts (pure
arithmetic, unit-tested): flops, bytes read per decode token, Allreduce payload, the roofline, the imbalance of
the weights over ranks, and the projection of decode time from compute and the link (docs/benchmark.md).
"""

import time

import numpy as np

from mpitp import comm as mpi
from mpitp.arena import Arena
from mpitp.families import FAMILIES
from mpitp.matrix import padded_product, padded_rows, row_by_row, rows_product

from .timing import timed_runs

# --- what the model's shape predicts -------------------------------------------------------------------


def allreduce_calls(config):
    """Allreduce calls in one forward: two per block and one for the vocab-parallel embedding."""
    return 2 * config.n_layer + 1


def allreduce_payload_bytes(config, n_seq, itemsize):
    """Bytes one rank hands to Allreduce in one forward of ``n_seq`` tokens: every call is [n_seq, n_embd]."""
    return allreduce_calls(config) * n_seq * config.n_embd * itemsize


def ring_wire_bytes(payload, size):
    """Bytes each rank sends (and receives) for a ring Allreduce of ``payload`` bytes over ``size`` ranks."""
    return 0 if size == 1 else 2 * (size - 1) / size * payload


def decode_read_bytes(model, n_kv, n_batch=1):
    """Bytes one rank must read from memory per decode step of ``n_batch`` sequences with ``n_kv`` cached
    positions each: every weight it holds once for the whole batch (of the embedding only one row per
    sequence, not counted, unless it doubles as the LM head), plus the KV cache of every sequence."""
    g = model.weights
    arrays = [a for b in model.blocks for a in vars(b).values()]
    arrays += [g.norm_f_weight, g.norm_f_bias, g.W_vocab]
    return sum(a.nbytes for a in arrays if a is not None) + model.cache_bytes(n_kv, n_batch)


def _matmul_flops_per_token(model):
    """Flops of one token through one block's products on this rank: W_QKV, W_B, the MLP's in and out."""
    cfg, s = model.config, model.shard
    d, dh = cfg.n_embd, cfg.d_head
    q, kv, f = s.n_head_local * dh, s.n_kv_head_local * dh, s.n_ffn_local
    n_mlp_in = 2 if FAMILIES[cfg.family].gated else 1
    return 2 * (d * q + 2 * d * kv + q * d + n_mlp_in * d * f + f * d)


def prefill_flops(model, n_seq, include_head=True):
    """Floating-point operations one rank performs in a prefill of ``n_seq`` tokens (with its LM-head columns for
    the last position unless ``include_head`` is False)."""
    cfg, s = model.config, model.shard
    # causal attention: Q K^T and P V, each 2 * d_head flops per (query, visible key) pair and head
    attention = 2 * 2 * cfg.d_head * s.n_head_local * n_seq * (n_seq + 1) / 2
    return (cfg.n_layer * (n_seq * _matmul_flops_per_token(model) + attention)
            + (2 * cfg.n_embd * s.n_vocab_local if include_head else 0))


def prefill_product_flops(model, n_seq):
    """Floating-point operations of the products one rank executes in a prefill of ``n_seq`` tokens, as the
    model computes them: every block's W_QKV, W_B, W_C, W_D on [n_seq, in], and attention's Q Kᵀ and P V over
    every key of the prompt (the whole n_seq x n_seq square: the causal mask hides half of it after the
    product). What ``measure_gemm_rate(model, n_seq, n_kv=n_seq)`` times, block by block."""
    cfg, s = model.config, model.shard
    attention = 2 * 2 * cfg.d_head * s.n_head_local * n_seq * n_seq
    return cfg.n_layer * (n_seq * _matmul_flops_per_token(model) + attention)


def decode_flops(model, n_kv):
    """Floating-point operations one rank performs for one decode token that sees ``n_kv`` positions (its
    own included): every block's products, attention over the ``n_kv`` keys and values, its LM-head columns."""
    cfg, s = model.config, model.shard
    attention = 2 * 2 * cfg.d_head * s.n_head_local * n_kv
    return cfg.n_layer * (_matmul_flops_per_token(model) + attention) + 2 * cfg.n_embd * s.n_vocab_local


def batch_ceiling(n_batch, read_bytes, flops_per_token, read_rate, gemm_rate):
    """``(tokens/s, "DRAM" or "GEMM")``: the fastest decode of ``n_batch`` sequences, and what sets it. A step
    reads ``read_bytes`` (every weight once, the KV cache of every sequence) at ``read_rate`` bytes/s and
    computes ``n_batch`` tokens of ``flops_per_token`` at ``gemm_rate`` flop/s; the slower of the two binds."""
    read_s, compute_s = read_bytes / read_rate, n_batch * flops_per_token / gemm_rate
    return n_batch / max(read_s, compute_s), "DRAM" if read_s >= compute_s else "GEMM"


def batch_record(n_batch, n_prompt, n_gen, runs, read_rates, read_bytes, flops_per_token, gemm_rate, products=None,
                 cache_bytes=0):
    """One batch size's entry of the record's "batch" list: its runs (``timing.batch_run``, raw), the means
    of llama-batched-bench's figures over them, aggregate and per-sequence decode tokens/s, and each run
    against its own ceiling (``batch_ceiling`` at the DRAM read rate measured right before it).

    "product" is how the model multiplies ``n_batch`` rows (``product_chosen``); at 2 to 5 rows it does not use
    GEMM, and at 6 to 255 rows that are not a multiple of 4 it pads them: there the ceiling above does not bound
    it. ``products``: seconds of one step's matrix products alone each
    way (``measure_decode_products``), e.g. ``{"GEMM": s, "row by row": s}``; with them, each run also against
    the products ceiling: the fastest way's products plus reading the ``cache_bytes`` of the batch's KV cache at
    the run's DRAM rate (attention's reads, which the products leave out)."""
    agg = [r["decode_tokens"] / r["decode_seconds"] for r in runs]
    ceilings = [batch_ceiling(n_batch, read_bytes, flops_per_token, bw, gemm_rate)[0] for bw in read_rates]
    n_kv = n_batch * (n_prompt + n_gen - 1)  # positions cached at the end: the last token is never fed back

    def mean(values):
        return float(np.mean(values))

    rec = {"batch": n_batch, "n_prompt": n_prompt, "n_gen": n_gen, "n_kv": n_kv, "runs": runs,
           "prefill_seconds": mean([r["prefill_seconds"] for r in runs]),
           "prefill_tokens_per_s": mean([r["prefill_tokens"] / r["prefill_seconds"] for r in runs]),
           "decode_seconds": mean([r["decode_seconds"] for r in runs]),
           "decode_tokens_per_s": mean(agg), "decode_tokens_per_s_per_sequence": mean(agg) / n_batch,
           "total_seconds": mean([r["seconds"] for r in runs]),
           "total_tokens_per_s": mean([n_kv / r["seconds"] for r in runs]),
           "read_bytes_per_step": read_bytes, "flops_per_step": n_batch * flops_per_token,
           "read_bandwidth_GBps": [bw / 1e9 for bw in read_rates], "gemm_GFps": gemm_rate / 1e9,
           "ceiling_tokens_per_s": mean(ceilings),
           "bound": batch_ceiling(n_batch, read_bytes, flops_per_token, mean(read_rates), gemm_rate)[1],
           "percent_of_ceiling": 100 * mean(np.divide(agg, ceilings)), "product": product_chosen(n_batch)}
    if products:
        fastest = min(products, key=products.get)
        measured = [n_batch / (products[fastest] + cache_bytes / bw) for bw in read_rates]
        rec.update({"products_seconds": dict(products), "fastest_product": fastest, "cache_bytes_per_step": cache_bytes,
                    "products_ceiling_tokens_per_s": mean(measured),
                    "percent_of_products_ceiling": 100 * mean(np.divide(agg, measured))})
    return rec


def imbalance(values):
    """The largest of ``values`` over their mean: 1 when the ranks hold equal shares."""
    return max(values) / (sum(values) / len(values))


def roofline(tg, tg_bw, decode_bytes, pp, pp_bw, n_prompt, flops_per_token, gemm, head_bytes):
    """Each repeat against the ceiling measured right before it: the record's "roofline" entry.

    ``tg``, ``pp``: tokens/s of each repeat; ``tg_bw``, ``pp_bw``: bytes/s one rank read just before each.
    Decode is bound by reading ``decode_bytes`` per token; a prefill of ``n_prompt`` tokens by its
    ``flops_per_token`` at ``gemm`` flop/s (one rate, or one measured before each repeat) plus reading the LM
    head (``head_bytes``) once.
    """
    gemms = np.broadcast_to(np.asarray(gemm, dtype=np.float64), (len(pp_bw),))
    gemm = float(np.mean(gemms))
    roof_decode = [bw / decode_bytes for bw in tg_bw]
    roof_prefill = [n_prompt / (n_prompt * flops_per_token / g + head_bytes / bw) for bw, g in zip(pp_bw, gemms)]
    return {"read_bandwidth_GBps": float(np.mean(tg_bw)) / 1e9,
            "read_bandwidth_GBps_per_repeat": {"pp": [b / 1e9 for b in pp_bw], "tg": [b / 1e9 for b in tg_bw]},
            "decode_bytes_per_token": decode_bytes,
            "decode_bound_tokens_per_s": float(np.mean(roof_decode)), "decode_tokens_per_s": float(np.mean(tg)),
            "decode_percent": 100 * float(np.mean(np.divide(tg, roof_decode))),
            "gemm_GFps": gemm / 1e9, "gemm_GFps_per_repeat": [g / 1e9 for g in gemms.tolist()],
            "prefill_flops_per_token": flops_per_token,
            "prefill_lm_head_read_seconds": head_bytes / float(np.mean(pp_bw)),
            "prefill_bound_tokens_per_s": float(np.mean(roof_prefill)), "prefill_tokens_per_s": float(np.mean(pp)),
            "prefill_percent": 100 * float(np.mean(np.divide(pp, roof_prefill)))}


# --- measured ceilings ---------------------------------------------------------------------------------


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
        return self.W.nbytes / min(timed_runs(self.comm, lambda: self.x @ self.W, repeats))


def decode_matrices(model):
    """The matrices one decode token multiplies, in order: every block's W_QKV, W_B, W_C, W_D, then the LM head."""
    return [m for w in model.blocks for m in (w.W_QKV, w.W_B, w.W_C, w.W_D)] + [model.weights.W_vocab]


def measure_decode_products(model, repeats=3, n_rows=1, way="GEMM"):
    """Seconds for decode's matrix products alone: one token (``n_rows``: a batch's step of that many) through
    every block's W_QKV, W_B, W_C, W_D and the LM head of this rank's own weights, back to back, with nothing
    else (all ranks at once; the slowest rank's best). Several rows go ``way``: "GEMM" (one product of
    ``n_rows`` rows), "padded GEMM" (``mpitp.matrix.padded_product``: one product of ``n_rows`` rows and zero
    rows up to a multiple of 4) or "row by row" (``mpitp.matrix.rows_product``: ``n_rows`` vector-matrix
    products, a panel of columns at a time). What NumPy and the BLAS reach at this
    model's shapes, its weights read from memory as decoding reads them: the forward's floor."""
    mats = [m.view(np.ndarray) for m in decode_matrices(model)]  # not the model's own choice (mpitp.matrix)
    pairs = [(np.ones((n_rows, m.shape[0]) if n_rows > 1 else m.shape[0], model.dtype), m) for m in mats]

    def run():
        for x, m in pairs:
            WAYS[way](x, m)

    run()
    return min(timed_runs(model.comm, run, repeats))


WAYS = {"GEMV": np.matmul, "GEMM": np.matmul, "padded GEMM": padded_product, "row by row": rows_product}


def product_ways(n_rows):
    """The ways the BLAS can multiply ``n_rows`` rows by a matrix: "GEMV" for one, else "GEMM" and "row by row",
    and "padded GEMM" below 256 rows where ``n_rows`` is not a multiple of 4 (``mpitp.matrix.padded_rows``)."""
    if n_rows == 1:
        return ["GEMV"]
    return ["GEMM", "row by row"] + (["padded GEMM"] if padded_rows(n_rows) != n_rows else [])


def product_chosen(n_rows):
    """How the model's weights (``mpitp.matrix.Matrix``) multiply ``n_rows`` rows."""
    if n_rows == 1:
        return "GEMV"
    if row_by_row(n_rows):
        return "row by row"
    return "GEMM" if padded_rows(n_rows) == n_rows else "padded GEMM"


def measure_gemm_rate(model, n_seq, n_kv=None, repeats=5):
    """Flop/s one rank reaches on the matrix products of one block at ``n_seq`` tokens (all ranks at once):
    [n_seq, in] times its W_QKV, W_B, W_C and W_D, and with ``n_kv`` also attention's products at the shapes
    the model multiplies (per group of query heads sharing a key/value head, [group n_seq, d_head] times
    Kᵀ [d_head, n_kv], then [group n_seq, n_kv] times V [n_kv, d_head], for every group at once)."""
    w, cfg = model.blocks[0], model.config
    mats = [m.view(np.ndarray) for m in (w.W_QKV, w.W_B, w.W_C, w.W_D)]  # one GEMM, however the model multiplies
    pairs = [(np.ones((n_seq, m.shape[0]), model.dtype), m) for m in mats]
    flops = sum(2 * n_seq * m.shape[0] * m.shape[1] for m in mats)
    if n_kv is not None:
        dh = cfg.d_head
        for h0, h1, k0, k1 in model.head_runs:
            n_k, rows = k1 - k0, (h1 - h0) // (k1 - k0) * n_seq
            K = np.ones((1, n_k, n_kv, dh), model.dtype)
            pairs += [(np.ones((1, n_k, rows, dh), model.dtype), K.transpose(0, 1, 3, 2)),
                      (np.ones((1, n_k, rows, n_kv), model.dtype), np.ones((1, n_k, n_kv, dh), model.dtype))]
            flops += 2 * 2 * n_k * rows * n_kv * dh

    def run():
        for x, m in pairs:
            x @ m

    run()
    return flops / min(timed_runs(model.comm, run, repeats))


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


# --- the link and the projection -----------------------------------------------------------------------


def measure_link(comm, dtype, message_bytes, n_calls, bulk_bytes=1_000_000, burst_bytes=1_000_000, rounds=8,
                 min_seconds=0.2):
    """What the ranks' link does, for ``project_decode`` (seconds, bytes/s; the slowest rank's):

    - "sustained_Bps": bytes each rank sends per second (ring wire bytes, ``ring_wire_bytes``) in back-to-back
      Allreduce calls of ``bulk_bytes``, after one that spends any burst a token bucket (tc's tbf) allows;
    - "back_to_back_s": one Allreduce of ``message_bytes`` (a decode token's) in calls back to back, timed
      after the first ``burst_bytes`` of them have spent any burst a bucket allows: what a call costs when the
      link's rate, not its latency, sets the pace (on an unlimited link, its latency still does);
    - "allreduce_s": the same call on an idle link: the median over ``rounds`` rounds of ``n_calls`` calls
      back to back (a token's worth), each after a pause long enough for a bucket to refill at the sustained
      rate;
    - "gather_bcast_s": the Gather and Bcast that choose a token (16 bytes each), in the same rounds.
    """
    itemsize, size = np.dtype(dtype).itemsize, comm.Get_size()

    def back_to_back(buf, batch, after=0):  # seconds per call, in batches of calls until min_seconds passed
        for _ in range(after):
            mpi.allreduce_sum(comm, buf)
        comm.Barrier()
        n, busy = 0, 0.0
        while True:
            t = time.perf_counter()
            for _ in range(batch):
                mpi.allreduce_sum(comm, buf)
            busy += time.perf_counter() - t
            n += batch
            elapsed = mpi.max_over_ranks(comm, busy)  # between batches, untimed: every rank stops together
            if elapsed >= min_seconds:
                return elapsed / n

    bulk = np.zeros(max(1, bulk_bytes // itemsize), dtype)  # zeros: sums of sums stay finite
    mpi.allreduce_sum(comm, bulk)
    wire = ring_wire_bytes(bulk.nbytes, size)
    sustained = wire / back_to_back(bulk, 3) if wire else None
    msg = np.zeros(max(1, message_bytes // itemsize), dtype)
    msg_wire = ring_wire_bytes(msg.nbytes, size)
    busy = back_to_back(msg, n_calls, after=int(-(-burst_bytes // msg_wire)) if msg_wire else 0)
    pause = max(2e-3, 2 * ring_wire_bytes(n_calls * msg.nbytes, size) / sustained) if sustained else 0.0
    time.sleep(min(2.0, 2 * wire / sustained) if sustained else 0.0)  # an emptied bucket refills
    per_call, per_choice = [], []
    for _ in range(rounds + 1):  # the first round is a warm-up
        time.sleep(pause)
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(n_calls):
            mpi.allreduce_sum(comm, msg)
        t1 = time.perf_counter()
        mpi.gather_to_root(comm, np.zeros(2))
        mpi.bcast_ints(comm, [0, 0])
        t2 = time.perf_counter()
        per_call.append(mpi.max_over_ranks(comm, (t1 - t0) / n_calls))
        per_choice.append(mpi.max_over_ranks(comm, t2 - t1))
    return {"sustained_Bps": sustained, "bulk_bytes": bulk.nbytes, "message_bytes": msg.nbytes,
            "back_to_back_s": busy, "allreduce_s": float(np.median(per_call[1:])),
            "gather_bcast_s": float(np.median(per_choice[1:])), "pause_s": pause, "rounds": rounds,
            "calls_per_round": n_calls}


def project_decode(compute_s, n_allreduce, allreduce_s, n_choice, choice_s, back_to_back_s):
    """``(seconds per decode token, what binds)``. A token is ``compute_s`` (the critical path outside the
    collectives, imbalance included) plus ``n_allreduce`` Allreduce calls of ``allreduce_s`` each and
    ``n_choice`` token choices (Gather and Bcast) of ``choice_s`` each, at their idle-link cost: the
    collectives are blocking, so nothing overlaps. Unless the link cannot carry the calls that often: a token
    takes at least its Allreduce calls back to back at ``back_to_back_s`` each, the cost of one when the link's
    rate sets the pace (a token bucket's burst spent), and then the link binds."""
    latency = compute_s + n_allreduce * allreduce_s + n_choice * choice_s
    link = n_allreduce * back_to_back_s + n_choice * choice_s
    return (link, "link rate") if link > latency else (latency, "compute + latency")


def per_step(breakdown):
    """``(compute seconds, Allreduce calls, token choices)`` per decode step of an instrumented run
    (``timing.batch_breakdown``): a choice is a Gather and a Bcast, counted as half each (greedy, as the bench
    runs, gathers every sequence's candidate in one)."""
    steps = breakdown["steps"]
    return (breakdown["critical_s"] / steps, breakdown["calls"] / steps,
            (breakdown["collectives"] - breakdown["calls"]) / (2 * steps))


def project_batch(breakdown, link, n_batch):
    """A batch's decode projected as a sequence's is (``project_decode``), from its instrumented run
    (``timing.batch_breakdown``) and the link measured with one step's Allreduce message: the record's
    "projection" entry of a batch size (tokens/s, what binds, and the pieces)."""
    compute, calls, choices = per_step(breakdown)
    step_s, bound = project_decode(compute, calls, link["allreduce_s"], choices, link["gather_bcast_s"],
                                   link["back_to_back_s"])
    return {"tokens_per_s": n_batch / step_s, "bound": bound, "compute_ms_per_step": 1e3 * compute,
            "allreduce_calls_per_step": calls, "choices_per_step": choices,
            "link_ms_per_step": 1e3 * (calls * link["back_to_back_s"] + choices * link["gather_bcast_s"]),
            "link": link}
