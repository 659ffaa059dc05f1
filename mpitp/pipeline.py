"""Generation across pipeline stages (``--pp``): the residual rows go from stage to stage with Send/Recv, the
chosen tokens come back to the first stage, and micro-batches keep every stage busy.

A batch is cut into micro-batches of consecutive sequences (as many as stages, at most one per sequence), each with
its rows of the KV cache. The first stage runs the prompts one by one through its layers and sends each on (GPipe's
fill and drain), then decodes the micro-batches in turn: while the last stage chooses one micro-batch's tokens, the
others work on the next ones. Each message is a header (what the rows are, which sequences are left) and the rows
``[n_rows, n_embd]``, which every rank of a stage holds whole: tensor-parallel rank t sends its 1/T of the columns
to its peer in the next stage, which gathers them (``Allgatherv`` within its stage, on the node), so the link
between two nodes carries the rows once, not T times, and the T links of a wider cluster share them. The last
stage chooses each token as ``generate_batch`` does (the
same sampler, step and logits: the same tokens) and sends the tokens and their stop flags to the first stage,
whose next header tells the stages between which sequences have finished. The first stage ends with an "end"
header; every rank then learns the results from rank 0.
"""

import contextlib
import time

import numpy as np

from . import comm as mpi
from .errors import RequestError
from .generation import Generation, Timing, check_request, new_batch_cache
from .kvcache import most_new
from .sampling import Sampler
from .sharding import block_range
from .stages import stage_forward

PREFILL, DECODE, END = 0, 1, 2  # a header's kind
TAG_HEADER, TAG_ROWS, TAG_TOKENS = 261, 262, 263
# A header: kind, micro-batch, step, n_seq, the prompt's row in its micro-batch, last chunk of the prompt, last
# prompt of the micro-batch, then (decode) how many of the micro-batch's rows are left and which.
HEAD = 8


def micro_batches(n_batch, n_stages, count=None):
    """``(first sequence, sequences)`` of each micro-batch: ``count`` (default: one per stage) near-equal groups of
    consecutive sequences, at most one per sequence."""
    m = min(n_batch, count or n_stages)
    return [block_range(n_batch, m, i) for i in range(m)]


class _Link:
    """This rank's messages to its peers in the next, previous, first and last stages."""

    def __init__(self, model, width):
        self.model, self.stage, self.width = model, model.stage, width  # width: the longest header
        self.pending = []  # token messages in flight, with their buffers (alive until sent)
        tp, n_embd = model.comm.Get_size(), model.config.n_embd
        self.counts = [block_range(n_embd, tp, t)[1] for t in range(tp)]  # the columns each peer sends
        start, count = block_range(n_embd, tp, model.comm.Get_rank())
        self.cols = slice(start, start + count)

    def send(self, header, x):  # to the next stage: the header, then this rank's columns of the rows
        nxt = self.stage.peer(self.stage.index + 1)
        buf = np.zeros(self.width, np.int64)  # every header as long as the longest: one Recv size
        buf[:len(header)] = header
        mpi.send(self.stage.pipe, buf, nxt, TAG_HEADER)
        if header[0] != END:
            mpi.send(self.stage.pipe, x[:, self.cols], nxt, TAG_ROWS)

    def recv(self):  # from the previous stage: (header, rows), the rows' columns gathered from the stage's ranks
        prev = self.stage.peer(self.stage.index - 1)
        header = mpi.recv(self.stage.pipe, np.empty(self.width, np.int64), prev, TAG_HEADER)
        if header[0] == END:
            return header, None
        n_rows = (header[7] if header[0] == DECODE else 1) * header[3]
        part = mpi.recv(self.stage.pipe, np.empty((n_rows, self.cols.stop - self.cols.start), self.model.dtype),
                        prev, TAG_ROWS)
        return header, mpi.allgather_columns(self.model.comm, part, self.counts)

    def send_tokens(self, values):  # last stage -> first: without waiting, so that no stage waits in a circle
        buf = np.asarray(values, np.int64)
        self.pending.append((mpi.isend(self.stage.pipe, buf, self.stage.peer(0), TAG_TOKENS), buf))

    def recv_tokens(self, n):  # first stage <- last: n tokens and their n stop flags
        got = mpi.recv(self.stage.pipe, np.empty(2 * n, np.int64), self.stage.peer(self.stage.count - 1), TAG_TOKENS)
        return got[:n].tolist(), got[n:].tolist()

    def close(self):
        mpi.wait_all([request for request, _ in self.pending])


