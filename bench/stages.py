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
from mpitp.pipeline import HEAD, generate_stages, micro_batches
from mpitp.sampling import Sampler
from mpitp.sharding import shard_for
from mpitp.stages import layer_counts, place, split_stages, stage_forward
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


def stage_model(config, comm, dtype, pp, given=None, comm_dtype=None, seed=0):
    """A random-weight model of ``config``'s shapes on ``pp`` stages of ``comm``'s ranks (``given`` layers each, or
    ``layer_counts``' split), each rank drawing only its stage's layers and its shard of them
    (``RandomCheckpoint``), its pipe communicator a ``RecvTimer``, its reductions in ``comm_dtype``
    (``Model.sync_in``)."""
    tp, group = split_stages(RecvTimer(comm), pp)
    shard = shard_for(config, tp.Get_rank(), tp.Get_size())
    stage = place(group, layer_counts(config, group, given))
    ckpt = RandomCheckpoint(config, seed, comm.Get_rank())
    model = Model(config, shard, *load_weights(ckpt, config, shard, dtype, part=stage), tp, dtype)
    model.stage = stage
    return model.sync_in(comm_dtype)


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


TAG_PROBE = 300  # the link probe's messages (no pipeline runs meanwhile)


def stage_costs(model, rows, n_kv, iters=8):
    """Seconds of each stage's part of one decode step of a micro-batch of ``rows`` sequences against ``n_kv``
    cached positions, the last stage's LM head and greedy choice included: every stage timed at once (as they
    run in the pipeline), the median of ``iters``, the slowest rank of each stage; the list, on every rank. Left
    out: with several ranks a stage, the gathering of a received message's columns and the tokens' broadcast
    inside the first stage (a few small collectives within a node), so the projection comes out a little high."""
    stage, cfg = model.stage, model.config
    cache = model.new_cache(n_kv + 1, rows)
    x = (np.zeros(rows, np.int64) if stage.is_first else
         np.random.default_rng(0).standard_normal((rows, cfg.n_embd)).astype(model.dtype))
    times = []
    for _ in range(iters + 1):  # the first is a warm-up
        cache.reset()
        cache.advance(n_kv)
        stage.pipe.Barrier()
        t = time.perf_counter()
        y = stage_forward(model, cache, 1, x)
        if stage.is_last:
            Sampler().choose_rows(model.comm, model.lm_head(y), model.shard.vocab_start, 0)
        times.append(time.perf_counter() - t)
    own = stage.pipe.allgather(float(np.median(times[1:])))
    return [max(own[i * stage.tp:(i + 1) * stage.tp]) for i in range(stage.count)]


