"""Timing the model itself: prefill and decode runs between barriers, and where a token's time goes.

The breakdown is measured from outside the model: whole calls of the block function (``Model.block_fn``) and ``Model.lm_head`` are
timed by wrapping the instance's bound methods, and the collectives by a ``WaitComm`` put around the
communicator for the instrumented runs only, which separates the wait for the slowest rank from the
collective itself.
"""

import time

import numpy as np

from mpitp import comm as mpi
from mpitp.generation import generate_batch, generate_sequence, new_batch_cache
from mpitp.sampling import Sampler

from .models import fixed_cost_config, random_model

# Where a token's time goes. "wait" is the time a rank would wait for the slowest rank before a collective (the
# imbalance); "allreduce" and "gather_bcast" are the collectives alone, every rank having arrived.
CATEGORIES = ("blocks", "lm_head", "other", "wait", "allreduce", "gather_bcast")


def timed_runs(comm, fn, repeats):
    """Run ``fn`` ``repeats`` times between barriers; the slowest rank's seconds for each run."""
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t = time.perf_counter()
        fn()
        times.append(mpi.max_over_ranks(comm, time.perf_counter() - t))
    return times


def mean_sd(values):
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


class WaitComm:
    """The instrument of the breakdown runs (never of the timed ones): wraps the model's communicator so that
    every collective of a forward and of the generation loop (``Allreduce``, and the ``Gather`` and ``Bcast``
    that choose each token) first waits in a Barrier, then runs. Each call is logged as (entered, Barrier
    done, collective done, name): the collective's time is the collective alone, every rank having arrived;
    the Barrier's time is the wait for the slowest rank plus the Barrier's own latency, which ``combine``
    tells apart. Every other call passes straight through."""

    KINDS = {"Allreduce": "allreduce", "Gather": "gather_bcast", "Bcast": "gather_bcast"}

    def __init__(self, comm):
        self.comm = comm
        self.reset()

    def reset(self):
        self.log, self.start, self.seconds = [], time.perf_counter(), 0.0  # seconds: Barrier + collective

    def _call(self, name, *args, **kwargs):
        t0 = time.perf_counter()
        self.comm.Barrier()
        t1 = time.perf_counter()
        out = getattr(self.comm, name)(*args, **kwargs)
        t2 = time.perf_counter()
        self.log.append((t0, t1, t2, name))
        self.seconds += t2 - t0
        return out

    def Allreduce(self, *args, **kwargs):
        return self._call("Allreduce", *args, **kwargs)

    def Gather(self, *args, **kwargs):
        return self._call("Gather", *args, **kwargs)

    def Bcast(self, *args, **kwargs):
        return self._call("Bcast", *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.comm, name)


