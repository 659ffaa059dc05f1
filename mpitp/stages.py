"""Pipeline stages: which ranks form which stage, which layers each stage holds, and a stage's part of a forward.

``--pp S`` cuts the ranks into S stages of (ranks / S) tensor-parallel ranks each (``split_stages``: ``comm.Split``
gives each stage its own communicator, on which the seed's block runs unchanged). Stage s holds a contiguous range
of layers (``stage_layers``: near-equal in bytes, the first stage's embedding and the last stage's LM head
counted), and only those are read from the checkpoint. ``stage_forward`` is one stage's part of a forward: the
embedding on the first, then its blocks. ``mpitp.pipeline`` moves the residual rows between the stages.
"""

from collections import namedtuple
from dataclasses import dataclass

import numpy as np

from . import comm as mpi
from .errors import RequestError
from .sharding import shard_for
from .weights import shard_bytes


@dataclass(frozen=True)
class StageGroup:
    """This rank's place in the pipeline, before the model is known: stage ``index`` of ``count``, and ``pipe``,
    the communicator of every rank of every stage (the stages' point-to-point messages). Rank r of ``pipe`` is
    tensor-parallel rank ``r % tp`` of stage ``r // tp``."""

    index: int
    count: int
    tp: int  # ranks per stage
    pipe: object

    def peer(self, stage):
        """The rank of ``pipe`` that has this rank's tensor-parallel place in ``stage``."""
        return stage * self.tp + self.pipe.Get_rank() % self.tp


@dataclass(frozen=True)
class Stage(StageGroup):
    """A ``StageGroup`` placed on a model: it holds layers ``first_layer .. first_layer + n_layer_local - 1``."""

    first_layer: int = 0
    n_layer_local: int = 0
    counts: tuple = ()  # layers of every stage, in order

    layers = property(lambda s: range(s.first_layer, s.first_layer + s.n_layer_local))
    is_first = property(lambda s: s.index == 0)
    is_last = property(lambda s: s.index == s.count - 1)


Part = namedtuple("Part", "layers is_first is_last")  # what of the model a stage holds (``mpitp.weights``)


def check_stage_count(size, pp):
    """Raise ``RequestError`` unless ``pp`` stages can be made of ``size`` ranks (deterministic: every rank alike)."""
    if isinstance(pp, bool) or not isinstance(pp, int) or not 1 <= pp <= size or size % pp:
        divisors = [d for d in range(1, size + 1) if size % d == 0]
        raise RequestError(f"--pp {pp}: {size} rank{'s' if size > 1 else ''} (mpirun -n {size}) cannot form {pp} "
                           f"pipeline stages of equally many ranks; use --pp {', '.join(map(str, divisors))}.")


def split_stages(comm, pp):
    """This rank's ``StageGroup`` of ``pp`` stages over the ranks of ``comm`` and its stage's tensor-parallel
    communicator: ``(tp_comm, group)``. Collective over ``comm`` (every rank must call it with the same ``pp``);
    raises ``RequestError`` on every rank alike, before communicating, when ``pp`` does not divide the ranks."""
    size, rank = comm.Get_size(), comm.Get_rank()
    check_stage_count(size, pp)
    tp = size // pp
    return mpi.split(comm, rank // tp, rank), StageGroup(index=rank // tp, count=pp, tp=tp, pipe=comm)


def stage_layers(n_layer, pp, layer_bytes, first_bytes, last_bytes, given=None):
    """Layers per stage: ``given`` (``--pp-layers``) checked, or near-equal in bytes: every stage at least one
    layer, each further one to the stage that would then hold the fewest bytes, the first stage's extra
    ``first_bytes`` (embedding) and the last's ``last_bytes`` (final norm, LM head) counted."""
    if pp > n_layer:
        raise RequestError(f"--pp {pp}: more pipeline stages than the model's {n_layer} layers; use --pp 1 to "
                           f"{n_layer}.")
    if given is not None:
        if len(given) != pp or min(given) < 1 or sum(given) != n_layer:
            raise RequestError(f"--pp-layers {','.join(map(str, given))}: give {pp} count{'s' * (pp > 1)} of at least "
                               f"1 layer each (one per stage), summing to the model's {n_layer} layers.")
        return tuple(given)
    counts = [1] * pp
    extra = [0] * pp
    extra[0] += first_bytes
    extra[-1] += last_bytes
    for _ in range(n_layer - pp):
        s = min(range(pp), key=lambda s: (counts[s] + 1) * layer_bytes + extra[s])  # the lowest stage on ties
        counts[s] += 1
    return tuple(counts)


def layer_counts(config, group, given=None):
    """Layers per stage of ``config``'s model for ``group``'s layout: ``stage_layers`` weighing the bytes one
    tensor-parallel rank holds of a layer, of the embedding and of the final norm and LM head."""
    shard = shard_for(config, 0, group.tp)
    size = lambda n, first, last: shard_bytes(config, shard, np.float32, Part(range(n), first, last))  # noqa: E731
    return stage_layers(config.n_layer, group.count, size(1, False, False), size(0, True, False),
                        size(0, False, True), given)


def place(group, counts):
    """``group`` holding its stage's layers of ``counts`` (``layer_counts``)."""
    first = sum(counts[:group.index])
    return Stage(index=group.index, count=group.count, tp=group.tp, pipe=group.pipe, first_layer=first,
                 n_layer_local=counts[group.index], counts=tuple(counts))


class StageCache:
    """The KV cache of a stage: a ``KVCache`` of its layers only, addressed by the model's layer numbers (the
    block's ``layer``, which the trace records, stays the model's)."""

    def __init__(self, cache, first_layer):
        self.cache, self.first_layer = cache, first_layer

    def update(self, layer, K_new, V_new):
        return self.cache.update(layer - self.first_layer, K_new, V_new)

    def row(self, b, n=1):
        """Sequences ``b .. b + n - 1`` alone, sharing this cache's memory."""
        return StageCache(self.cache.row(b, n), self.first_layer)

    def __getattr__(self, name):  # lengths, positions, advance, keep, reset: as the KVCache's
        return getattr(self.cache, name)


def stage_forward(model, cache, n_seq, x):
    """This stage's part of a forward of ``n_seq`` new tokens per sequence of ``cache``: ``x`` is the token ids
    ``[n_rows]`` on the first stage (embedded here), the residual rows ``[n_rows, n_embd]`` received from the
    previous stage on the others; returns the rows after this stage's blocks, ``[n_rows, n_embd]``."""
    positions = cache.positions(n_seq)  # [n_batch, n_seq]
    masks, ropes = model.tables(positions, cache)
    if model.stage.is_first:
        x = model.embed(np.asarray(x), positions.ravel())
    for layer, w in zip(model.stage.layers, model.blocks):
        window = model.windows[layer]
        x = model.block_fn(x, w, layer, cache, ropes[window], masks[window])
    cache.advance(n_seq)
    return x
