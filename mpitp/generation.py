"""Generation: prefill the prompts, then decode one token per sequence per step against the KV caches.

Several prompts of different lengths run as one batch: each has its own cache, positions and stop, and the
weights are read once per step for all of them. Rank 0 chooses every token and broadcasts the tokens with
their stop flags, so every rank runs the same forwards and leaves the loop together. With a vocab-parallel
head the choice is made from every rank's slice of the logits without gathering them (``mpitp.sampling``).
"""

import time
from dataclasses import dataclass, field

import numpy as np

from . import comm as mpi
from .errors import MpitpError, RequestError
from .memory import check_fits
from .sampling import Sampler


@dataclass
class Timing:
    """Wall-clock time of one generation run (a batch shares one)."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0  # the prefill forward and choosing the first tokens
    decode_tokens: int = 0  # tokens produced by forwards after the prefill
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self):
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else None

    @property
    def decode_tokens_per_s(self):
        return self.decode_tokens / self.decode_seconds if self.decode_tokens and self.decode_seconds > 0 else None


@dataclass
class Generation:
    """One sequence's result (identical on every rank)."""

    prompt_ids: list
    token_ids: list = field(default_factory=list)  # newly generated ids only
    finish_reason: str = "length"  # "length" or "eos"
    timing: Timing = field(default_factory=Timing)

    @property
    def prefill_tokens_per_s(self):
        return self.timing.prefill_tokens_per_s

    @property
    def decode_tokens_per_s(self):
        return self.timing.decode_tokens_per_s


def check_request(model, prompt_ids, max_new_tokens):
    """Raise ``RequestError`` if the request cannot be served; return the prompt as int64 ids."""
    prompt = model.check_tokens(prompt_ids)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise RequestError(f"max-new-tokens must be an integer >= 0, got {max_new_tokens!r}.")
    n_ctx = model.config.n_ctx
    if len(prompt) + max_new_tokens > n_ctx:
        raise RequestError(f"the prompt ({len(prompt)} tokens) plus max-new-tokens ({max_new_tokens}) is "
                           f"{len(prompt) + max_new_tokens} tokens, more than the model's context of {n_ctx}.")
    return prompt


def check_batch(model, prompts, max_new_tokens):
    """``check_request`` for every prompt, and all their KV caches together against the memory available."""
    if not prompts:
        raise RequestError("there is no prompt to generate from.")
    prompts = [check_request(model, p, max_new_tokens) for p in prompts]
    total = sum(model.cache_bytes(len(p) + max_new_tokens) for p in prompts)
    check_fits(total, f"the KV caches of {len(prompts)} sequence(s)", "ask for fewer tokens or fewer prompts, "
               "or use more ranks or nodes")
    return prompts


def _choose(model, sampler, logits, step, root):
    """Token ``step`` of one sequence from its last position's logits (this rank's slice); valid on root."""
    if model.vocab_parallel:  # every rank takes part; the root learns the token
        return sampler.choose(model.comm, logits, model.shard.vocab_start, step, root)
    if model.comm.Get_rank() == root:  # whole logits on every rank: the root decides alone
        return sampler.choose(mpi.serial(), logits, 0, step)
    return None


def generate_batch(model, prompts, max_new_tokens, sampler=None, stop_ids=(), trace=None, root=0,
                   on_token=None, profile=None):
    """Generate up to ``max_new_tokens`` tokens after each of ``prompts``, as one batch, on every rank.

    Each sequence comes out exactly as it would alone (its own positions, cache, stop and sampling steps).

    Parameters
    ----------
    model : Model
    prompts : list of sequences of int
    max_new_tokens : int
    sampler : Sampler, optional
        Default: greedy.
    stop_ids : iterable of int
        A sequence stops after generating one of these (e.g. the model's eos ids).
    trace : Trace, optional
        Records every step; step 0 is the prefill with logits for every prompt position (rows of all
        sequences stacked in order).
    root : int
        The rank that chooses tokens.
    on_token : callable(sequence_index, token_id), optional
        Called on every rank as soon as every rank knows a new token (for streaming).
    profile : Profile, optional
        Accumulates the time of the decode forwards per category (the benchmark's breakdown).

    Returns
    -------
    list of Generation
    """
    # Validate and allocate, then agree: the memory checks depend on each rank's machine, and no rank may
    # go on to the first collective of the forward while another has failed.
    error = None
    try:
        prompts = check_batch(model, prompts, max_new_tokens)
        caches = [model.new_cache(len(p) + max(max_new_tokens - 1, 0)) for p in prompts]
    except MpitpError as e:
        error = e
    messages = mpi.allgather(model.comm, None if error is None else str(error))
    if any(m is not None for m in messages):
        raise error or RequestError(next(m for m in messages if m is not None))
    sampler = sampler or Sampler()
    stop_ids = set(stop_ids)
    timing = Timing(prefill_tokens=sum(len(p) for p in prompts))
    results = [Generation(prompt_ids=[int(t) for t in p], timing=timing) for p in prompts]
    if trace is not None:
        trace.record_shard(model.shard)
    t0 = time.perf_counter()
    # gather=False: a vocab-parallel model keeps each rank's logits to its own vocabulary range.
    logits = model.forward_batch(list(zip(prompts, caches)), trace=trace, all_logits=trace is not None,
                                 gather=False)
    if max_new_tokens == 0:
        timing.prefill_seconds = time.perf_counter() - t0
        return results
    active = list(range(len(prompts)))
    is_root = model.comm.Get_rank() == root
    while True:
        # Every rank runs the same choices (collective when the head is vocab-parallel); root decides.
        tokens = [_choose(model, sampler, logits[k][-1], len(results[i].token_ids), root)
                  for k, i in enumerate(active)]
        dones = [is_root and (t in stop_ids or len(results[i].token_ids) + 1 >= max_new_tokens)
                 for t, i in zip(tokens, active)]
        sent = mpi.bcast_ints(model.comm, [t if is_root else 0 for t in tokens] + dones, root=root)
        tokens, dones = sent[:len(active)], sent[len(active):]
        for i, token, done in zip(active, tokens, dones):
            results[i].token_ids.append(token)
            if on_token is not None:
                on_token(i, token)
            if done:
                results[i].finish_reason = "eos" if token in stop_ids else "length"
        if timing.prefill_seconds == 0.0:
            t1 = time.perf_counter()
            timing.prefill_seconds = t1 - t0
        next_active = [i for i, done in zip(active, dones) if not done]
        if not next_active:
            break
        if trace is not None:
            trace.next_step()
        feed = [([results[i].token_ids[-1]], caches[i]) for i in next_active]
        logits = model.forward_batch(feed, trace=trace, all_logits=trace is not None, gather=False, profile=profile)
        timing.decode_tokens += len(next_active)
        active = next_active
    timing.decode_seconds = time.perf_counter() - t1
    return results


def generate_sequence(model, prompt_ids, max_new_tokens, sampler=None, stop_ids=(), trace=None, root=0,
                      on_token=None, profile=None):
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` on every rank of ``model.comm``.

    See ``generate_batch`` (this is a batch of one; ``on_token`` takes just the token id). Returns a
    ``Generation``.
    """
    callback = None if on_token is None else (lambda i, token: on_token(token))
    return generate_batch(model, [prompt_ids], max_new_tokens, sampler, stop_ids, trace, root, callback,
                          profile)[0]
