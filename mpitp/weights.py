"""Weights: this rank's shard of every weight, read from a Hugging Face checkpoint as its family's plan says.

The plan (``mpitp.families``) names each checkpoint tensor's mpitp weight(s) and split; ``mpitp.sharding.rank_slice``
gives the rank's block of each weight; here that block is found in the stored tensor and read: torch
``nn.Linear`` weights are stored ``[out, in]`` and are transposed to mpitp's ``[in, out]`` in this one place, and
a fused tensor's part (GPT-2's ``c_attn`` = [Q | K | V]) is shifted to its place along the output axis. A tensor
fused head by head (GPT-NeoX's ``query_key_value``) is read in one block, the rank's heads, and its parts moved
into their places (``read_per_head``).
"""

import math
from dataclasses import dataclass

import numpy as np

from .arena import Arena, padded_shape
from .errors import CheckpointError
from .families import FAMILIES
from .matrix import matrix
from .sharding import full_shape, rank_slice

MATRICES = {"W_QKV", "W_B", "W_C", "W_D", "W_vocab"}  # multiplied as ``mpitp.matrix.Matrix`` (a few rows: row by row)


@dataclass(kw_only=True)
class BlockWeights:
    """One transformer block's weights on one rank.

    Weights that multiply the same activation are stored side by side, so that a layer is one matrix
    product: W_QKV = [W_Q | W_K | W_V], and for Llama W_C = [W_gate | W_up]. A bias the model does not have
    is zeros; a norm without a bias (RMSNorm) has None.
    """

    norm_1_weight: np.ndarray  # [n_embd]
    norm_1_bias: np.ndarray | None = None  # [n_embd] (LayerNorm only)
    W_QKV: np.ndarray  # [n_embd, (n_head_local + 2 n_kv_head_local) d_head]  column-parallel
    b_QKV: np.ndarray  # [(n_head_local + 2 n_kv_head_local) d_head]
    norm_q_weight: np.ndarray | None = None  # [d_head]  QK-norm (Qwen3, Gemma 3), the same for every head
    norm_k_weight: np.ndarray | None = None  # [d_head]
    W_B: np.ndarray  # [n_head_local d_head, n_embd]  row-parallel
    b_B: np.ndarray  # [n_embd]  added once, after Allreduce #1
    post_norm_1_weight: np.ndarray | None = None  # [n_embd]  Gemma 3: the norm of the reduced attention output
    norm_2_weight: np.ndarray  # [n_embd]
    norm_2_bias: np.ndarray | None = None  # [n_embd]
    # The dense MLP (a mixture of experts' shared expert, Qwen2-MoE; None where a mixture has none)
    W_C: np.ndarray | None = None  # [n_embd, n_ffn_local] (GPT-2) or [n_embd, 2 n_ffn_local] = [W_gate | W_up]
    b_C: np.ndarray | None = None  # [n_ffn_local] or [2 n_ffn_local]
    W_D: np.ndarray | None = None  # [n_ffn_local, n_embd]  row-parallel
    b_D: np.ndarray | None = None  # [n_embd]  added once, after Allreduce #2
    post_norm_2_weight: np.ndarray | None = None  # [n_embd]  Gemma 3: the norm of the reduced MLP output
    # A mixture of experts (mpitp.experts): the router, replicated, and this rank's experts (or parts of them)
    W_router: np.ndarray | None = None  # [n_embd, n_expert]
    W_CE: np.ndarray | None = None  # [n_expert_local, n_embd, 2 n_expert_ffn_local]: each expert's [W_gate | W_up]
    W_DE: np.ndarray | None = None  # [n_expert_local, n_expert_ffn_local, n_embd]
    W_shared_gate: np.ndarray | None = None  # [n_embd, 1]  Qwen2-MoE: the shared expert's sigmoid gate


