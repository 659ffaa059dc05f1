"""Sampling: choosing the next token, exactly, from logits split by vocabulary over the ranks.

Only O(k x P) numbers cross the wire, never the whole vocabulary, and the token chosen is the same for any
split, 1 rank included. Greedy: the largest logit, the lowest id among equal ones (a (value, id) pair per rank).
Temperature: the Gumbel-max trick, argmax of logit / T + g, where the noise g of id i at step s comes from a
counter-based generator keyed by (seed, s, i), whichever rank holds i: again one pair per rank. Top-k: each rank
sends its k best, the root merges them. Top-p: the mass is summed exactly (each exp(logit/T - max) as an int64
multiple of 2**-40, the same sum in any order) and candidates are gathered in growing rounds until the smallest
set holding ``top_p`` of it is certain. Then the root takes the Gumbel-max of the kept candidates.
"""

import math

import numpy as np

from . import comm as mpi
from .errors import RequestError

_QUANTUM = 2.0 ** 40  # fixed-point scale of the exact probability mass used by top-p
MIN_TEMPERATURE = 1e-6  # logits / T must stay finite: smaller temperatures are refused (0 is greedy)


def _splitmix64(x):
    # A 64-bit mixing function (Steele, Lea, Flood 2014); uint64 arithmetic wraps by design.
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def gumbel_noise(seed, step, ids):
    """Gumbel(0, 1) noise for vocabulary ``ids`` at generation ``step``: a pure function of its arguments."""
    key = _splitmix64(_splitmix64(np.array([seed % 2**64], dtype=np.uint64)) ^ np.uint64(step))
    h = _splitmix64(key ^ np.asarray(ids, dtype=np.uint64))
    u = ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53  # uniform in (0, 1)
    return -np.log(-np.log(u))


def _check_finite(values):
    """On the root: refuse logits that are NaN or infinite (the rank that chose aborts the job with this line)."""
    if not np.isfinite(values).all():
        raise RequestError("the model's logits are NaN or infinite: its weights or activations overflow in this "
                           "dtype (try --dtype float64), or the checkpoint is broken.")


def _best(values, ids):
    """Index of the largest value, the lowest id among equal ones."""
    top = np.flatnonzero(values == values.max())
    return int(top[np.argmin(ids[top])])


def _top(values, m):
    """Indices of the ``m`` largest ``values`` in order (largest first, lowest index among equal ones)."""
    n = len(values)
    if m >= n:
        return np.lexsort((np.arange(n), -values))
    cut = np.partition(values, n - m)[n - m]  # the m-th largest value
    above = np.flatnonzero(values > cut)
    tied = np.flatnonzero(values == cut)[:m - len(above)]  # ascending index: lowest ids win the tie
    chosen = np.concatenate([above, tied])
    return chosen[np.lexsort((chosen, -values[chosen]))]