def generate_stages(model, prompts, max_new_tokens, sampler=None, stop_ids=(), trace=None, root=0, on_token=None,
                    cache=None, n_micro=None):
    """``generate_batch`` on a model loaded with ``pp`` > 1 (``Model.load``): the same results, on every rank;
    ``on_token`` is called on the first stage's ranks. ``n_micro``: micro-batches (default one per stage)."""
    if root != 0:
        raise RequestError("with pipeline stages, rank 0 (of the first stage) talks to the user: root must be 0.")
    prompts = check_request(model, prompts, max_new_tokens)
    if n_micro is not None and (isinstance(n_micro, bool) or not isinstance(n_micro, int) or n_micro < 1):
        raise RequestError(f"n_micro must be an integer >= 1 (micro-batches), got {n_micro!r}.")
    pipe = model.stage.pipe
    if cache is None:  # the memory check can fail on some ranks only: they agree before the first message
        try:
            cache = new_batch_cache(model, prompts, max_new_tokens)
        finally:
            if mpi.max_over_ranks(pipe, cache is None) and cache is not None:
                raise RequestError("another rank could not allocate its KV cache; see its error.")
    sampler = sampler or Sampler()
    if sampler.top_k >= model.config.n_vocab:
        sampler = Sampler(sampler.temperature, 0, sampler.top_p, sampler.seed)
    groups = micro_batches(len(prompts), model.stage.count, n_micro)
    caches = [cache.row(start, n) for start, n in groups]
    link = _Link(model, HEAD + max(n for _, n in groups))
    timing = Timing(prefill_tokens=sum(map(len, prompts)))  # one for the batch, as generate_batch's
    results = [Generation(prompt_ids=p.tolist(), timing=timing) for p in prompts]
    if trace is not None:
        trace.record_shard(model.shard)
        trace.record_stage(model.stage)
    run = dict(model=model, link=link, groups=groups, caches=caches, trace=trace, max_new=max_new_tokens)
    if model.stage.is_first:
        _first_stage(run, prompts, results, set(stop_ids), on_token)
    else:
        _later_stage(run, sampler, set(stop_ids))
    link.close()  # not after an error: its receiver may never come (the error aborts the job instead)
    return _share_results(pipe, results)


def _recording(trace, step):
    # ``with`` this: the trace (if any) records the forward as step ``step``
    if trace is None:
        return contextlib.nullcontext()
    trace.step = step
    return trace