@dataclass(kw_only=True)
class GlobalWeights:
    """The weights outside the blocks."""

    W_embed: np.ndarray  # [n_vocab_local, n_embd]  vocab-parallel; a transposed view of W_vocab when tied
    W_pos: np.ndarray | None = None  # [n_ctx, n_embd]  GPT-2's learned positions
    norm_f_weight: np.ndarray  # [n_embd]
    norm_f_bias: np.ndarray | None = None  # [n_embd]
    W_vocab: np.ndarray  # [n_embd, n_vocab_local]  vocab-parallel LM head


def _fields(config):
    """The arrays a rank stores, in the order a forward reads them, and the mpitp weights stacked in each (the
    ones its family's plan has)."""
    family = FAMILIES[config.family]
    gated, planned = family.gated, family.weights() | {"W_vocab"}
    block = {"norm_1_weight": ["norm_1_weight"], "norm_1_bias": ["norm_1_bias"],
             "W_QKV": ["W_Q", "W_K", "W_V"], "b_QKV": ["b_Q", "b_K", "b_V"], "norm_q_weight": ["norm_q_weight"],
             "norm_k_weight": ["norm_k_weight"], "W_B": ["W_B"], "b_B": ["b_B"],
             "post_norm_1_weight": ["post_norm_1_weight"], "norm_2_weight": ["norm_2_weight"],
             "norm_2_bias": ["norm_2_bias"], "W_C": ["W_gate", "W_up"] if gated else ["W_C"],
             "b_C": ["b_gate", "b_up"] if gated else ["b_C"], "W_D": ["W_D"], "b_D": ["b_D"],
             "post_norm_2_weight": ["post_norm_2_weight"], "W_router": ["W_router"], "W_CE": ["W_gate_e", "W_up_e"],
             "W_DE": ["W_D_e"], "W_shared_gate": ["W_shared_gate"]}
    # The final norm and the LM head follow the last block; the embedding (a few rows per forward) comes last.
    glob = {"norm_f_weight": ["norm_f_weight"], "norm_f_bias": ["norm_f_bias"], "W_vocab": ["W_vocab"],
            "W_embed": ["W_embed"], "W_pos": ["W_pos"]}
    if config.tie_word_embeddings:  # the embedding is a view of the LM head
        del glob["W_embed"]
    return ({f: p for f, p in fields.items() if p[0] in planned} for fields in (block, glob))


def _stage_fields(config, part):
    """``_fields`` of a pipeline stage ``part`` (None: the whole model): the blocks' fields and its layers, and
    the outer weights it uses: the first stage embeds (a tied embedding is read as the LM head), the last normalizes
    and projects onto the vocabulary; a middle stage holds blocks only."""
    block, glob = _fields(config)
    if part is None:
        return block, glob, range(config.n_layer)
    used = (({"W_embed", "W_pos"} | ({"W_vocab"} if config.tie_word_embeddings else set())) if part.is_first
            else set()) | ({"norm_f_weight", "norm_f_bias", "W_vocab"} if part.is_last else set())
    return block, {f: p for f, p in glob.items() if f in used}, part.layers


def _has(config, name):
    # False for a linear bias the config switches off: it is held as zeros.
    return {"b_Q": config.qkv_bias, "b_K": config.qkv_bias, "b_V": config.qkv_bias, "b_B": config.out_bias,
            **dict.fromkeys(("b_C", "b_gate", "b_up", "b_D"), config.mlp_bias)}.get(name, True)


def local_shape(config, shard, name):
    # The shape of this rank's block of mpitp weight ``name``.
    return tuple(s.stop - s.start for s in rank_slice(config, shard, name, _row(config, name)[2]))


def _row(config, name):
    # The plan row of mpitp weight ``name``: (tensor, its weights, split). A tied LM head is the embedding's row,
    # read transposed.
    plan = FAMILIES[config.family].plan
    if name == "W_vocab" and config.tie_word_embeddings:
        name = "W_embed"
    return next(row for row in plan if name in (row[1] if isinstance(row[1], tuple) else (row[1],)))


