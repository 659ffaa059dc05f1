"""``python -m bench --pp S``: batches through S pipeline stages (``mpitp.pipeline``) instead of the tensor-parallel
tests: per batch size of ``--batch``, prefill and decode tokens/s of ``--batch-prompt``-token prompts and
``--batch-gen`` new tokens each, and the bubble: the share of the run each stage waited in a Recv for rows or
tokens from another stage (the time it was idle, the pipeline not full). ``--pp 1`` is the usual bench on the same
ranks: the two side by side compare the layouts (``make bench-pp``, and across emulated nodes
``make bench-pp-cluster``).
"""

import time

import numpy as np

from mpitp import comm as mpi
from mpitp.model import Model
from mpitp.pipeline import generate_stages
from mpitp.sharding import shard_for
from mpitp.stages import layer_counts, place, split_stages
from mpitp.weights import load_weights

from .environment import environment, machine_state
from .models import RandomCheckpoint
from .report import markdown


class RecvTimer:
    """The pipe communicator, with the seconds its ``Recv`` calls waited (``seconds``); the rest passes through."""

    def __init__(self, comm):
        self.comm, self.seconds = comm, 0.0

    def Recv(self, *args, **kwargs):
        t = time.perf_counter()
        self.comm.Recv(*args, **kwargs)
        self.seconds += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self.comm, name)


def stage_model(config, comm, dtype, pp, seed=0):
    """A random-weight model of ``config``'s shapes on ``pp`` stages of ``comm``'s ranks, each rank drawing only its
    stage's layers and its shard of them (``RandomCheckpoint``), its pipe communicator a ``RecvTimer``."""
    tp, group = split_stages(RecvTimer(comm), pp)
    shard = shard_for(config, tp.Get_rank(), tp.Get_size())
    stage = place(group, layer_counts(config, group))
    ckpt = RandomCheckpoint(config, seed, comm.Get_rank())
    model = Model(config, shard, *load_weights(ckpt, config, shard, dtype, part=stage), tp, dtype)
    model.stage = stage
    return model


def stage_run(model, prompts, n_gen):
    """One ``generate_stages`` between barriers: tokens/s of its prefill and decode (the first stage's timing),
    the seconds of the whole call and each rank's share of it spent waiting in a Recv (all the slowest rank's)."""
    pipe = model.stage.pipe
    pipe.Barrier()
    pipe.seconds, t = 0.0, time.perf_counter()
    tm = generate_stages(model, prompts, n_gen)[0].timing
    seconds = mpi.max_over_ranks(pipe, time.perf_counter() - t)
    prefill, decode = pipe.bcast((tm.prefill_tokens_per_s, tm.decode_tokens_per_s), root=0)  # the first stage's
    return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "seconds": seconds,
            "wait_share": [w / seconds for w in pipe.allgather(pipe.seconds)]}


def run_stages(args, comm, model, name, threads, sizes, progress):
    """The record of ``--pp``: one entry per batch size (the mean of ``--batch-repeats`` runs after a warm-up)."""
    start, rng, out = machine_state(), np.random.default_rng(0), []
    for b in sizes:
        progress(f"pipeline: batch {b}")
        prompts = [rng.integers(0, model.config.n_vocab, args.batch_prompt) for _ in range(b)]
        if not out:
            stage_run(model, prompts, 2)
        runs = [stage_run(model, prompts, args.batch_gen) for _ in range(args.batch_repeats)]
        waits = np.mean([r["wait_share"] for r in runs], axis=0)
        s = model.stage
        per_stage = [float(waits[i * s.tp:(i + 1) * s.tp].mean()) for i in range(s.count)]
        out.append({"n_batch": b, "runs": runs, "stage_wait_share": per_stage, "bubble": float(np.mean(per_stage)),
                    **{k: float(np.mean([r[k] for r in runs])) for k in ("prefill_tokens_per_s",
                                                                          "decode_tokens_per_s", "seconds")}})
    s = model.stage
    return {"model": name, "ranks": comm.Get_size(), "pp": s.count, "tp": s.tp, "layers": list(s.counts),
            "threads": threads, "dtype": np.dtype(model.dtype).name, "n_prompt": args.batch_prompt,
            "n_gen": args.batch_gen, "pipeline": out, "environment": environment(comm, threads, start)}


def format_stages(rec):
    """The table of ``run_stages``'s record."""
    head = ["B", "prefill t/s", "decode t/s", "bubble", "wait per stage"]
    rows = [[str(e["n_batch"]), f"{e['prefill_tokens_per_s']:.1f}", f"{e['decode_tokens_per_s']:.2f}",
             f"{100 * e['bubble']:.0f}%", " ".join(f"{100 * w:.0f}%" for w in e["stage_wait_share"])]
            for e in rec["pipeline"]]
    return (f"# pipeline: {rec['model']}, {rec['dtype']}, {rec['pp']} stages of {rec['tp']} rank(s), layers "
            f"{','.join(map(str, rec['layers']))}; {rec['n_prompt']}-token prompts, {rec['n_gen']} new tokens each; "
            f"bubble = the share of the run a stage waited for another (mean over stages)\n"
            + markdown(head, rows, left={4}))