class Breakdown:
    """While active (``with``), the model runs on a ``WaitComm`` around its communicator (a ``TimedComm``,
    which still counts the Allreduce calls and bytes), and every call of ``model.block_fn`` and ``model.lm_head``
    is timed. ``own(total)`` splits this rank's ``total`` seconds (from the last ``reset``) into "blocks" (the
    blocks' time less their collectives), "lm_head", "allreduce", "gather_bcast", "barrier" (the Barriers'
    time: wait and the Barrier's own latency) and "other" (embedding, mask, choosing the token, the Python
    loop), and returns them with the compute segments between collectives that ``combine`` needs."""

    def __init__(self, model):
        self.model, self.tc = model, model.comm
        self.wc = WaitComm(model.comm)
        self.reset()

    def reset(self):
        self.block_s = self.block_comm_s = self.head_s = 0.0
        self.tc.reset()
        self.wc.reset()

    def __enter__(self):
        self.saved = {k: vars(self.model)[k] for k in ("block_fn", "lm_head") if k in vars(self.model)}
        block, head = self.model.block_fn, self.model.lm_head  # the block function the forward calls

        def timed_block(*args, **kwargs):
            t, comm_s = time.perf_counter(), self.wc.seconds
            out = block(*args, **kwargs)
            self.block_s += time.perf_counter() - t
            self.block_comm_s += self.wc.seconds - comm_s
            return out

        def timed_head(*args, **kwargs):
            t = time.perf_counter()
            out = head(*args, **kwargs)
            self.head_s += time.perf_counter() - t
            return out

        self.model.block_fn, self.model.lm_head, self.model.comm = timed_block, timed_head, self.wc
        self.reset()
        return self

    def __exit__(self, *exc):
        for k in ("block_fn", "lm_head"):  # the class's methods again, or what was there before
            vars(self.model).pop(k, None)
        vars(self.model).update(self.saved)
        self.model.comm = self.tc

    def own(self, total):
        parts = {"blocks": self.block_s - self.block_comm_s, "lm_head": self.head_s, "allreduce": 0.0,
                 "gather_bcast": 0.0, "barrier": 0.0}
        segments, prev = [], self.wc.start
        for entered, arrived, done, name in self.wc.log:
            segments.append(entered - prev)  # computing since the last collective ended
            parts["barrier"] += arrived - entered
            parts[WaitComm.KINDS[name]] += done - arrived
            prev = done
        segments.append(self.wc.start + total - prev)  # after the last collective
        parts["other"] = total - sum(parts.values())
        return parts, segments


def combine(comm, total, parts, segments):
    """Every rank's split of its time (``Breakdown.own``), with the wait told apart from the Barrier's own
    latency; the same record on every rank (seconds):

    - "critical_s": the compute on the critical path, the sum over the segments between collectives of the
      slowest rank's segment: what the run would take with collectives that cost nothing;
    - "ranks": per rank, ``CATEGORIES`` plus "barrier" (the instrument's own cost, in no timed run) and
      "total" (without it): "wait" is the critical path less the rank's own compute (blocks, LM head, other);
    - "seconds": the slowest rank's ``total``; "rank": the rank with the most compute (it waits least).
    """
    everyone = comm.allgather((total, parts, segments))
    if len({len(s) for _, _, s in everyone}) != 1:
        raise RuntimeError("the ranks made different numbers of collective calls")  # one code path: cannot happen
    critical = float(np.sum(np.max([s for _, _, s in everyone], axis=0)))
    ranks = []
    for total_r, p, _ in everyone:
        wait = critical - (p["blocks"] + p["lm_head"] + p["other"])
        r = {k: p[k] for k in CATEGORIES if k != "wait"}
        r.update(wait=wait, barrier=p["barrier"] - wait, total=total_r - (p["barrier"] - wait))
        ranks.append({k: r[k] for k in CATEGORIES + ("barrier", "total")})
    rank = max(range(len(ranks)), key=lambda i: sum(ranks[i][k] for k in ("blocks", "lm_head", "other")))
    return {"seconds": max(r["total"] for r in ranks), "critical_s": critical, "ranks": ranks, "rank": rank}


def decode_run(model, n_gen, on_token=None):
    """Generate ``n_gen`` tokens greedily after a one-token prompt, with mpitp's own generation loop (rank 0
    decides and broadcasts each token); returns this rank's seconds for the ``n_gen`` decode forwards."""
    model.comm.Barrier()
    return generate_sequence(model, [0], n_gen + 1, Sampler(), on_token=on_token).timing.decode_seconds


def decode_breakdown(model, n_gen):
    """One decode run of ``n_gen`` tokens after a one-token prompt, instrumented: ``batch_breakdown``."""
    return batch_breakdown(model, [[0]], n_gen + 1)


