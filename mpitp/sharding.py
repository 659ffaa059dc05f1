"""Sharding: which query heads, key/value heads, MLP columns and vocabulary ids rank r of P owns. Pure math.

``shard_for(config, rank, size)`` is the single source of truth for the split: weights, KV cache and trace
all use it. Every linear weight is stored ``[in, out]`` (a layer is ``x @ W``): a *column-parallel* weight (W_Q,
W_K, W_V, W_C) is split along its last axis, a *row-parallel* one (W_B, W_D) along its first, and its output is a
partial sum that an Allreduce completes. (Megatron's paper calls the *weights* A and B; here A..E are the seed
diagram's activations, and W_X is the weight that multiplies X.)

``rank_slice`` applies a family's plan (``mpitp.families``) to a weight: the one slice of it a rank holds.

Every range is a contiguous block of near-equal size (``block_range``), so any P from 1 to the number of
query heads runs: 9 heads over 2 ranks are 5 and 4. A rank holds the key/value heads its query heads use;
a key/value head whose group of query heads straddles two ranks is held, with its cache, by both.

A mixture of experts (``mpitp.experts``) is split in one of two layouts: ``tensor`` (every rank a range of every
expert's hidden columns, as the dense MLP's) or ``expert`` (whole experts, a contiguous block per rank: 6 over 4
ranks are 2, 2, 1, 1). ``EXPERT_LAYOUTS`` names them; ``default_layout`` picks one.
"""

from dataclasses import dataclass
from functools import cached_property

from .errors import ShardingError
from .families import FAMILIES


def block_range(n, size, rank):
    """``(start, count)`` of rank's block when ``n`` items are split over ``size`` ranks as evenly as possible."""
    base, extra = divmod(n, size)
    return rank * base + min(rank, extra), base + (rank < extra)


def check_rank_count(config, size, stages=1):
    """Raise ``ShardingError`` if ``size`` ranks (of each of ``stages`` pipeline stages) cannot split the model:
    each rank needs a query head, an MLP column and a vocabulary id."""
    limit, what = min((config.n_head, "attention heads"), (config.n_ffn, "MLP columns"),
                      (config.n_vocab, "vocabulary ids"), key=lambda t: t[0])  # the heads on a tie
    if not 1 <= size <= limit:
        where = f"{size} ranks (mpirun -n {size})" if stages == 1 else \
            f"stages of {size} ranks (mpirun -n {size * stages} --pp {stages})"
        fix = f"use -n 1 to {limit}" if stages == 1 else f"use a --pp that leaves 1 to {limit} ranks a stage"
        raise ShardingError(f"cannot run this model on {where}: each rank needs at least one of its {limit} {what}; "
                            f"{fix}.")


