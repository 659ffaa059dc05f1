"""The rank-local KV cache: keys and values of this rank's key/value heads, preallocated once, written in place
(memory stays flat while generating). Each layer has ``[n_batch, n_kv_head_local, slots, d_head]``: a row per
sequence, each with its own length.

A full-attention layer has a slot per position (``capacity``). A sliding layer sees only its last ``window``
positions, so it keeps only those and the new tokens of one forward (``window - 1 + chunk`` slots, at most
``capacity``): a ring, position p in slot p mod slots. Which position a slot holds follows from the sequence's
length alone (``key_positions``), and the mask is built from those positions; a model's forward never gives it
more than ``chunk`` new tokens at once, so none of them overwrites a key that one of them still needs.
"""

import numpy as np

from .errors import RequestError

RING_CHUNK = 128  # a sliding layer's slots past its window: the most new tokens a forward writes at once
_UNWRITTEN = np.iinfo(np.int64).max  # the position of a slot not yet written: after every query, so never seen


def layer_slots(capacity, windows, chunk=None):
    """Per layer (``windows``: its sliding window, 0 for none), the positions its cache holds for sequences of up to
    ``capacity`` positions, when a forward writes at most ``chunk`` (default ``RING_CHUNK``) new ones at once."""
    chunk = RING_CHUNK if chunk is None else chunk
    return [min(capacity, w - 1 + chunk) if w else capacity for w in windows]


def most_new(capacity, windows, chunk=None):
    """The most new tokens one forward may write into a cache of these layers: ``capacity`` (no limit) when no
    layer is a ring, else its chunk (default ``RING_CHUNK``)."""
    ring = min(layer_slots(capacity, windows, chunk), default=capacity) < capacity
    return (RING_CHUNK if chunk is None else chunk) if ring else capacity


class KVCache:
    """Keys and values of ``n_batch`` sequences of up to ``capacity`` positions (prompt and new tokens); per layer
    its sliding window (``windows``, 0 or () for none) and slots as ``layer_slots`` says."""

    def __init__(self, n_layer, n_batch, n_kv_head_local, d_head, capacity, dtype, windows=(), chunk=None):
        self.capacity = capacity
        self.lengths = np.zeros(n_batch, dtype=np.int64)  # positions written and committed, per sequence
        windows = tuple(windows) or (0,) * n_layer
        self.slots = layer_slots(capacity, windows, chunk)
        self.ring = {w: s for w, s in zip(windows, self.slots)}  # slots per window (0: full attention)
        self.chunk = most_new(capacity, windows, chunk)  # the most new tokens per forward
        # Written once now (not np.zeros): every page is resident from the start, so a cache too large fails
        # here, not mid-run.
        self.K, self.V = ([np.full((n_batch, n_kv_head_local, s, d_head), 0, dtype) for s in self.slots]
                          for _ in range(2))

    def row(self, b, n=1):
        """Sequence ``b`` alone (or the ``n`` from ``b`` on), as a cache that shares this one's memory."""
        view = object.__new__(KVCache)
        view.__dict__.update(vars(self))
        view.lengths = self.lengths[b:b + n]
        view.K, view.V = [k[b:b + n] for k in self.K], [v[b:b + n] for v in self.V]
        return view

    def keep(self, rows):
        """Keep only the sequences in cache rows ``rows``, in that order: the others leave the batch."""
        for K, V in zip(self.K, self.V):
            for i, r in enumerate(rows):  # ascending, r >= i: moved down in place, with no temporary copy
                K[i], V[i] = K[r], V[r]
        self.K, self.V = [k[:len(rows)] for k in self.K], [v[:len(rows)] for v in self.V]
        self.lengths = self.lengths[rows]

    def positions(self, n_seq):
        """``[n_batch, n_seq]``: the positions of ``n_seq`` new tokens of each sequence."""
        if self.lengths.max() + n_seq > self.capacity:
            raise RequestError(f"{self.lengths.max()} cached + {n_seq} new tokens exceed the KV cache capacity of "
                               f"{self.capacity} positions.")
        return self.lengths[:, None] + np.arange(n_seq)

    def key_positions(self, window, n_seq):
        """What a layer of sliding ``window`` (0: full attention) holds once ``n_seq`` new tokens are written: the
        number of slots n_kv (slot s: position s) where no sequence has wrapped around its ring, else the position
        in each slot, ``[n_batch, n_kv]`` (the latest p = s mod slots written; unwritten: after every query)."""
        slots, n_kv = self.ring[window], int(self.lengths.max()) + n_seq
        if n_kv <= slots:
            return n_kv
        last = (self.lengths + n_seq - 1)[:, None]
        held = last - (last - np.arange(slots)) % slots
        return np.where(held >= 0, held, _UNWRITTEN)

    def update(self, layer, K_new, V_new):
        """Write the new tokens' keys and values ``[n_rows, n_kv_head_local, d_head]`` (n_rows = n_batch n_seq)
        after each sequence's (a ring: into slot position mod slots); return views of every slot written so far,
        ``[n_batch, n_kv_head_local, n_kv, d_head]``. ``advance`` commits the new positions after the forward."""
        n_seq, slots = len(K_new) // len(self.lengths), self.slots[layer]
        if n_seq > self.chunk:  # a ring would overwrite keys that its own new tokens still need: never silently
            raise RuntimeError(f"{n_seq} new tokens in one forward; a sliding layer's ring takes {self.chunk}")
        K, V = self.K[layer], self.V[layer]
        if n_seq == 1 and len(self.lengths) > 1:  # a batch's decode step: every sequence's key and value at once
            b, at = np.arange(len(self.lengths)), self.lengths % slots
            K[b, :, at], V[b, :, at] = K_new, V_new
        else:
            for b, start in enumerate(self.lengths.tolist()):
                s = start % slots
                at = slice(s, s + n_seq) if s + n_seq <= slots else (start + np.arange(n_seq)) % slots
                K[b][:, at] = K_new[b * n_seq:(b + 1) * n_seq].swapaxes(0, 1)
                V[b][:, at] = V_new[b * n_seq:(b + 1) * n_seq].swapaxes(0, 1)
        n_kv = min(slots, int(self.lengths.max()) + n_seq)
        return K[:, :, :n_kv], V[:, :, :n_kv]

    def advance(self, n_seq):
        self.lengths += n_seq

    def reset(self):
        """Forget every position (the memory is kept and overwritten by the next forward)."""
        self.lengths[:] = 0