def batch_breakdown(model, prompts, n_gen):
    """One ``generate_batch`` of ``prompts`` (``n_gen`` new tokens each), instrumented (``Breakdown``):
    ``combine``'s record of its decode steps alone (the counters restart once every prompt's first token is
    known), plus this rank's Allreduce "calls", "bytes" (payload), "sent" (bytes on the wire, ``TimedComm``) and
    "collectives" (every one the instrument saw) in those steps, and their number, "steps"."""
    cache = new_batch_cache(model, prompts, n_gen)
    with Breakdown(model) as b:
        known = []

        def on_token(i, token):
            known.append(i)
            if len(known) == len(prompts):  # the prefill's tokens: count the decode steps only
                b.reset()

        model.comm.Barrier()
        own = generate_batch(model, prompts, n_gen, Sampler(), on_token=on_token, cache=cache)[0].timing.decode_seconds
        calls, nbytes, sent, collectives = b.tc.calls, b.tc.bytes, b.tc.sent, len(b.wc.log)
        rec = combine(model.comm, own, *b.own(own))
    return dict(rec, calls=calls, bytes=nbytes, sent=sent, collectives=collectives, steps=n_gen - 1)


def prefill_breakdown(model, n_prompt):
    """One prefill of ``n_prompt`` tokens, instrumented: ``combine``'s record."""
    prompt = np.arange(n_prompt) % model.config.n_vocab
    cache = model.new_cache(n_prompt)
    with Breakdown(model) as b:
        model.comm.Barrier()
        b.reset()
        t = time.perf_counter()
        model.forward(prompt, cache, gather=False)
        own = time.perf_counter() - t
        return combine(model.comm, own, *b.own(own))


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
        out += [n_prompt / t for t in timed_runs(model.comm, lambda: model.forward(prompt, cache, gather=False), 1)]
    return out


def batch_run(model, prompts, n_gen):
    """One ``generate_batch`` of ``prompts`` (greedy, no stop ids, ``n_gen`` new tokens each), between barriers,
    its KV cache allocated before. Its token counts and, the slowest rank's each, the seconds of its prefill
    (the prompts, and choosing the first tokens), of its decode steps (one forward for the whole batch
    each, and choosing the tokens) and of the whole call."""
    cache = new_batch_cache(model, prompts, n_gen)
    model.comm.Barrier()
    t = time.perf_counter()
    tm = generate_batch(model, prompts, n_gen, Sampler(), cache=cache)[0].timing  # shared by the batch
    own = (tm.prefill_seconds, tm.decode_seconds, time.perf_counter() - t)
    prefill_s, decode_s, seconds = np.max(model.comm.allgather(own), axis=0).tolist()
    return {"prefill_tokens": tm.prefill_tokens, "prefill_seconds": prefill_s, "decode_tokens": tm.decode_tokens,
            "decode_seconds": decode_s, "seconds": seconds}


def measure_fixed_cost(config, comm, dtype, n_gen, repeats=3):
    """Seconds per decode token of ``fixed_cost_config(config)`` on ``comm`` (best of ``repeats``, slowest rank)."""
    model = random_model(fixed_cost_config(config, comm.Get_size()), comm, dtype)
    decode_run(model, min(4, n_gen))
    return min(mpi.max_over_ranks(comm, decode_run(model, n_gen)) for _ in range(repeats)) / n_gen


def long_run(model, n_gen):
    """Generate ``n_gen`` tokens in one sequence: per-token seconds (the slowest rank's, per tenth of the
    run) and how much each rank's resident memory grew after its cache was allocated and the prompt ran."""
    stamps, rss = [], []

    def on_token(token):
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            rss.append(rss_bytes())

    decode_run(model, n_gen, on_token=on_token)
    grown = max(model.comm.allgather((rss_bytes() - rss[0]) if rss[0] else 0))
    tenths = [float(np.mean(chunk)) for chunk in np.array_split(np.diff(stamps), 10)]
    return {"n_gen": n_gen, "seconds_per_token_by_tenth": [mpi.max_over_ranks(model.comm, t) for t in tenths],
            "rss_growth_bytes_after_cache": grown, "kv_cache_bytes": model.cache_bytes(n_gen + 1)}


def rss_bytes(field="VmRSS"):
    """This process's resident memory now (``VmRSS``) or its peak (``VmHWM``) in bytes; None if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