@dataclass(frozen=True)
class Shard:
    """What one rank owns: contiguous ranges of global indices into the full model."""

    rank: int
    size: int
    d_head: int
    group: int  # query heads per key/value head in the full model
    head_start: int  # first query head of this rank
    n_head_local: int
    kv_head_start: int  # first key/value head of this rank
    n_kv_head_local: int
    ffn_start: int  # first MLP hidden column of this rank
    n_ffn_local: int
    vocab_start: int  # first vocabulary id of this rank's embedding rows and LM-head columns
    n_vocab_local: int
    experts: str = ""  # a mixture of experts' layout, "tensor" or "expert" ("": a dense model)
    expert_start: int = 0  # first expert of this rank (all of them in the tensor layout)
    n_expert_local: int = 0
    expert_ffn_start: int = 0  # first hidden column of each of its experts (all of them in the expert layout)
    n_expert_ffn_local: int = 0

    # Ranges of the full weights. q_cols: W_Q's columns and W_B's rows; kv_cols: W_K's and W_V's columns;
    # ffn_cols: the columns of W_C (of W_gate and of W_up) and W_D's rows; vocab_cols: W_vocab's columns and
    # W_embed's rows, the vocabulary ids.
    q_cols = property(lambda s: slice(s.head_start * s.d_head, (s.head_start + s.n_head_local) * s.d_head))
    kv_cols = property(lambda s: slice(s.kv_head_start * s.d_head, (s.kv_head_start + s.n_kv_head_local) * s.d_head))
    ffn_cols = property(lambda s: slice(s.ffn_start, s.ffn_start + s.n_ffn_local))
    vocab_cols = property(lambda s: slice(s.vocab_start, s.vocab_start + s.n_vocab_local))
    expert_ffn_cols = property(lambda s: slice(s.expert_ffn_start, s.expert_ffn_start + s.n_expert_ffn_local))

    @cached_property  # attention asks every block
    def head_runs(self):
        """How the local query heads share the local key/value heads, for attention: ``(h0, h1, k0, k1)`` runs in
        local indices, query heads ``h0:h1`` using key/value heads ``k0:k1``, the same number each. One run when the
        split is even; a rank whose range cuts a group gets a run for the cut group at either end."""
        kv = [(self.head_start + h) // self.group - self.kv_head_start for h in range(self.n_head_local)]
        counts = [kv.count(k) for k in range(self.n_kv_head_local)]  # query heads per local key/value head
        runs, h0 = [], 0
        for k, count in enumerate(counts):
            if runs and counts[runs[-1][2]] == count:  # as many query heads as the run's: extend the run
                runs[-1][1:] = [h0 + count, runs[-1][2], k + 1]
            else:
                runs.append([h0, h0 + count, k, k + 1])
            h0 += count
        return tuple(tuple(r) for r in runs)


EXPERT_LAYOUTS = ("tensor", "expert")


def default_layout(config, size):
    """The expert layout when none is asked for: ``expert`` where it divides the experts' work at least as well as
    ``tensor`` divides each expert's hidden columns, i.e. where the rank with the most experts holds no larger a
    share of them than the rank with the most columns holds of the columns (ceil(E/P)/E <= ceil(F/P)/F: 8 experts
    over 2 or 4 ranks, but 6 over 4 is ``tensor``), assuming the router spreads the tokens evenly."""
    n, f = config.n_expert, config.n_ffn_expert
    return "expert" if -(-n // size) * f <= -(-f // size) * n else "tensor"


def _expert_ranges(config, rank, size, experts):
    # (experts, expert_start, n_expert_local, expert_ffn_start, n_expert_ffn_local) of a mixture of experts
    if not config.n_expert:
        return {}
    if experts not in EXPERT_LAYOUTS:
        raise ShardingError(f"--experts {experts!r} is not a layout; use one of: {', '.join(EXPERT_LAYOUTS)}.")
    if experts == "tensor" and config.n_ffn_expert < size:
        raise ShardingError(f"cannot split the experts' {config.n_ffn_expert} hidden columns over {size} ranks "
                            f"(mpirun -n {size}) with --experts tensor; use --experts expert, or fewer ranks.")
    whole = experts == "expert"
    start, count = block_range(config.n_expert, size, rank) if whole else (0, config.n_expert)
    ffn_start, ffn_count = (0, config.n_ffn_expert) if whole else block_range(config.n_ffn_expert, size, rank)
    return dict(experts=experts, expert_start=start, n_expert_local=count, expert_ffn_start=ffn_start,
                n_expert_ffn_local=ffn_count)


def shard_for(config, rank, size, experts=None):
    """The ``Shard`` of rank ``rank`` of ``size``; raises ``ShardingError`` for an invalid ``size``. ``experts``:
    a mixture of experts' layout, "tensor" or "expert" (None: ``default_layout``); a dense model has none."""
    check_rank_count(config, size)
    group = config.n_head // config.n_kv_head
    head_start, n_head_local = block_range(config.n_head, size, rank)
    kv_head_start = head_start // group
    kv_head_stop = (head_start + n_head_local - 1) // group + 1  # the group of the last query head, included
    ffn_start, n_ffn_local = block_range(config.n_ffn, size, rank)
    vocab_start, n_vocab_local = block_range(config.n_vocab, size, rank)
    return Shard(rank=rank, size=size, d_head=config.d_head, group=group, head_start=head_start,
                 n_head_local=n_head_local, kv_head_start=kv_head_start, n_kv_head_local=kv_head_stop - kv_head_start,
                 ffn_start=ffn_start, n_ffn_local=n_ffn_local, vocab_start=vocab_start, n_vocab_local=n_vocab_local,
                 **_expert_ranges(config, rank, size, experts or default_layout(config, size)))


# The range of the Shard that each split weight takes: query heads (W_Q's columns, W_B's rows), key/value heads,
# MLP columns (W_C's, W_gate's, W_up's columns and W_D's rows) and vocabulary ids.
RANGES = {**dict.fromkeys(("W_Q", "b_Q", "W_B"), "q_cols"), **dict.fromkeys(("W_K", "b_K", "W_V", "b_V"), "kv_cols"),
          **dict.fromkeys(("W_C", "b_C", "W_gate", "b_gate", "W_up", "b_up", "W_D"), "ffn_cols"),
          **dict.fromkeys(("W_embed", "W_vocab"), "vocab_cols"), "norm_q_weight": "q_cols", "norm_k_weight": "kv_cols",
          **dict.fromkeys(("W_gate_e", "W_up_e", "W_D_e"), "expert_ffn_cols")}


def full_shape(config, weight):
    """The whole (unsplit) shape of an mpitp weight, ``[in, out]`` for a linear one (one expert's, for an expert's
    weight); a norm's is ``(n_embd,)``."""
    d, q, kv, f = config.n_embd, config.n_head * config.d_head, config.n_kv_head * config.d_head, config.n_ffn
    return {"W_Q": (d, q), "b_Q": (q,), "W_K": (d, kv), "b_K": (kv,), "W_V": (d, kv), "b_V": (kv,),
            "W_B": (q, d), "W_C": (d, f), "b_C": (f,), "W_gate": (d, f), "b_gate": (f,), "W_up": (d, f),
            "b_up": (f,), "W_D": (f, d), "W_embed": (config.n_vocab, d), "W_pos": (config.n_ctx, d),
            "W_vocab": (d, config.n_vocab), "W_router": (d, config.n_expert), "W_shared_gate": (d, 1),
            "W_gate_e": (d, config.n_ffn_expert), "W_up_e": (d, config.n_ffn_expert), "W_D_e": (config.n_ffn_expert, d),
            # per head (Qwen3), or over the whole projection (OLMoE)
            "norm_q_weight": (q,) if FAMILIES[config.family].qk_norm_span == "projection" else (config.d_head,),
            "norm_k_weight": (kv,) if FAMILIES[config.family].qk_norm_span == "projection" else (config.d_head,),
            }.get(weight, (d,))


def rank_slice(config, shard, weight, split):
    """The block of the whole mpitp weight ``weight`` that ``shard``'s rank holds, one slice per axis, for its
    plan's ``split``: colwise takes the rank's range of the last (output) axis, rowwise of the first (input)
    axis, vocab of the vocabulary axis (the embedding's rows, the LM head's columns), replicated everything;
    expert, of each of the rank's experts (``Shard.expert_start``), its range of the hidden columns: W_gate's and
    W_up's output axis, W_D's input axis (the whole expert in the expert layout)."""
    index = [slice(0, n) for n in full_shape(config, weight)]
    if split != "replicated":
        axis = 0 if split == "rowwise" or weight in ("W_embed", "W_D_e") else -1
        index[axis] = getattr(shard, RANGES[weight])
    return tuple(index)
