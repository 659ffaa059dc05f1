"""Weights: from Hugging Face checkpoint names to this rank's shard of each mpitp weight.

Policy lives in tables: ``_GPT2`` and ``_LLAMA`` map mpitp names to checkpoint tensors, ``SPLIT`` says how
each is split; ``read_weight`` turns an entry and the rank's ``Shard`` into the one slice this rank reads.
GPT-2's Conv1D weights are already mpitp's ``[in, out]``; torch ``nn.Linear`` weights (Llama) are ``[out, in]``
and are transposed here, in this one place. GPT-2 fuses Q, K and V in one ``c_attn`` weight ``[n_embd, 3 *
n_embd]``: it is cut into its three parts *before* a rank's head columns are taken (a plain P-way split of the
fused matrix is wrong).
"""

import math
from dataclasses import dataclass, replace

import numpy as np

from .arena import Arena, padded_shape
from .errors import CheckpointError

# How each weight is split ("column": its last axis, "row": its first; see mpitp.sharding), and which range of the
# Shard it takes. A column's bias is split with it; a row's bias is replicated and added once, after the reduce.
# Anything else (the norms, GPT-2's learned positions) is replicated.
SPLIT = {"W_Q": ("column", "q_cols"), "W_K": ("column", "kv_cols"), "W_V": ("column", "kv_cols"),
         "W_B": ("row", "q_cols"), "W_C": ("column", "ffn_cols"), "W_gate": ("column", "ffn_cols"),
         "W_up": ("column", "ffn_cols"), "W_D": ("row", "ffn_cols"),
         "W_vocab": ("column", "vocab_cols"), "W_embed": ("row", "vocab_cols")}


@dataclass(frozen=True)
class Source:
    """Where an mpitp weight lives in a checkpoint."""

    name: str  # checkpoint tensor name; "{l}" is the layer index
    torch_linear: bool = False  # stored [out, in] as torch nn.Linear does: transposed to mpitp's [in, out]
    part: int = 0  # in a fused tensor: which of n_parts equal pieces along the output axis
    n_parts: int = 1


_GPT2 = {
    "norm_1_weight": Source("h.{l}.ln_1.weight"), "norm_1_bias": Source("h.{l}.ln_1.bias"),
    **{f"W_{x}": Source("h.{l}.attn.c_attn.weight", part=i, n_parts=3) for i, x in enumerate("QKV")},
    **{f"b_{x}": Source("h.{l}.attn.c_attn.bias", part=i, n_parts=3) for i, x in enumerate("QKV")},
    "W_B": Source("h.{l}.attn.c_proj.weight"), "b_B": Source("h.{l}.attn.c_proj.bias"),
    "norm_2_weight": Source("h.{l}.ln_2.weight"), "norm_2_bias": Source("h.{l}.ln_2.bias"),
    "W_C": Source("h.{l}.mlp.c_fc.weight"), "b_C": Source("h.{l}.mlp.c_fc.bias"),
    "W_D": Source("h.{l}.mlp.c_proj.weight"), "b_D": Source("h.{l}.mlp.c_proj.bias"),
    "norm_f_weight": Source("ln_f.weight"), "norm_f_bias": Source("ln_f.bias"),
    "W_embed": Source("wte.weight"), "W_pos": Source("wpe.weight"),  # GPT-2's LM head is tied to W_embed
}
_LLAMA_LINEAR = {"Q": "self_attn.q_proj", "K": "self_attn.k_proj", "V": "self_attn.v_proj", "B": "self_attn.o_proj",
                 "gate": "mlp.gate_proj", "up": "mlp.up_proj", "D": "mlp.down_proj"}
_LLAMA = {
    **{f"W_{x}": Source(f"model.layers.{{l}}.{m}.weight", torch_linear=True) for x, m in _LLAMA_LINEAR.items()},
    **{f"b_{x}": Source(f"model.layers.{{l}}.{m}.bias") for x, m in _LLAMA_LINEAR.items()},
    "norm_1_weight": Source("model.layers.{l}.input_layernorm.weight"),
    "norm_2_weight": Source("model.layers.{l}.post_attention_layernorm.weight"),
    "norm_f_weight": Source("model.norm.weight"),
    "W_vocab": Source("lm_head.weight", torch_linear=True), "W_embed": Source("model.embed_tokens.weight"),
}


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
    W_B: np.ndarray  # [n_head_local d_head, n_embd]  row-parallel
    b_B: np.ndarray  # [n_embd]  added once, after Allreduce #1
    norm_2_weight: np.ndarray  # [n_embd]
    norm_2_bias: np.ndarray | None = None  # [n_embd]
    W_C: np.ndarray  # [n_embd, n_ffn_local] (GPT-2) or [n_embd, 2 n_ffn_local] = [W_gate | W_up]  column-parallel
    b_C: np.ndarray  # [n_ffn_local] or [2 n_ffn_local]
    W_D: np.ndarray  # [n_ffn_local, n_embd]  row-parallel
    b_D: np.ndarray  # [n_embd]  added once, after Allreduce #2


