"""The rank-local KV cache: keys and values of this rank's key/value heads, preallocated once, written in place
(memory stays flat while generating). Each layer has ``[n_batch, n_kv_head_local, capacity, d_head]``: a row per
sequence, each with its own length."""

import numpy as np

from .errors import RequestError


class KVCache:
    """Keys and values of ``n_batch`` sequences of up to ``capacity`` positions (prompt and new tokens)."""

    def __init__(self, n_layer, n_batch, n_kv_head_local, d_head, capacity, dtype):
        self.capacity = capacity
        self.lengths = np.zeros(n_batch, dtype=np.int64)  # positions written and committed, per sequence
        # Written once now (not np.zeros): every page is resident from the start, so a cache too large fails
        # here, not mid-run.
        shape = (n_layer, n_batch, n_kv_head_local, capacity, d_head)
        self.K, self.V = np.full(shape, 0, dtype), np.full(shape, 0, dtype)

    def row(self, b, n=1):
        """Sequence ``b`` alone (or the ``n`` from ``b`` on), as a cache that shares this one's memory."""
        view = object.__new__(KVCache)
        view.capacity, view.lengths = self.capacity, self.lengths[b:b + n]
        view.K, view.V = self.K[:, b:b + n], self.V[:, b:b + n]
        return view

    def keep(self, rows):
        """Keep only the sequences in cache rows ``rows``, in that order: the others leave the batch."""
        for i, r in enumerate(rows):  # ascending, r >= i: moved down in place, with no temporary copy
            self.K[:, i], self.V[:, i] = self.K[:, r], self.V[:, r]
        self.K, self.V, self.lengths = self.K[:, :len(rows)], self.V[:, :len(rows)], self.lengths[rows]

    def positions(self, n_seq):
        """``[n_batch, n_seq]``: the positions of ``n_seq`` new tokens of each sequence."""
        if self.lengths.max() + n_seq > self.capacity:
            raise RequestError(f"{self.lengths.max()} cached + {n_seq} new tokens exceed the KV cache capacity of "
                               f"{self.capacity} positions.")
        return self.lengths[:, None] + np.arange(n_seq)

    def update(self, layer, K_new, V_new):
        """Write the new tokens' keys and values ``[n_rows, n_kv_head_local, d_head]`` (n_rows = n_batch n_seq)
        after each sequence's; return views of every position so far, ``[n_batch, n_kv_head_local, n_kv, d_head]``.
        ``advance`` commits the new positions after the forward."""
        n_seq = len(K_new) // len(self.lengths)
        for b, start in enumerate(self.lengths.tolist()):
            self.K[layer, b, :, start:start + n_seq] = K_new[b * n_seq:(b + 1) * n_seq].swapaxes(0, 1)
            self.V[layer, b, :, start:start + n_seq] = V_new[b * n_seq:(b + 1) * n_seq].swapaxes(0, 1)
        n_kv = int(self.lengths.max()) + n_seq
        return self.K[layer, :, :, :n_kv], self.V[layer, :, :, :n_kv]

    def advance(self, n_seq):
        self.lengths += n_seq

    def reset(self):
        """Forget every position (the memory is kept and overwritten by the next forward)."""
        self.lengths[:] = 0