def hop_costs(model, rows, width, rounds=8, min_seconds=0.2, burst_bytes=1_000_000):
    """The link between stage s and s + 1 as a decode step uses it, for each s in turn (seconds, the largest over
    the boundaries and ranks): "idle_s", a micro-batch's message (a header of ``width`` ints, then each rank's
    columns of ``rows`` rows) from a stage to the next on an idle link; "stream_s", one such message when they
    follow back to back, after ``burst_bytes`` of them spent any burst a token bucket (tc's tbf) allows; and
    "tokens_s", the tokens' message (2 ints a sequence) on an idle link. Idle: half a round trip (less the
    answer's half), the median of ``rounds`` after pauses that let a bucket refill."""
    stage, pipe = model.stage, model.stage.pipe
    msg = [np.zeros(width, np.int64), np.zeros((rows, -(-model.config.n_embd // stage.tp)), model.dtype)]
    tokens = np.zeros(2 * rows, np.int64)
    found = []
    for s in range(stage.count - 1):
        pipe.Barrier()
        if stage.index in (s, s + 1):
            sender, peer = stage.index == s, stage.peer(s + 1 if stage.index == s else s)
            link = _Probe(pipe, peer, sender)
            back = float(np.median([link.round_trip([tokens], tokens) for _ in range(rounds + 1)][1:])) / 2
            idle = float(np.median([link.round_trip(msg, tokens) for _ in range(rounds + 1)][1:])) - back
            found.append((idle, link.stream(msg, tokens, burst_bytes, min_seconds), back))
    most = [mpi.max_over_ranks(pipe, max((f[i] for f in found), default=0.0)) for i in range(3)]
    return {"idle_s": most[0], "stream_s": most[1], "tokens_s": most[2],
            "message_bytes": sum(a.nbytes for a in msg)}


class _Probe:
    """Messages between this rank and ``peer`` of ``pipe``, the ``sender`` or its receiver, timed."""

    def __init__(self, pipe, peer, sender):
        self.pipe, self.peer, self.sender = pipe, peer, sender

    def _send(self, arrays):
        for a in arrays:
            mpi.send(self.pipe, a, self.peer, TAG_PROBE)

    def _recv(self, arrays):
        for a in arrays:
            mpi.recv(self.pipe, a, self.peer, TAG_PROBE)

    def round_trip(self, arrays, answer, pause=0.05):
        """Seconds for ``arrays`` one way and ``answer`` back, after ``pause`` (an idle link)."""
        time.sleep(pause)
        t = time.perf_counter()
        if self.sender:
            self._send(arrays)
            self._recv([answer])
        else:
            self._recv(arrays)
            self._send([answer])
        return time.perf_counter() - t

    def stream(self, arrays, answer, burst_bytes, min_seconds):
        """Seconds per ``arrays`` sent back to back (in batches of about ``burst_bytes``, each answered), timed
        from the end of the first batch until ``min_seconds`` passed (the sender decides, and says so)."""
        n = int(-(-burst_bytes // sum(a.nbytes for a in arrays)))
        go, count, t = np.ones(1, np.int64), -n, time.perf_counter()
        while go[0]:
            for _ in range(n):
                (self._send if self.sender else self._recv)(arrays)
            (self._recv if self.sender else self._send)([answer])
            count += n
            if count == 0:
                t = time.perf_counter()
            if self.sender:
                go[0] = count == 0 or time.perf_counter() - t < min_seconds
            (self._send if self.sender else self._recv)([go])
        return (time.perf_counter() - t) / count


def project_stages(costs, hop, n_micro, n_batch):
    """Decode tokens/s of ``n_batch`` sequences in ``n_micro`` micro-batches through stages of ``costs`` seconds
    each (``stage_costs``) joined by ``hop`` (``hop_costs``), and what binds. A micro-batch's step is a cycle:
    through every stage and across every boundary, then its tokens back to the first. With ``n_micro`` of them
    in flight a step takes the longest of that cycle, the busiest stage's ``n_micro`` parts, and a boundary
    carrying ``n_micro`` messages back to back (each way is its own direction of the link)."""
    bounds = {"cycle": sum(costs) + (len(costs) - 1) * hop["idle_s"] + hop["tokens_s"],
              "busiest stage": n_micro * max(costs), "link rate": n_micro * hop["stream_s"]}
    bound = max(bounds, key=bounds.get)
    return {"tokens_per_s": n_batch / bounds[bound], "bound": bound, "stage_ms": [1e3 * c for c in costs],
            "step_ms": {k: 1e3 * v for k, v in bounds.items()},
            "hop_ms": {k[:-2] + "_ms": 1e3 * v for k, v in hop.items() if k.endswith("_s")},
            "hop_message_bytes": hop["message_bytes"]}


def run_stages(args, comm, model, name, threads, sizes, progress):
    """The record of ``--pp``: one entry per batch size (the mean of ``--batch-repeats`` runs after a warm-up)."""
    start, rng, out = machine_state(), np.random.default_rng(0), []
    for b in sizes:
        progress(f"pipeline: batch {b}")
        prompts = [rng.integers(0, model.config.n_vocab, args.batch_prompt) for _ in range(b)]
        if not out:
            stage_run(model, prompts, 2)
        s, groups = model.stage, micro_batches(b, model.stage.count)
        rows = max(n for _, n in groups)
        costs = stage_costs(model, rows, args.batch_prompt + args.batch_gen // 2)
        hop = hop_costs(model, rows, HEAD + rows)
        runs = [stage_run(model, prompts, args.batch_gen) for _ in range(args.batch_repeats)]
        waits = np.mean([r["wait_share"] for r in runs], axis=0)
        per_stage = [float(waits[i * s.tp:(i + 1) * s.tp].mean()) for i in range(s.count)]
        out.append({"n_batch": b, "runs": runs, "stage_wait_share": per_stage, "bubble": float(np.mean(per_stage)),
                    **{k: float(np.mean([r[k] for r in runs])) for k in ("prefill_tokens_per_s",
                                                                          "decode_tokens_per_s", "seconds")}})
        projection = out[-1]["projection"] = project_stages(costs, hop, len(groups), b)
        projection["error_percent"] = 100 * (projection["tokens_per_s"] / out[-1]["decode_tokens_per_s"] - 1)
    s = model.stage
    return {"model": name, "ranks": comm.Get_size(), "pp": s.count, "tp": s.tp, "layers": list(s.counts),
            "threads": threads, "dtype": np.dtype(model.dtype).name,
            "comm_dtype": args.comm_dtype or np.dtype(model.dtype).name, "n_prompt": args.batch_prompt,
            "n_gen": args.batch_gen, "pipeline": out, "environment": environment(comm, threads, start)}


def format_stages(rec):
    """The table of ``run_stages``'s record."""
    head = ["B", "prefill t/s", "decode t/s", "projected t/s", "error", "bound", "stage ms", "hop ms", "bubble",
            "wait per stage"]
    rows = [[str(e["n_batch"]), f"{e['prefill_tokens_per_s']:.1f}", f"{e['decode_tokens_per_s']:.2f}"]
            + ([f"{p['tokens_per_s']:.2f}", f"{p['error_percent']:+.1f}%", p["bound"],
                " ".join(f"{c:.2f}" for c in p["stage_ms"]), f"{p['hop_ms']['idle_ms']:.2f}"]
               if (p := e.get("projection")) else ["-"] * 5)  # records before 2026-12-07 have none
            + [f"{100 * e['bubble']:.0f}%", " ".join(f"{100 * w:.0f}%" for w in e["stage_wait_share"])]
            for e in rec["pipeline"]]
    return (f"# pipeline: {rec['model']}, {rec['dtype']}, {rec['pp']} stages of {rec['tp']} rank(s), layers "
            f"{','.join(map(str, rec['layers']))}; {rec['n_prompt']}-token prompts, {rec['n_gen']} new tokens each; "
            f"bubble = the share of the run a stage waited for another (mean over stages); projected = decode from "
            f"each stage's part of a step and the link between stages, measured alone (stage ms: per micro-batch; "
            f"hop ms: a micro-batch's rows to the next stage on an idle link)\n"
            + markdown(head, rows, left={5, 9}))