def _source(config, name, prefix):
    # Where ``name`` is: (tensor name, transposed?, offset of its part along the output axis, stored shape).
    tied = name == "W_vocab" and config.tie_word_embeddings  # the embedding [n_vocab, n_embd], read transposed
    tensor, weights = _row(config, name)[:2]
    full, offset = full_shape(config, name), 0
    if isinstance(weights, tuple):  # fused: the parts side by side along the output axis
        widths = [full_shape(config, part)[-1] for part in weights]
        offset, full = sum(widths[:weights.index(name)]), full[:-1] + (sum(widths),)
    transposed = tied or (FAMILIES[config.family].linear_storage == "out_in" and len(full) == 2
                          and name not in ("W_embed", "W_pos"))
    return prefix + tensor, transposed, offset, full[::-1] if transposed else full


def checkpoint_shapes(config, prefix=""):
    """``{checkpoint tensor name: stored shape}`` of every tensor the model reads."""
    block, glob = _fields(config)
    shapes = {}
    for names, layers in ((block, range(config.n_layer)), (glob, [None])):
        for name in (n for parts in names.values() for n in parts if _has(config, n)):
            tensor, _, _, stored = _source(config, name, prefix)
            experts = range(config.n_expert) if "{e}" in tensor else [None]
            shapes.update((tensor.format(l=layer, e=e), stored) for layer in layers for e in experts)
    return shapes


def n_params(config):
    """Parameters as the checkpoint stores them (a tied LM head counted once)."""
    return sum(math.prod(shape) for shape in checkpoint_shapes(config).values())


def _checked(ckpt, config, name, layer, prefix, needed_as, expert=None):
    # (tensor name, transposed?, offset of the part) of mpitp weight ``name`` (of ``expert``), once the checkpoint
    # is seen to hold the tensor in the shape config.json implies.
    tensor, transposed, offset, stored = _source(config, name, prefix)
    tensor = tensor.format(l=layer, e=expert)
    if tensor not in ckpt:
        raise CheckpointError(ckpt.model_dir, tensor, f"tensor is missing (needed as {needed_as}).")
    if tuple(ckpt.shape(tensor)) != stored:
        raise CheckpointError(ckpt.path_of(tensor), tensor, f"shape {list(ckpt.shape(tensor))} does not match "
                                                            f"config.json, which implies {list(stored)}.")
    return tensor, transposed, offset


def read_weight(ckpt, config, shard, name, layer, out, prefix="", expert=None):
    """Read this rank's slice of the mpitp weight ``name`` (of block ``layer``, of ``expert``) into ``out``."""
    tensor, transposed, offset = _checked(ckpt, config, name, layer, prefix, name, expert)
    index = list(rank_slice(config, shard, name, _row(config, name)[2]))
    index[-1] = slice(index[-1].start + offset, index[-1].stop + offset)  # its part of a fused tensor
    # torch Linear storage is [out, in]: read the transposed block and transpose it into out.
    ckpt.read_into(tensor, out, tuple(index[::-1] if transposed else index), transpose=transposed)


def read_per_head(ckpt, config, shard, parts, layer, out, prefix=""):
    """Read this rank's heads of a tensor whose parts ``parts`` (q, k, v) interleave head by head, ``[q k v of head
    0 | q k v of head 1 | ...]`` along the output axis, into ``out`` = ``[..q of its heads | ..k | ..v]``. The rank's
    heads are one contiguous block of the stored tensor: one read, into a buffer the size of ``out``. (Every head has
    its own key/value head: GPT-NeoX has no grouped-query attention.)"""
    tensor, transposed, _ = _checked(ckpt, config, parts[0], layer, prefix, ", ".join(parts))
    index = list(rank_slice(config, shard, parts[0], _row(config, parts[0])[2]))
    cols, n = index[-1], len(parts)  # the rank's heads' columns of one part; n parts per head in the tensor
    index[-1] = slice(n * cols.start, n * cols.stop)
    block = np.empty(out.shape, out.dtype)
    ckpt.read_into(tensor, block, tuple(index[::-1] if transposed else index), transpose=transposed)
    # block's columns are (head, part, dim); out's are (part, head, dim)
    lead, heads, d = out.shape[:-1], shard.n_head_local, config.d_head
    out.reshape(lead + (n, heads, d))[...] = block.reshape(lead + (heads, n, d)).swapaxes(-3, -2)


