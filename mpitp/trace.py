"""Trace: every named tensor of the seed diagram, per step and layer, as this rank computed it.

Keys are ``step{s}/layer{l}/{A,Q,K,V,B,C,D,E}`` and ``step{s}/logits`` (this rank's vocabulary columns);
step 0 is the prefill. ``shard/*`` records which query heads, key/value heads, MLP columns and vocabulary
ids the rank owns, so the full tensors can be reassembled from every rank's file. Rows are the new tokens
(of several sequences, stacked in order); Q, K, V are flattened to ``[rows, heads_local * d_head]``, after
RoPE for Llama. Saved as an uncompressed ``.npz`` of plain arrays (``np.load(path, allow_pickle=False)``).

The model has no trace calls: inside ``with trace:`` a profile hook (``sys.setprofile``) reads the locals of
``Model.block`` and the result of ``Model.lm_head`` as they return.
"""

import sys

import numpy as np

from .model import Model

_BLOCK, _LM_HEAD = Model.block.__code__, Model.lm_head.__code__
NAMES = "AQKVBCDE"


class Trace:
    """Collects copies of the named tensors of every forward run inside ``with trace:``."""

    def __init__(self):
        self.arrays = {}
        self.step = 0

    def record(self, name, value):
        # [.., width] -> [rows, width]; a second record in the same step adds rows (the next sequence)
        key = f"step{self.step}/{name}"
        value = np.array(value).reshape(-1, value.shape[-1] if name == "logits" else
                                        int(np.prod(value.shape[2:])))
        self.arrays[key] = np.concatenate([self.arrays[key], value]) if key in self.arrays else value

    def record_shard(self, shard):
        """Store what this rank owns (``shard/head_start``, ``shard/n_head_local``, ...) as int64 scalars."""
        for name, value in vars(shard).items():
            if isinstance(value, int):
                self.arrays[f"shard/{name}"] = np.int64(value)

    def _hook(self, frame, event, value):
        if event != "return":
            return
        if frame.f_code is _BLOCK:
            tensors = frame.f_locals
            for name in NAMES:
                self.record(f"layer{tensors['layer']}/{name}", tensors[name])
        elif frame.f_code is _LM_HEAD:
            self.record("logits", value)

    def __enter__(self):
        """``with trace:`` records the forwards this thread runs inside the block."""
        self._previous = sys.getprofile()
        sys.setprofile(self._hook)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self._previous)

    def next_step(self):
        self.step += 1

    def save(self, path):
        np.savez(path, **self.arrays)
