"""Trace: every named tensor of the seed diagram, per step and layer, as this rank computed it.

Keys are ``step{s}/layer{l}/{A,Q,K,V,B,C,D,E}`` and ``step{s}/logits``; step 0 is the prefill.
``shard/*`` records which heads and MLP columns the rank owns. Shapes are
those of the README's trace table on this rank (Q, K, V flattened to ``[n_seq, heads_local * d_head]``, after
RoPE for Llama). Saved as an uncompressed ``.npz`` of plain arrays: readable with
``np.load(path, allow_pickle=False)``.
"""

import numpy as np


class Trace:
    """Collects copies of named tensors; ``save`` writes them to one ``.npz`` file."""

    def __init__(self):
        self.arrays = {}
        self.step = 0

    def record_layer(self, layer, **tensors):
        for name, value in tensors.items():
            value = np.asarray(value)
            self.arrays[f"step{self.step}/layer{layer}/{name}"] = value.reshape(value.shape[0], -1).copy()

    def record(self, name, value):
        self.arrays[f"step{self.step}/{name}"] = np.array(value)

    def record_shard(self, shard):
        """Store what this rank owns (``shard/head_start``, ``shard/n_head_local``, ...) as int64 scalars."""
        for name, value in vars(shard).items():
            self.arrays[f"shard/{name}"] = np.int64(value)

    def next_step(self):
        self.step += 1

    def save(self, path):
        np.savez(path, **self.arrays)