class Sampler:
    """Greedy (``temperature`` 0) or sampling from softmax(logits / temperature), optionally only among the
    ``top_k`` most likely tokens (0: all) and the smallest most likely set holding ``top_p`` of the probability
    (1: all). The same ``seed`` and logits give the same tokens at any rank count."""

    def __init__(self, temperature=0.0, top_k=0, top_p=1.0, seed=0):
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and (temperature == 0 or temperature >= MIN_TEMPERATURE)):
            raise RequestError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got "
                               f"{temperature!r}.")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise RequestError(f"top-k must be an integer >= 0 (0 means no limit), got {top_k!r}.")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise RequestError(f"top-p must be in (0, 1] (1 means no limit), got {top_p!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:  # it keys a 64-bit hash
            shown = repr(seed) if len(repr(seed)) < 60 else f"{repr(seed)[:40]}... ({len(repr(seed))} characters)"
            raise RequestError(f"seed must be an integer >= 0 and < 2**64 (0 to {2**64 - 1}), got {shown}.")
        self.temperature, self.top_k, self.top_p, self.seed = float(temperature), top_k, float(top_p), seed

    def choose(self, comm, logits, vocab_start, step, root=0):
        """The next token (an int on ``root``, None elsewhere) from every rank's ``logits`` ``[n_vocab_local]``
        of one position, for ids ``vocab_start ..``; ``step`` keys the noise. Collective over ``comm``."""
        return self.choose_rows(comm, np.asarray(logits)[None], vocab_start, step, root)[0]

    def choose_rows(self, comm, logits, vocab_start, step, root=0):
        """``choose`` for each row of ``logits`` ``[n_rows, n_vocab_local]`` (a batch's sequences at one step):
        a list of ``n_rows`` tokens on ``root`` (None elsewhere), each the token its row alone gets. Greedy and
        plain temperature send one (value, id) pair per row and rank in one Gather; top-k and top-p choose row
        by row."""
        if self.temperature == 0:  # greedy: no array of ids, no copy of an array of logits (this runs every token)
            return self._argmax_over_ranks(comm, np.asarray(logits), vocab_start, root)
        if self.top_k or self.top_p < 1:
            return [self._choose_candidates(comm, row, vocab_start, step, root) for row in logits]
        scaled = np.asarray(logits, dtype=np.float64) / self.temperature
        ids = vocab_start + np.arange(scaled.shape[-1])
        return self._argmax_over_ranks(comm, scaled + gumbel_noise(self.seed, step, ids), vocab_start, root)

    def _choose_candidates(self, comm, logits, vocab_start, step, root):
        # One row's token with top-k or top-p: the kept candidates on root, then their Gumbel-max.
        scaled = np.asarray(logits, dtype=np.float64) / self.temperature
        ids = vocab_start + np.arange(len(scaled))
        cand_scaled, cand_ids = self._candidates(comm, scaled, ids, root)
        if comm.Get_rank() != root:
            return None
        perturbed = cand_scaled + gumbel_noise(self.seed, step, cand_ids.astype(np.int64))
        return int(cand_ids[_best(perturbed, cand_ids)])

    @staticmethod
    def _argmax_over_ranks(comm, values, vocab_start, root):
        """Per row of ``values`` ``[n_rows, n]`` the id of its largest value over all ranks (lowest id among equal
        ones), on root (None elsewhere): one pair per row and rank. ``values[:, j]`` belongs to id
        ``vocab_start + j``."""
        i = np.argmax(values, axis=-1)  # the first of equal maxima: the lowest id of this rank
        mine = np.stack([values[np.arange(len(i)), i], vocab_start + i], axis=-1).astype(np.float64)
        pairs = mpi.gather_to_root(comm, mine, root)  # [size, n_rows, 2]
        if pairs is None:
            return [None] * len(i)
        _check_finite(pairs[..., 0])  # NaN is the largest to argmax, +inf is the largest: either shows here
        return [int(p[_best(p[:, 0], p[:, 1]), 1]) for p in pairs.swapaxes(0, 1)]

    def _candidates(self, comm, scaled, ids, root):
        """The kept (scaled logit, id) pairs, on root: the top k, then the top-p share of them."""
        if self.top_k:
            merged = self._gather_top(comm, scaled, ids, self.top_k, root)[0]
            if merged is None:
                return None, None
            kept = merged[:self.top_k]
            if self.top_p < 1:
                mass = np.floor(np.exp(kept[:, 0] - kept[0, 0]) * _QUANTUM)
                kept = kept[:self._nucleus_size(mass, mass.sum())]  # None: every one
            return kept[:, 0], kept[:, 1]
        # top-p over the whole vocabulary: exact total mass first, then candidates in growing rounds.
        top = mpi.allreduce_scalar(comm, scaled.max(), "max", np.float64)
        with np.errstate(invalid="ignore"):  # non-finite logits: refused below, by the root (_gather_top)
            mass_local = np.floor(np.exp(scaled - top) * _QUANTUM).astype(np.int64)
        total = mpi.allreduce_scalar(comm, int(mass_local.sum()), "sum", np.int64)
        m = 64
        while True:
            merged, certain = self._gather_top(comm, scaled, ids, m, root)
            n_keep = 0
            if merged is not None:
                mass = np.floor(np.exp(merged[:certain, 0] - top) * _QUANTUM)
                n_keep = self._nucleus_size(mass, float(total)) or 0
            if mpi.bcast_ints(comm, [n_keep], root)[0]:
                return (merged[:n_keep, 0], merged[:n_keep, 1]) if merged is not None else (None, None)
            m *= 4

    def _nucleus_size(self, mass, total):
        """How many of the (descending) masses the top-p set needs; None if they do not reach top_p yet."""
        reached = np.flatnonzero(np.cumsum(mass.astype(np.int64)) >= self.top_p * total)
        return int(reached[0]) + 1 if len(reached) else None

    @staticmethod
    def _gather_top(comm, scaled, ids, m, root):
        """Every rank's ``m`` best (scaled, id), merged in order on root, and how many of them are certain
        to be the global best (every rank that holds more ranks its unsent ones below its last sent one)."""
        order = _top(scaled, m)
        mine = np.full((m, 3), -np.inf)  # rows: scaled logit, id, 1 if the rank sent all it has
        mine[:len(order), 0], mine[:len(order), 1] = scaled[order], ids[order]
        mine[:, 2] = (1.0 if len(scaled) <= m else 0.0) if np.isfinite(scaled).all() else np.nan
        parts = mpi.gather_to_root(comm, mine, root)
        if parts is None:
            return None, 0
        _check_finite(parts[:, 0, 2])
        rows = parts.reshape(-1, 3)
        rows = rows[np.isfinite(rows[:, 0])]
        rows = rows[np.lexsort((rows[:, 1], -rows[:, 0]))]
        # The last sent row of each rank that holds more: everything it did not send ranks below it.
        limits = [p[m - 1] for p in parts if p[0, 2] == 0.0]
        if not limits:
            return rows[:, :2], len(rows)
        # Rows ranked at or above every such last row are certain; the bound is the highest-ranked of them.
        bound = max(limits, key=lambda r: (r[0], -r[1]))
        certain = int(np.flatnonzero((rows[:, 0] == bound[0]) & (rows[:, 1] == bound[1]))[0]) + 1
        return rows[:, :2], certain
