"""Sharding: which heads, key/value heads and MLP columns rank r of P owns. Pure math, no MPI.

``shard_for(config, rank, size)`` is the single source of truth for the split; weights, KV cache and trace
all use it. Storage layout: inside mpitp every linear weight is stored ``[in, out]`` so that a layer is
``x @ W``. A *column-parallel* weight (W_Q, W_K, W_V, W_C, W_up) is then split along its last axis and its
output stays local; a *row-parallel* weight (W_B, W_D) is split along its first axis and its output is a
partial sum that an Allreduce completes. (Megatron's paper calls the weights A and B; here A..E are
activations, as in the seed diagram, and W_X is the weight that multiplies X.)

Rank-count rule: P must divide the number of query heads, and either P divides the number of key/value
heads (each rank holds n_kv_head / P of them) or the number of key/value heads divides P (each key/value
head is replicated on P / n_kv_head ranks, so every rank holds exactly the one its query heads use).
MLP columns and vocabulary ids are split as evenly as possible (sizes differ by at most one), so they
never restrict P. The embedding and LM head are *vocab-parallel*: rank r owns a contiguous range of ids.
"""

from dataclasses import dataclass

from .errors import ShardingError


def block_range(n, size, rank):
    """``(start, count)`` of rank's block when ``n`` items are split over ``size`` ranks as evenly as possible."""
    base, extra = divmod(n, size)
    count = base + (1 if rank < extra else 0)
    start = rank * base + min(rank, extra)
    return start, count


def rank_count_problem(config, size):
    """Why ``size`` ranks cannot split ``config``'s model, as a sentence fragment; None if they can."""
    h, kv = config.n_head, config.n_kv_head
    if not isinstance(size, int) or size < 1:
        return f"the rank count must be a positive integer, got {size!r}"
    if h % size:
        return f"its {h} attention heads cannot be divided evenly over {size} ranks"
    if kv % size and size % kv:
        return (f"its {kv} key/value heads can be neither divided over {size} ranks nor replicated evenly "
                f"onto them")
    if config.n_vocab < size or config.n_ffn < size:
        return f"its vocabulary ({config.n_vocab}) or MLP width ({config.n_ffn}) is smaller than {size}"
    return None


def valid_rank_counts(config):
    """Every rank count the model can be split over, ascending."""
    return [p for p in range(1, config.n_head + 1) if rank_count_problem(config, p) is None]


def check_rank_count(config, size):
    """Raise ``ShardingError`` with the list of valid ``-n`` values if ``size`` ranks cannot split the model."""
    problem = rank_count_problem(config, size)
    if problem:
        valid = ", ".join(str(p) for p in valid_rank_counts(config))
        raise ShardingError(f"cannot run this model on {size} ranks (mpirun -n {size}): {problem}; "
                            f"valid -n values for this model: {valid}.")


@dataclass(frozen=True)
class Shard:
    """What one rank owns. Head and column ranges are global indices into the full model."""

    rank: int
    size: int
    d_head: int
    head_start: int  # first query head of this rank
    n_head_local: int
    kv_head_start: int  # first key/value head of this rank
    n_kv_head_local: int
    ffn_start: int  # first MLP hidden column of this rank
    n_ffn_local: int
    vocab_start: int  # first vocabulary id of this rank's embedding rows and LM-head columns
    n_vocab_local: int  # the whole vocabulary when the head is replicated

    @property
    def q_cols(self):
        """Columns of the full W_Q (and rows of W_B) that belong to this rank's query heads."""
        return slice(self.head_start * self.d_head, (self.head_start + self.n_head_local) * self.d_head)

    @property
    def kv_cols(self):
        """Columns of the full W_K and W_V that belong to this rank's key/value heads."""
        return slice(self.kv_head_start * self.d_head, (self.kv_head_start + self.n_kv_head_local) * self.d_head)

    @property
    def ffn_cols(self):
        """Columns of the full W_C (and rows of W_D) that belong to this rank."""
        return slice(self.ffn_start, self.ffn_start + self.n_ffn_local)

    @property
    def vocab_cols(self):
        """Vocabulary ids of this rank: columns of W_vocab, rows of W_embed."""
        return slice(self.vocab_start, self.vocab_start + self.n_vocab_local)


def shard_for(config, rank, size, vocab_parallel=True):
    """The ``Shard`` of rank ``rank`` of ``size``; raises ``ShardingError`` for an invalid ``size``.

    With ``vocab_parallel`` the embedding and LM head are split into contiguous vocabulary ranges (sizes
    differ by at most one); otherwise every rank holds the whole vocabulary.
    """
    check_rank_count(config, size)
    if not 0 <= rank < size:
        raise ShardingError(f"rank {rank} is outside 0..{size - 1}.")
    n_head_local = config.n_head // size
    head_start = rank * n_head_local
    if config.n_kv_head >= size:
        n_kv_head_local = config.n_kv_head // size
        kv_head_start = rank * n_kv_head_local
    else:
        # Replicated key/value heads: the one kv head that this rank's query heads share.
        n_kv_head_local = 1
        kv_head_start = head_start // (config.n_head // config.n_kv_head)
    ffn_start, n_ffn_local = block_range(config.n_ffn, size, rank)
    vocab_start, n_vocab_local = block_range(config.n_vocab, size, rank) if vocab_parallel else (0, config.n_vocab)
    return Shard(rank=rank, size=size, d_head=config.d_head, head_start=head_start, n_head_local=n_head_local,
                 kv_head_start=kv_head_start, n_kv_head_local=n_kv_head_local, ffn_start=ffn_start,
                 n_ffn_local=n_ffn_local, vocab_start=vocab_start, n_vocab_local=n_vocab_local)