@dataclass(kw_only=True)
class GlobalWeights:
    """The weights outside the blocks."""

    W_embed: np.ndarray  # [n_vocab_local, n_embd]  vocab-parallel; a transposed view of W_vocab when tied
    W_pos: np.ndarray | None = None  # [n_ctx, n_embd]  GPT-2's learned positions
    norm_f_weight: np.ndarray  # [n_embd]
    norm_f_bias: np.ndarray | None = None  # [n_embd]
    W_vocab: np.ndarray  # [n_embd, n_vocab_local]  vocab-parallel LM head


def _fields(config):
    """The arrays a rank stores, in the order a forward reads them, and the mpitp weights stacked in each."""
    gated = config.family == "llama"
    block = {"norm_1_weight": ["norm_1_weight"], "norm_1_bias": ["norm_1_bias"],
             "W_QKV": ["W_Q", "W_K", "W_V"], "b_QKV": ["b_Q", "b_K", "b_V"], "W_B": ["W_B"], "b_B": ["b_B"],
             "norm_2_weight": ["norm_2_weight"], "norm_2_bias": ["norm_2_bias"],
             "W_C": ["W_gate", "W_up"] if gated else ["W_C"], "b_C": ["b_gate", "b_up"] if gated else ["b_C"],
             "W_D": ["W_D"], "b_D": ["b_D"]}
    # The final norm and the LM head follow the last block; the embedding (a few rows per forward) comes last.
    glob = {"norm_f_weight": ["norm_f_weight"], "norm_f_bias": ["norm_f_bias"], "W_vocab": ["W_vocab"],
            "W_embed": ["W_embed"], "W_pos": ["W_pos"]}
    if gated:  # RMSNorm has no bias, Llama no learned positions
        del block["norm_1_bias"], block["norm_2_bias"], glob["norm_f_bias"], glob["W_pos"]
    if config.tie_word_embeddings:  # the embedding is a view of the LM head
        del glob["W_embed"]
    return block, glob


def _has(config, name):
    # False for a linear bias the config switches off: it is held as zeros.
    return {"b_Q": config.qkv_bias, "b_K": config.qkv_bias, "b_V": config.qkv_bias, "b_B": config.out_bias,
            **dict.fromkeys(("b_C", "b_gate", "b_up", "b_D"), config.mlp_bias)}.get(name, True)


def full_shape(config, name):
    """The full (unsplit) shape of an mpitp weight, in mpitp's [in, out] orientation."""
    d, q, kv, f = config.n_embd, config.n_head * config.d_head, config.n_kv_head * config.d_head, config.n_ffn
    return {"W_Q": (d, q), "b_Q": (q,), "W_K": (d, kv), "b_K": (kv,), "W_V": (d, kv), "b_V": (kv,),
            "W_B": (q, d), "W_C": (d, f), "b_C": (f,), "W_gate": (d, f), "b_gate": (f,), "W_up": (d, f),
            "b_up": (f,), "W_D": (f, d), "W_embed": (config.n_vocab, d), "W_pos": (config.n_ctx, d),
            "W_vocab": (d, config.n_vocab)}.get(name, (d,))


def _index(config, shard, name):
    # This rank's block of the full mpitp weight ``name``, as one slice per axis (SPLIT says how).
    index = [slice(0, n) for n in full_shape(config, name)]
    kind, rng = SPLIT.get(name.replace("b_", "W_", 1), (None, None))
    if kind == "column" or (kind == "row" and not name.startswith("b_")):
        index[-1 if kind == "column" else 0] = getattr(shard, rng)
    return index


def local_shape(config, shard, name):
    return tuple(s.stop - s.start for s in _index(config, shard, name))


def _source(config, name, prefix):
    # Where ``name`` is in the checkpoint, and the shape the checkpoint stores that tensor in.
    table = _GPT2 if config.family == "gpt2" else _LLAMA
    tied = name == "W_vocab" and config.tie_word_embeddings  # the embedding [n_vocab, n_embd], read transposed
    src = Source(table["W_embed"].name, torch_linear=True) if tied else table[name]
    src = replace(src, name=prefix + src.name)
    full = full_shape(config, name)
    stored = full[:-1] + (full[-1] * src.n_parts,)  # fused parts widen the output axis
    return src, stored[::-1] if src.torch_linear else stored