def _first_stage(run, prompts, results, stop_ids, on_token):
    """The first stage: every prompt through its layers and on (the prefill), then one micro-batch after another,
    each once its tokens are back from the last stage, until every sequence has finished."""
    model, link, groups, caches = run["model"], run["link"], run["groups"], run["caches"]
    timing, t0 = results[0].timing, time.perf_counter()
    for m, (start, n) in enumerate(groups):
        for j in range(n):
            prompt, row = prompts[start + j], caches[m].row(j)
            # every stage's sliding layers must take the chunk: the whole model's rings, not only this stage's
            size = min(model.prefill_chunk(1, len(prompt)), most_new(row.capacity, model.config.windows))
            for i in range(0, len(prompt), size):
                ids = prompt[i:i + size]
                with _recording(run["trace"], 0):
                    x = stage_forward(model, row, len(ids), ids)
                end = i + size >= len(prompt)
                link.send([PREFILL, m, 0, len(ids), j, end, end and j == n - 1], x)
    alive = [list(range(start, start + n)) for start, n in groups]  # the sequences left in each micro-batch
    steps, active = [0] * len(groups), list(range(len(groups))) if run["max_new"] else []
    while active:
        for m in list(active):
            tokens, dones = link.recv_tokens(len(alive[m]))
            for b, token, done in zip(alive[m], tokens, dones):
                results[b].token_ids.append(token)
                if on_token is not None:
                    on_token(b, token)
                if done:
                    results[b].finish_reason = "eos" if token in stop_ids else "length"
            if steps[m] == 0 and m == len(groups) - 1:
                timing.prefill_seconds, t1 = time.perf_counter() - t0, time.perf_counter()
            keep = [k for k, done in enumerate(dones) if not done]
            alive[m] = [alive[m][k] for k in keep]
            if not keep:
                active.remove(m)
                continue
            steps[m] += 1
            if len(keep) < len(dones):
                caches[m].keep(keep)
            with _recording(run["trace"], steps[m]):
                x = stage_forward(model, caches[m], 1, np.array([tokens[k] for k in keep]))
            link.send([DECODE, m, steps[m], 1, 0, 0, 0, len(keep), *keep], x)
            timing.decode_tokens += len(keep)
    if run["max_new"]:
        timing.decode_seconds = time.perf_counter() - t1
    else:
        timing.prefill_seconds = time.perf_counter() - t0
    link.send([END], None)


def _later_stage(run, sampler, stop_ids):
    """A stage after the first: each message in turn through its layers and on; the last stage chooses tokens
    (of a micro-batch once its last prompt is through, and at every decode step) and sends them back."""
    model, link, caches, trace = run["model"], run["link"], run["caches"], run["trace"]
    waiting = {}  # micro-batch -> the last-position logits of its prompts so far
    while True:
        header, x = link.recv()
        kind, m, step, n_seq, j, end, last = header[:7].tolist()
        if kind == END:
            if not model.stage.is_last:
                link.send(header, None)
            return
        cache = caches[m].row(j) if kind == PREFILL else caches[m]
        if kind == DECODE and header[7] < len(cache.lengths):  # sequences finished: they leave the cache
            cache.keep(header[HEAD:HEAD + header[7]].tolist())
        with _recording(trace, step):
            x = stage_forward(model, cache, n_seq, x)
            if not model.stage.is_last:
                link.send(header, x)
                continue
            logits = model.lm_head(x if trace is not None or kind == DECODE else x[-1:])
        if kind == PREFILL and end:
            waiting.setdefault(m, []).append(logits[-1])
        if (kind == PREFILL and last and run["max_new"]) or kind == DECODE:
            rows = waiting.pop(m) if kind == PREFILL else logits
            _choose(model, link, sampler, rows, step, stop_ids, run["max_new"])


def _choose(model, link, sampler, logits, step, stop_ids, max_new):
    """On the last stage: the next token of each row of ``logits`` ``[n, n_vocab_local]`` at ``step``, chosen by
    its rank 0 as ``generate_batch`` chooses it, told to the stage's ranks and sent to their first-stage peers."""
    is_root = model.comm.Get_rank() == 0
    tokens = sampler.choose_rows(model.comm, logits, model.shard.vocab_start, step, 0)
    dones = [is_root and (t in stop_ids or step + 1 >= max_new) for t in tokens]
    link.send_tokens(mpi.bcast_ints(model.comm, [t if is_root else 0 for t in tokens] + dones, root=0))


def _share_results(pipe, results):
    """Every rank's results: the first stage's (rank 0's), broadcast to every stage."""
    counts = mpi.bcast_ints(pipe, [len(r.token_ids) for r in results])
    mine = [t for r in results for t in r.token_ids] + [r.finish_reason == "eos" for r in results]
    flat = mpi.bcast_ints(pipe, mine if pipe.Get_rank() == 0 else [0] * (sum(counts) + len(results)))
    start = 0
    for r, n, eos in zip(results, counts, flat[sum(counts):]):
        r.token_ids, r.finish_reason = flat[start:start + n], "eos" if eos else "length"
        start += n
    return results
