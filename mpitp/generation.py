"""Generation: prefill the prompt, then decode one token at a time against the KV cache.

Rank 0 chooses each token and broadcasts it with a stop flag, so every rank runs the same number of
forwards and leaves the loop together. With a vocab-parallel head the choice is made from every rank's
slice of the logits without gathering them (see ``mpitp.sampling``).
"""

import time
from dataclasses import dataclass, field

from . import comm as mpi
from .errors import RequestError
from .memory import check_fits
from .sampling import Sampler


@dataclass
class Generation:
    """The result of ``generate`` (identical on every rank)."""

    prompt_ids: list
    token_ids: list = field(default_factory=list)  # newly generated ids only
    finish_reason: str = "length"  # "length" or "eos"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # forwards after the prefill (each yields one more token)

    @property
    def prefill_tokens_per_s(self):
        return len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds > 0 else None

    @property
    def decode_tokens_per_s(self):
        n = len(self.token_ids) - 1  # the first new token comes from the prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else None


def check_request(model, prompt_ids, max_new_tokens):
    """Raise ``RequestError`` if the request cannot be served; return the prompt as int64 ids."""
    prompt = model.check_tokens(prompt_ids)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise RequestError(f"max-new-tokens must be an integer >= 0, got {max_new_tokens!r}.")
    n_ctx = model.config.n_ctx
    if len(prompt) + max_new_tokens > n_ctx:
        raise RequestError(f"the prompt ({len(prompt)} tokens) plus max-new-tokens ({max_new_tokens}) is "
                           f"{len(prompt) + max_new_tokens} tokens, more than the model's context of {n_ctx}.")
    check_fits(model.cache_bytes(len(prompt) + max_new_tokens), f"a KV cache of {len(prompt) + max_new_tokens} "
               "positions", "ask for fewer tokens, or use more ranks or nodes")
    return prompt


def next_token(model, sampler, logits, step, stop_ids, max_new_tokens, root=0):
    """Choose token ``step`` from the last position's logits (this rank's slice of them) and tell every rank.

    Returns ``(token, done)`` on every rank; ``done`` when the token stops generation or is the last one.
    """
    is_root = model.comm.Get_rank() == root
    token = None
    if model.vocab_parallel:  # every rank takes part; the root learns the token
        token = sampler.choose(model.comm, logits, model.shard.vocab_start, step, root)
    elif is_root:  # whole logits on every rank: the root decides alone
        token = sampler.choose(mpi.serial(), logits, 0, step)
    done = is_root and (token in stop_ids or step + 1 >= max_new_tokens)
    token, done = mpi.bcast_ints(model.comm, [token if is_root else 0, done], root=root)
    return token, bool(done)


def generate(model, prompt_ids, max_new_tokens, sampler=None, stop_ids=(), trace=None, root=0):
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` on every rank of ``model.comm``.

    Parameters
    ----------
    model : Model
    prompt_ids : sequence of int
    max_new_tokens : int
    sampler : Sampler, optional
        Used on ``root`` only. Default: greedy.
    stop_ids : iterable of int
        Stop after generating one of these (e.g. the model's eos ids).
    trace : Trace, optional
        Records every step; step 0 is the prefill with logits for every prompt position.
    root : int
        The rank that chooses tokens.

    Returns
    -------
    Generation
    """
    prompt = check_request(model, prompt_ids, max_new_tokens)
    sampler = sampler or Sampler()
    stop_ids = set(stop_ids)
    result = Generation(prompt_ids=[int(t) for t in prompt])
    if trace is not None:
        trace.record_shard(model.shard)
    if max_new_tokens == 0:
        cache = model.new_cache(len(prompt))
        model.forward(prompt, cache, trace=trace, all_logits=trace is not None)
        return result
    cache = model.new_cache(len(prompt) + max_new_tokens - 1)
    t0 = time.perf_counter()
    # gather=False: a vocab-parallel model keeps each rank's logits to its own vocabulary range.
    logits = model.forward(prompt, cache, trace=trace, all_logits=trace is not None, gather=False)
    while True:
        token, done = next_token(model, sampler, logits[-1], len(result.token_ids), stop_ids, max_new_tokens,
                                 root)
        result.token_ids.append(token)
        if len(result.token_ids) == 1:
            t1 = time.perf_counter()
            result.prefill_seconds = t1 - t0
        if done:
            result.finish_reason = "eos" if token in stop_ids else "length"
            break
        if trace is not None:
            trace.next_step()
        logits = model.forward([token], cache, trace=trace, all_logits=trace is not None, gather=False)
    result.decode_seconds = time.perf_counter() - t1
    return result