def _stored(config, shard, parts):
    # The shape of a field: its parts side by side along the output axis; an expert's stacked per local expert.
    shapes = [local_shape(config, shard, name) for name in parts]
    stacked = (shard.n_expert_local,) if _row(config, parts[0])[2] == "expert" else ()
    return stacked + shapes[0][:-1] + (sum(s[-1] for s in shapes),)


def shard_bytes(config, shard, dtype, part=None):
    """Bytes of weights one rank will hold, known before reading any of them: the size of its arena (of its
    pipeline stage ``part``'s weights only)."""
    block, glob, layers = _stage_fields(config, part)
    block_shapes = [_stored(config, shard, p) for p in block.values()]
    glob_shapes = [(padded_shape if f == "W_vocab" else tuple)(_stored(config, shard, p)) for f, p in glob.items()]
    # Every block is the same size, and sizes are Python integers: an absurd config is measured exactly, at once.
    return sum(Arena.size_of([(math.prod(s),) for s in shapes], dtype) * n
               for shapes, n in ((block_shapes, len(layers)), (glob_shapes, 1)))


def load_weights(ckpt, config, shard, dtype, arena=True, part=None):
    """Read this rank's shard of every weight (of pipeline stage ``part``: its blocks, in order, and the outer
    weights it uses, the others None). Returns ``(blocks, global_weights)``.

    With ``arena`` (the default) the arrays are placed in one huge-page ``Arena`` in the order a forward
    reads them, the LM head's rows padded to whole cache lines (see ``mpitp.arena``); without it each is a
    plain NumPy array. Both hold the same values. The checkpoint's files are closed once read.
    """
    take = Arena(shard_bytes(config, shard, dtype, part)).take if arena else (lambda shape, dtype, padded=False:
                                                                          np.zeros(shape, dtype))
    prefixes = FAMILIES[config.family].tensor_prefixes
    first = _source(config, "norm_f_weight", "")[0]
    prefix = next((p for p in prefixes if p + first in ckpt), prefixes[0])
    block, glob, layers = _stage_fields(config, part)

    def read(field, parts, layer):
        out = take(_stored(config, shard, parts), dtype, padded=field == "W_vocab")
        col, experts = 0, _row(config, parts[0])[2] == "expert"  # an expert's field: one slab per local expert
        if _row(config, parts[0])[3:] == ("per_head",):  # fused head by head: all parts in one read
            if _has(config, parts[0]):
                read_per_head(ckpt, config, shard, parts, layer, out, prefix)
            parts = ()
        for name in parts:
            width = local_shape(config, shard, name)[-1]
            for i in range(shard.n_expert_local) if experts else [None]:
                if _has(config, name):  # a bias the model does not have stays zero
                    read_weight(ckpt, config, shard, name, layer, (out if i is None else out[i])[..., col:col + width],
                                prefix, None if i is None else shard.expert_start + i)
            col += width
        if "norm" in field and field.endswith("_weight"):
            out += config.norm_offset  # Gemma's norms scale by (1 + weight)
        return matrix(out) if field in MATRICES else out

    try:
        blocks = [BlockWeights(**{f: read(f, p, layer) for f, p in block.items()}) for layer in layers]
        arrays = dict.fromkeys(("W_embed", *list(_fields(config))[1])) | {f: read(f, p, None)
                                                                       for f, p in glob.items()}
    finally:
        getattr(ckpt, "close", lambda: None)()  # a stand-in for a checkpoint (the bench's) may hold no files
    if config.tie_word_embeddings and arrays["W_vocab"] is not None:  # a middle stage has neither
        arrays["W_embed"] = arrays["W_vocab"].T.view(np.ndarray)  # [n_vocab_local, n_embd]: a view
    return blocks, GlobalWeights(**arrays)
