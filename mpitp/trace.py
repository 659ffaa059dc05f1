"""Trace: every named tensor of the seed diagram, per step and layer, as this rank computed it, in the format
of docs/trace.md (``python -m mpitp.compare`` compares two traces of any rank counts). The model has no trace
calls: inside ``with trace:`` a profile hook (``sys.setprofile``) reads the locals of ``Model.block`` and
``Model.embed`` and the result of ``Model.lm_head`` as they return; of a mixture of experts' ``Model.block_moe``, R (the
router's weights) and M (the experts' combined output) in place of D.
"""

import contextlib
import hashlib
import os
import stat
import sys

import numpy as np

from .errors import FileError, read_regular
from .model import Model

NAMES, MOE_NAMES = "AQKVBCDE", "AQKVBCRME"
# The block functions and the locals the trace reads of each: the trace's contract
_BLOCKS = {Model.block.__code__: NAMES, Model.block_normed.__code__: NAMES, Model.block_parallel.__code__: NAMES,
           Model.block_moe.__code__: MOE_NAMES}
_LM_HEAD, _EMBED = Model.lm_head.__code__, Model.embed.__code__


class Trace:
    """Collects copies of the named tensors of every forward run inside ``with trace:``."""

    def __init__(self, model_dir=None):
        self.arrays, self.step = {"format/version": np.int64(1)}, 0  # docs/trace.md: the format's version
        if model_dir is not None:  # the model's identity: compare refuses traces of different config.json files
            config = read_regular(os.path.join(model_dir, "config.json"))
            self.arrays["meta/config_sha256"] = np.array(hashlib.sha256(config).hexdigest())

    def record(self, name, value):
        # [.., width] -> [rows, width]; a second record in the same step adds rows (the next sequence)
        key = f"step{self.step}/{name}"
        value = np.array(value).reshape((-1, value.shape[-1]) if name == "logits" else (len(value), -1))
        self.arrays[key] = np.concatenate([self.arrays[key], value]) if key in self.arrays else value

    def record_shard(self, shard):
        """Store what this rank owns (``shard/head_start``, ``shard/n_head_local``, ...) as int64 scalars."""
        self.arrays.update((f"shard/{k}", np.int64(v)) for k, v in vars(shard).items() if isinstance(v, int))

    def record_stage(self, stage):
        """Store a pipeline stage's place (``stage/index``, ``stage/count``, ``stage/first_layer``,
        ``stage/n_layer_local``): its file holds those layers only (and the logits on the last stage)."""
        self.arrays.update((f"stage/{k}", np.int64(getattr(stage, k)))
                           for k in ("index", "count", "first_layer", "n_layer_local"))

    def _hook(self, frame, event, value):
        # A frame that an exception unwinds also "returns", with None and some locals unset: not a result.
        code = frame.f_code if event == "return" and value is not None else None
        if code in _BLOCKS:
            tensors = frame.f_locals
            for name in _BLOCKS[code]:
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

    def save(self, path, temporary=None):
        """Write the trace to ``path`` (``.npz`` is appended if missing) atomically: into a new temporary file in
        the same folder (``temporary``, by default a new name beside ``path``), renamed over ``path`` once whole.
        A failed write (a full disk) leaves the previous file as it was and no temporary, and two jobs writing
        the same path each leave a whole, loadable file. Only a regular file is replaced, never a device, FIFO
        or symbolic link put there meanwhile."""
        path = str(path) if str(path).endswith(".npz") else f"{path}.npz"
        temporary = temporary or temporary_name(path)
        try:
            with open(temporary, "xb") as f:
                np.savez(f, **self.arrays)
            if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
                raise FileError(path, "is not a regular file (a device, FIFO or symbolic link); the trace was not "
                                      "written: mpitp replaces only regular files.")
            os.replace(temporary, path)
        except OSError as e:
            raise FileError(path, f"cannot write the trace ({e.strerror or e}); a trace already there is "
                                  "unchanged.") from None
        finally:  # after a failure (or Ctrl-C), the temporary is still there
            with contextlib.suppress(OSError):
                os.remove(temporary)


def temporary_name(path):
    """A new name beside ``path`` for the file written before it is renamed to ``path``."""
    return f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