def checkpoint_shapes(config, prefix=""):
    """``{checkpoint tensor name: stored shape}`` of every tensor the model reads."""
    block, glob = _fields(config)
    shapes = {}
    for names, layers in ((block, range(config.n_layer)), (glob, [None])):
        for name in (n for parts in names.values() for n in parts if _has(config, n)):
            src, stored = _source(config, name, prefix)
            shapes.update((src.name.format(l=layer), stored) for layer in layers)
    return shapes


def n_params(config):
    """Parameters as the checkpoint stores them (a tied LM head counted once)."""
    return sum(math.prod(shape) for shape in checkpoint_shapes(config).values())


def read_weight(ckpt, config, shard, name, layer, out, prefix=""):
    """Read this rank's slice of the mpitp weight ``name`` (of block ``layer``) into ``out``."""
    src, stored = _source(config, name, prefix)
    tensor = src.name.format(l=layer)
    if tensor not in ckpt:
        raise CheckpointError(ckpt.model_dir, tensor, f"tensor is missing (needed as {name}).")
    if tuple(ckpt.shape(tensor)) != stored:
        raise CheckpointError(ckpt.path_of(tensor), tensor, f"shape {list(ckpt.shape(tensor))} does not match "
                                                            f"config.json, which implies {list(stored)}.")
    index = _index(config, shard, name)
    if src.n_parts > 1:  # shift the output-axis range into this part of the fused tensor
        s, offset = index[-1], src.part * full_shape(config, name)[-1]
        index[-1] = slice(s.start + offset, s.stop + offset)
    # torch Linear storage is [out, in]: read the transposed block and transpose it into out.
    ckpt.read_into(tensor, out, tuple(index[::-1] if src.torch_linear else index), transpose=src.torch_linear)


def _stored(config, shard, parts):
    # The shape of a field: its parts side by side along the output axis.
    shapes = [local_shape(config, shard, name) for name in parts]
    return shapes[0][:-1] + (sum(s[-1] for s in shapes),)


def shard_bytes(config, shard, dtype):
    """Bytes of weights one rank will hold, known before reading any of them: the size of its arena."""
    block, glob = _fields(config)
    block_shapes = [_stored(config, shard, p) for p in block.values()]
    glob_shapes = [(padded_shape if f == "W_vocab" else tuple)(_stored(config, shard, p)) for f, p in glob.items()]
    # Every block is the same size, and sizes are Python integers: an absurd config is measured exactly, at once.
    return sum(Arena.size_of([(math.prod(s),) for s in shapes], dtype) * n
               for shapes, n in ((block_shapes, config.n_layer), (glob_shapes, 1)))


def load_weights(ckpt, config, shard, dtype, arena=True):
    """Read this rank's shard of every weight. Returns ``(blocks, global_weights)``.

    With ``arena`` (the default) the arrays are placed in one huge-page ``Arena`` in the order a forward
    reads them, the LM head's rows padded to whole cache lines (see ``mpitp.arena``); without it each is a
    plain NumPy array. Both hold the same values. The checkpoint's files are closed once read.
    """
    take = Arena(shard_bytes(config, shard, dtype)).take if arena else (lambda shape, dtype, padded=False:
                                                                          np.zeros(shape, dtype))
    prefix = "transformer." if config.family == "gpt2" and "transformer.wte.weight" in ckpt else ""
    block, glob = _fields(config)

    def read(field, parts, layer):
        out = take(_stored(config, shard, parts), dtype, padded=field == "W_vocab")
        col = 0
        for name in parts:
            width = local_shape(config, shard, name)[-1]
            if _has(config, name):  # a bias the model does not have stays zero
                read_weight(ckpt, config, shard, name, layer, out[..., col:col + width], prefix)
            col += width
        return out

    try:
        blocks = [BlockWeights(**{f: read(f, p, layer) for f, p in block.items()}) for layer in range(config.n_layer)]
        arrays = {f: read(f, p, None) for f, p in glob.items()}
    finally:
        getattr(ckpt, "close", lambda: None)()  # a stand-in for a checkpoint (the bench's) may hold no files
    if config.tie_word_embeddings:
        arrays["W_embed"] = arrays["W_vocab"].T  # [n_vocab_local, n_embd]: a view
    return blocks, GlobalWeights(**arrays)
