"""Timing the model itself: prefill and decode runs between barriers, and where a token's time goes.

The breakdown is measured from outside the model: whole calls of ``Model.block`` and ``Model.lm_head`` are
timed by wrapping the instance's bound methods, and the Allreduce calls by the ``TimedComm`` it runs on.
"""

import time

import numpy as np

from mpitp import comm as mpi
from mpitp.generation import generate_batch, generate_sequence, new_batch_cache
from mpitp.sampling import Sampler

from .models import fixed_cost_config, random_model

CATEGORIES = ("blocks", "allreduce", "lm_head", "other")


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


class Breakdown:
    """While active (``with``), times every call of ``model.block`` and ``model.lm_head``; ``model.comm``
    must be a ``TimedComm``. ``parts(total)`` splits ``total`` seconds into ``CATEGORIES``: "blocks" is the
    time inside blocks less their Allreduce calls, "allreduce" every Allreduce (the embedding's too), and
    "other" the rest (embedding, mask, choosing the token, the Python loop)."""

    def __init__(self, model):
        self.model, self.tc = model, model.comm
        self.reset()

    def reset(self):
        self.block_s = self.block_allreduce_s = self.head_s = 0.0
        self.tc.reset()

    def __enter__(self):
        self.saved = {k: vars(self.model)[k] for k in ("block", "lm_head") if k in vars(self.model)}
        block, head = self.model.block, self.model.lm_head

        def timed_block(*args, **kwargs):
            t, ar = time.perf_counter(), self.tc.seconds
            out = block(*args, **kwargs)
            self.block_s += time.perf_counter() - t
            self.block_allreduce_s += self.tc.seconds - ar
            return out

        def timed_head(*args, **kwargs):
            t = time.perf_counter()
            out = head(*args, **kwargs)
            self.head_s += time.perf_counter() - t
            return out

        self.model.block, self.model.lm_head = timed_block, timed_head
        self.reset()
        return self

    def __exit__(self, *exc):
        del self.model.block, self.model.lm_head  # the class's methods again, or what was there before
        vars(self.model).update(self.saved)

    def parts(self, total):
        p = {"blocks": self.block_s - self.block_allreduce_s, "allreduce": self.tc.seconds, "lm_head": self.head_s}
        p["other"] = total - sum(p.values())
        return p


def slowest(comm, own_seconds, parts):
    """``(seconds, {category: seconds})`` of the slowest rank."""
    return max(comm.allgather((own_seconds, parts)), key=lambda r: r[0])


def decode_run(model, n_gen, on_token=None):
    """Generate ``n_gen`` tokens greedily after a one-token prompt, with mpitp's own generation loop (rank 0
    decides and broadcasts each token); returns this rank's seconds for the ``n_gen`` decode forwards."""
    model.comm.Barrier()
    return generate_sequence(model, [0], n_gen + 1, Sampler(), on_token=on_token).timing.decode_seconds


def decode_breakdown(model, n_gen):
    """One decode run of ``n_gen`` tokens, instrumented: ``(seconds, parts, allreduce calls, bytes)`` of the
    decode forwards alone (the counters restart when the prompt's token arrives), the slowest rank's time."""
    with Breakdown(model) as b:
        first = []

        def on_token(token):
            if not first:  # the prompt's forward is done: count the decode forwards only
                first.append(token)
                b.reset()

        own = decode_run(model, n_gen, on_token)
        calls, nbytes = b.tc.calls, b.tc.bytes
        seconds, parts = slowest(model.comm, own, b.parts(own))
    return seconds, parts, calls, nbytes


def prefill_breakdown(model, n_prompt):
    """One prefill of ``n_prompt`` tokens, instrumented: ``(seconds, parts)`` of the slowest rank."""
    prompt = np.arange(n_prompt) % model.config.n_vocab
    cache = model.new_cache(n_prompt)
    with Breakdown(model) as b:
        model.comm.Barrier()
        t = time.perf_counter()
        model.forward(prompt, cache, gather=False)
        own = time.perf_counter() - t
        return slowest(model.comm, own, b.parts(own))


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
    (every prompt alone, and choosing the first tokens), of its decode steps (one forward for the whole batch
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
