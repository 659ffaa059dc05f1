"""Generation: prefill the prompts, then decode one token per sequence per step against the KV cache.

The prompts of a batch are prefilled into their rows of the cache, each run of prompts of one length as one
forward (``equal_runs``); then each step decodes one token of every unfinished sequence in one forward,
reading the weights once for all. Rank 0 chooses every token from the ranks' slices of the logits
(``mpitp.sampling``) and broadcasts them with their stop flags: every rank runs the same forwards and leaves the
loop together. A finished sequence leaves the batch (and the cache)."""

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from . import comm as mpi
from .errors import RequestError
from .sampling import Sampler


@dataclass
class Timing:
    """Wall-clock time of one generation run (a batch shares one). Rates are None when nothing was timed."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0  # the prefill forwards and choosing the first tokens
    decode_tokens: int = 0  # tokens produced by forwards after the prefill
    decode_seconds: float = 0.0

    prefill_tokens_per_s = property(lambda t: t.prefill_tokens / t.prefill_seconds if t.prefill_seconds else None)
    decode_tokens_per_s = property(lambda t: t.decode_tokens / t.decode_seconds if t.decode_tokens else None)


@dataclass
class Generation:
    """One sequence's result (identical on every rank)."""

    prompt_ids: list
    token_ids: list = field(default_factory=list)  # newly generated ids only
    finish_reason: str = "length"  # "length" or "eos"
    timing: Timing = field(default_factory=Timing)


def check_request(model, prompts, max_new_tokens):
    """Raise ``RequestError`` unless the prompts and ``max_new_tokens`` can be served; return the prompts
    as int64 arrays. The one place a request is validated: the forward trusts what passes here."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise RequestError(f"max-new-tokens must be an integer >= 0, got {max_new_tokens!r}.")
    if len(prompts) == 0:
        raise RequestError("there is no prompt to generate from.")
    checked, n_vocab, n_ctx = [], model.config.n_vocab, model.config.n_ctx
    for prompt in prompts:
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise RequestError(f"a prompt must be a non-empty list of token ids, got {prompt!r}.")
        for bad in ids[(ids < 0) | (ids >= n_vocab)][:1]:
            raise RequestError(f"token id {int(bad)} is outside the vocabulary 0..{n_vocab - 1}.")
        if len(ids) + max_new_tokens > n_ctx:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus max-new-tokens ({max_new_tokens}) is "
                               f"{len(ids) + max_new_tokens} tokens, more than the model's context of {n_ctx}.")
        checked.append(ids.astype(np.int64))
    return checked


def new_batch_cache(model, prompts, max_new_tokens):
    """The KV cache a batch needs (checked against the memory available before it is allocated)."""
    return model.new_cache(max(len(p) for p in prompts) + max(max_new_tokens - 1, 0), len(prompts))


def equal_runs(prompts, stack=True):
    """``(first, count)`` of each run of consecutive prompts of one length (each prompt alone unless ``stack``):
    a run goes through as one forward ``[count, length]``: each row's attention sees only its own sequence, so
    its logits are those of its prompt alone up to the rounding of products with more rows (as in a batch's
    decode steps)."""
    runs = []
    for b, p in enumerate(prompts):
        if stack and runs and len(prompts[runs[-1][0]]) == len(p):
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return runs


def generate_batch(model, prompts, max_new_tokens, sampler=None, stop_ids=(), trace=None, root=0,
                   on_token=None, cache=None):
    """Generate up to ``max_new_tokens`` tokens after each of ``prompts`` (lists of ids), as one batch, on every
    rank; returns a ``Generation`` per prompt, each as it would come out alone.

    ``sampler``: a ``Sampler`` (default greedy), whose choices the ``root`` rank makes. ``stop_ids``: a sequence
    stops after generating one of these (e.g. the model's eos ids). ``trace``: a ``Trace`` that records every
    forward. ``on_token(sequence_index, token_id)`` is called on every rank once every rank knows a new token (for
    streaming). ``cache``: from ``new_batch_cache``, when the caller allocated it before its ranks agreed to go on.
    """
    prompts = check_request(model, prompts, max_new_tokens)
    if cache is None:  # the memory check can fail on some ranks only: they agree before the first collective
        try:
            cache = new_batch_cache(model, prompts, max_new_tokens)
        finally:  # a rank that failed takes part too, then raises its own error
            if mpi.max_over_ranks(model.comm, cache is None) and cache is not None:  # another failed
                raise RequestError("another rank could not allocate its KV cache; see its error.")
    sampler = sampler or Sampler()
    if sampler.top_k >= model.config.n_vocab:  # every token: no limit, without gathering k candidates per rank
        sampler = Sampler(sampler.temperature, 0, sampler.top_p, sampler.seed)
    stop_ids = set(stop_ids)
    timing = Timing(prefill_tokens=sum(len(p) for p in prompts))
    results = [Generation(prompt_ids=p.tolist(), timing=timing) for p in prompts]
    recording = trace if trace is not None else contextlib.nullcontext()
    if trace is not None:
        trace.record_shard(model.shard)
    is_root = model.comm.Get_rank() == root
    t0 = time.perf_counter()
    with recording:  # the prefill: prompts into their rows of the cache, logits of each one's last position
        logits = [row for b, n in equal_runs(prompts, trace is None) for row in model.forward(
            np.stack(prompts[b:b + n]), cache.row(b, n), all_logits=trace is not None, gather=False)[:, -1]]
    if max_new_tokens == 0:
        timing.prefill_seconds = time.perf_counter() - t0
        return results
    rows = list(range(len(prompts)))  # the sequence in each row of the cache: a finished one leaves the batch
    for step in range(max_new_tokens):
        # Every rank takes part in each choice; root decides, then tells every rank the tokens and stops.
        tokens = sampler.choose_rows(model.comm, logits, model.shard.vocab_start, step, root)
        dones = [is_root and (t in stop_ids or step + 1 >= max_new_tokens) for t in tokens]
        sent = mpi.bcast_ints(model.comm, [t if is_root else 0 for t in tokens] + dones, root=root)
        tokens, dones = sent[:len(rows)], sent[len(rows):]
        for b, token, done in zip(rows, tokens, dones):
            results[b].token_ids.append(token)
            if on_token is not None:
                on_token(b, token)
            if done:
                results[b].finish_reason = "eos" if token in stop_ids else "length"
        if step == 0:
            t1 = time.perf_counter()
            timing.prefill_seconds = t1 - t0
        if all(dones):
            break
        if any(dones):
            cache.keep([k for k, done in enumerate(dones) if not done])
            rows = [b for b, done in zip(rows, dones) if not done]
        if trace is not None:
            trace.next_step()
        with recording:  # one token of every unfinished sequence: [n_batch, 1] ids
            logits = model.forward(np.array([[results[b].token_ids[-1]] for b in rows]), cache,
                                   all_logits=trace is not None, gather=False)[:, -1]
        timing.decode_tokens += len(rows)
    timing.decode_seconds = time.perf_counter() - t1
    return results


def generate_sequence(model, prompt_ids, max_new_tokens, sampler=None, stop_ids=(), trace=None, root=0, on_token=None):
    """``generate_batch`` of one prompt; ``on_token`` takes just the token id. Returns a ``Generation``."""
    callback = None if on_token is None else (lambda b, token: on_token(token))
    return generate_batch(model, [prompt_ids], max_new_tokens, sampler, stop_ids, trace, root, callback)[0]
