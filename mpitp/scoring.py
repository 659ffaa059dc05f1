"""Scoring a text: perplexity and KL divergence from the ranks' slices of the logits, vocabulary-parallel.

Each rank holds the logits of its vocabulary columns (``Model.forward(..., gather=False)``). The negative
log-likelihood of a target needs three numbers per row that span the vocabulary: the row maximum (an Allreduce
MAX), the sum of exponentials and the target's logit (sums, in one Allreduce): no rank ever holds a whole row
(Megatron-LM's vocabulary-parallel cross entropy). The KL divergence against a base's log-probabilities of the
same columns is again a partial sum per rank and one reduction. The chunking is llama-perplexity's.
"""

from dataclasses import dataclass

import numpy as np

from . import comm as mpi

ROWS = 8  # rows of logits at a time in the sum of exponentials: 8 x 10^5 float64 values stay in cache


def vocab_parallel_cross_entropy(comm, logits, targets, vocab_start):
    """``(nll, log_z)``, each ``[n_rows]`` float64 and the same on every rank: the negative log-likelihood of
    the global token ids ``targets`` ``[n_rows]`` under this rank's columns ``logits`` ``[n_rows,
    n_vocab_local]`` (ids ``vocab_start`` onwards) and the others', and the log of the softmax's denominator."""
    row_max = logits.max(axis=-1).astype(np.float64)  # exact in any dtype
    mpi.allreduce_max(comm, row_max)  # reduction 1: the row maximum, for a sum of exponentials that cannot overflow
    local = targets - vocab_start
    mine = np.flatnonzero((local >= 0) & (local < logits.shape[-1]))  # the rows whose target is in our columns
    sums = np.zeros((2, len(logits)))
    for r in range(0, len(logits), ROWS):  # in float64 whatever the compute dtype (a float32 sum of 10^5
        shifted = logits[r:r + ROWS] - row_max[r:r + ROWS, None]  # exponentials loses digits), a few rows at a
        sums[0, r:r + ROWS] = np.exp(shifted, out=shifted).sum(axis=-1)  # time: they stay in cache
    sums[1, mine] = logits[mine, local[mine]] - row_max[mine]
    mpi.allreduce_sum(comm, sums)  # reductions 2 and 3: the sum of exponentials, the target's (shifted) logit
    log_sum = np.log(sums[0])
    return log_sum - sums[1], row_max + log_sum


def vocab_parallel_kl_divergence(comm, log_probs, base, targets, vocab_start):
    """``(kld, same_top, base_nll)``, each ``[n_rows]`` and the same on every rank: KL(base || this run) =
    sum_v p_base(v) (log p_base(v) - log p(v)), whether some token is the top of both, and the base's negative
    log-likelihood of ``targets``; from this rank's columns of both log-softmaxes, ``[n_rows, n_vocab_local]``."""
    maxima = np.stack([log_probs.max(axis=-1), base.max(axis=-1)])  # [2, n_rows]
    mpi.allreduce_max(comm, maxima)
    p_base = np.exp(base)
    terms = p_base * (base - log_probs)
    terms[p_base == 0] = 0  # a base log-probability of -inf: the term's limit, not nan
    local = targets - vocab_start
    mine = np.flatnonzero((local >= 0) & (local < base.shape[-1]))
    sums = np.zeros((3, len(base)))
    terms.sum(axis=-1, out=sums[0])
    sums[1] = ((log_probs == maxima[0][:, None]) & (base == maxima[1][:, None])).any(axis=-1)
    sums[2, mine] = -base[mine, local[mine]]
    mpi.allreduce_sum(comm, sums)  # the partial sums, the ranks holding a shared top token, the base's target
    return sums[0], sums[1] > 0, sums[2]


def chunk_tokens(ids, n_ctx, n_chunks, bos_token_id):
    """llama-perplexity's chunks ``[n_chunks, n_ctx]`` of a text's token ids (the tail dropped; fewer chunks if
    the text is short), each starting with ``bos_token_id`` in place of its first token when it is not None."""
    n_chunks = min(n_chunks, len(ids) // n_ctx)
    chunks = np.asarray(ids[:n_chunks * n_ctx], dtype=np.int64).reshape(n_chunks, n_ctx)
    if bos_token_id is not None:
        chunks[:, 0] = bos_token_id
    return chunks


def first_scored(n_ctx):
    """The first position whose logits are scored: the first half of a chunk is context only."""
    return n_ctx // 2


@dataclass
class Scores:
    """The scores of a batch of chunks, the same on every rank but the logits: ``chunks`` (a range of chunk
    indices), ``nll`` ``[n_chunks, n_scored]``, and with a base ``kld``, ``same_top``, ``base_nll`` alike;
    ``logits`` ``[n_chunks, n_scored, n_vocab_local]`` this rank's columns and ``log_z`` ``[n_chunks, n_scored]``
    the log of each row's softmax denominator."""

    chunks: range
    nll: np.ndarray
    logits: np.ndarray
    log_z: np.ndarray
    kld: np.ndarray = None
    same_top: np.ndarray = None
    base_nll: np.ndarray = None

    def log_probs(self):
        """This rank's columns of the log-softmax ``[n_chunks, n_scored, n_vocab_local]``, float64."""
        return self.logits - self.log_z[..., None]


def score_chunks(model, chunks, cache, base=None):
    """Yield the ``Scores`` of each batch of ``chunks`` ``[n_chunks, n_ctx]``, as many chunks a forward as
    ``cache`` holds sequences; ``base(chunks)`` gives the base's log-probabilities of this rank's columns
    ``[n, n_scored, n_vocab_local]`` (the positions ``first_scored(n_ctx)`` to ``n_ctx - 2`` of each chunk)."""
    n_batch, first, s = len(cache.lengths), first_scored(chunks.shape[1]), model.shard
    for c0 in range(0, len(chunks), n_batch):
        ids = chunks[c0:c0 + n_batch]
        if len(ids) < len(cache.lengths):
            cache.keep(list(range(len(ids))))
        cache.reset()
        # Positions first..n_ctx-2 predict first+1..n_ctx-1; the first half is context only (no LM head rows), and
        # the last token predicts nothing: it need not go through.
        logits = model.forward(ids[:, :-1], cache, all_logits=True, gather=False, logits_from=first)
        targets, shape = ids[:, first + 1:], logits.shape
        nll, log_z = vocab_parallel_cross_entropy(model.comm, logits.reshape(-1, shape[-1]), targets.ravel(),
                                                  s.vocab_start)
        scores = Scores(range(c0, c0 + len(ids)), nll.reshape(shape[:2]), logits, log_z.reshape(shape[:2]))
        if base is not None:
            log_probs = scores.log_probs()
            kld, same_top, base_nll = vocab_parallel_kl_divergence(
                model.comm, log_probs.reshape(-1, shape[-1]), base(scores.chunks).reshape(-1, shape[-1]),
                targets.ravel(), s.vocab_start)
            scores.kld, scores.same_top, scores.base_nll = (a.reshape(shape[:2]) for a in (kld, same_top, base_nll))
        yield scores


def mean_and_stderr(values):
    """The mean of ``values`` and its standard error sqrt(var / (n - 1)) with var the population variance
    (llama-perplexity's formula); None for the error of fewer than 2 values."""
    values = np.asarray(values, dtype=np.float64).ravel()
    mean = float(values.mean())
    return mean, (float(np.sqrt(values.var() / (len(values) - 1))) if len(values) > 1 else None)
