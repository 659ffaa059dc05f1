"""The rank-local KV cache: keys and values of this rank's key/value heads, preallocated once.

Each layer keeps ``K, V`` of shape ``[n_kv_head_local, capacity, d_head]``. A forward appends its new
tokens' keys and values in place and attends over the first ``length`` positions; nothing is reallocated
while generating, so memory stays flat however long the run.
"""

import numpy as np

from .errors import RequestError


class KVCache:
    """Keys and values of one sequence for one rank.

    Parameters
    ----------
    n_layer, n_kv_head_local, d_head : int
        Sizes from the config and the rank's shard.
    capacity : int
        The most positions this cache will hold (prompt plus generated tokens).
    dtype : numpy dtype
        The run's compute dtype.
    """

    def __init__(self, n_layer, n_kv_head_local, d_head, capacity, dtype):
        self.capacity = capacity
        self.length = 0  # positions filled and committed
        # Written once now, so that every page is resident from the start: memory stays flat while
        # generating, and a cache too large for the machine fails here, not halfway through a run.
        self.K = np.empty((n_layer, n_kv_head_local, capacity, d_head), dtype=dtype)
        self.V = np.empty((n_layer, n_kv_head_local, capacity, d_head), dtype=dtype)
        self.K.fill(0)
        self.V.fill(0)

    @property
    def nbytes(self):
        return self.K.nbytes + self.V.nbytes

    def check_room(self, n_new):
        """Raise ``RequestError`` if ``n_new`` more positions do not fit."""
        if self.length + n_new > self.capacity:
            raise RequestError(f"{self.length} cached + {n_new} new tokens exceed the KV cache capacity of "
                               f"{self.capacity} positions.")

    def update(self, layer, K_new, V_new):
        """Write the new tokens' keys and values after the committed ones; return views of all of them.

        ``K_new, V_new``: ``[n_seq, n_kv_head_local, d_head]``. Returns ``K, V`` as
        ``[n_kv_head_local, length + n_seq, d_head]``. The new positions are committed by ``advance``
        once every layer has been updated.
        """
        end = self.length + K_new.shape[0]
        self.K[layer, :, self.length:end] = K_new.transpose(1, 0, 2)
        self.V[layer, :, self.length:end] = V_new.transpose(1, 0, 2)
        return self.K[layer, :, :end], self.V[layer, :, :end]

    def advance(self, n_new):
        self.length += n_new

    def reset(self):
        """Forget every position (the memory is kept and overwritten by the next forward)."""
        self.length = 0
