"""Trace: every named tensor of the seed diagram, per step and layer, as this rank computed it, in the format
of docs/trace.md (``python -m mpitp.compare`` compares two traces of any rank counts). The model has no trace
calls: inside ``with trace:`` a profile hook (``sys.setprofile``) reads the locals of ``Model.block`` and
``Model.embed`` and the result of ``Model.lm_head`` as they return.
"""

import hashlib
import sys

import numpy as np

from .model import Model

_BLOCK, _LM_HEAD, _EMBED = Model.block.__code__, Model.lm_head.__code__, Model.embed.__code__
NAMES = "AQKVBCDE"


class Trace:
    """Collects copies of the named tensors of every forward run inside ``with trace:``."""

    def __init__(self, model_dir=None):
        self.arrays, self.step = {"format/version": np.int64(1)}, 0  # docs/trace.md: the format's version
        if model_dir is not None:  # the model's identity: compare refuses traces of different config.json files
            with open(f"{model_dir}/config.json", "rb") as f:
                self.arrays["meta/config_sha256"] = np.array(hashlib.sha256(f.read()).hexdigest())

    def record(self, name, value):
        # [.., width] -> [rows, width]; a second record in the same step adds rows (the next sequence)
        key = f"step{self.step}/{name}"
        value = np.array(value).reshape(-1, value.shape[-1]) if name == "logits" else np.array(value).reshape(
            len(value), -1)
        self.arrays[key] = np.concatenate([self.arrays[key], value]) if key in self.arrays else value

    def record_shard(self, shard):
        """Store what this rank owns (``shard/head_start``, ``shard/n_head_local``, ...) as int64 scalars."""
        for name, value in vars(shard).items():
            if isinstance(value, int):
                self.arrays[f"shard/{name}"] = np.int64(value)

    def _hook(self, frame, event, value):
        code = frame.f_code if event == "return" else None
        if code is _BLOCK:
            tensors = frame.f_locals
            for name in NAMES:
                self.record(f"layer{tensors['layer']}/{name}", tensors[name])
        elif code is _LM_HEAD:
            self.record("logits", value)
        elif code is _EMBED:  # the token ids the forward consumed, with their positions: [rows, 2]
            self.record("tokens", np.stack([frame.f_locals["ids"], frame.f_locals["positions"]], -1).reshape(-1, 2))

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
