"""Weights: from Hugging Face checkpoint names to this rank's shard of each mpitp weight.

Policy lives in two tables: ``_NAMES`` maps mpitp names to checkpoint names (per model family) and
``SPLIT`` says how each mpitp weight is split over ranks. The single mechanism, ``_read``, turns a table
entry and the rank's ``Shard`` into the one slice of the checkpoint this rank reads.

Orientation: mpitp stores every linear weight ``[in, out]`` (a layer is ``x @ W``). GPT-2's Conv1D weights
are already ``[in, out]``; torch ``nn.Linear`` weights (Llama) are ``[out, in]`` and are transposed here, in
this one place. GPT-2 fuses Q, K and V in one ``c_attn`` weight ``[n_embd, 3 * n_embd]``: it is split into
its three parts *before* a rank's head columns are taken (a plain P-way split of the fused matrix is wrong).
"""

from dataclasses import dataclass, fields

import numpy as np

from .errors import CheckpointError

# How each mpitp weight is split. "column": split the output axis (last); "row": split the input axis
# (first) -- its product is a partial sum completed by an Allreduce, and its bias is added once, after;
# "replicate": every rank holds all of it. The second item names the range from the Shard.
SPLIT = {
    "W_Q": ("column", "q_cols"), "b_Q": ("column", "q_cols"),
    "W_K": ("column", "kv_cols"), "b_K": ("column", "kv_cols"),
    "W_V": ("column", "kv_cols"), "b_V": ("column", "kv_cols"),
    "W_B": ("row", "q_cols"), "b_B": ("replicate", None),
    "W_C": ("column", "ffn_cols"), "b_C": ("column", "ffn_cols"),
    "W_gate": ("column", "ffn_cols"), "b_gate": ("column", "ffn_cols"),
    "W_up": ("column", "ffn_cols"), "b_up": ("column", "ffn_cols"),
    "W_D": ("row", "ffn_cols"), "b_D": ("replicate", None),
    "norm_1_weight": ("replicate", None), "norm_1_bias": ("replicate", None),
    "norm_2_weight": ("replicate", None), "norm_2_bias": ("replicate", None),
    "W_embed": ("replicate", None), "W_pos": ("replicate", None),
    "norm_f_weight": ("replicate", None), "norm_f_bias": ("replicate", None),
    "W_vocab": ("replicate", None),
}


@dataclass(frozen=True)
class Source:
    """Where an mpitp weight lives in a checkpoint."""

    name: str  # checkpoint tensor name; "{l}" is the layer index
    linear: bool = False  # stored [out, in] (torch nn.Linear): transpose to mpitp's [in, out]
    part: int = 0  # for fused tensors: which of n_parts equal pieces along the output axis
    n_parts: int = 1


_GPT2_LAYER = {
    "norm_1_weight": Source("h.{l}.ln_1.weight"), "norm_1_bias": Source("h.{l}.ln_1.bias"),
    "W_Q": Source("h.{l}.attn.c_attn.weight", part=0, n_parts=3),
    "W_K": Source("h.{l}.attn.c_attn.weight", part=1, n_parts=3),
    "W_V": Source("h.{l}.attn.c_attn.weight", part=2, n_parts=3),
    "b_Q": Source("h.{l}.attn.c_attn.bias", part=0, n_parts=3),
    "b_K": Source("h.{l}.attn.c_attn.bias", part=1, n_parts=3),
    "b_V": Source("h.{l}.attn.c_attn.bias", part=2, n_parts=3),
    "W_B": Source("h.{l}.attn.c_proj.weight"), "b_B": Source("h.{l}.attn.c_proj.bias"),
    "norm_2_weight": Source("h.{l}.ln_2.weight"), "norm_2_bias": Source("h.{l}.ln_2.bias"),
    "W_C": Source("h.{l}.mlp.c_fc.weight"), "b_C": Source("h.{l}.mlp.c_fc.bias"),
    "W_D": Source("h.{l}.mlp.c_proj.weight"), "b_D": Source("h.{l}.mlp.c_proj.bias"),
}
_GPT2_GLOBAL = {
    "W_embed": Source("wte.weight"), "W_pos": Source("wpe.weight"),
    "norm_f_weight": Source("ln_f.weight"), "norm_f_bias": Source("ln_f.bias"),
}
_LLAMA_LAYER = {
    "norm_1_weight": Source("model.layers.{l}.input_layernorm.weight"),
    "W_Q": Source("model.layers.{l}.self_attn.q_proj.weight", linear=True),
    "W_K": Source("model.layers.{l}.self_attn.k_proj.weight", linear=True),
    "W_V": Source("model.layers.{l}.self_attn.v_proj.weight", linear=True),
    "b_Q": Source("model.layers.{l}.self_attn.q_proj.bias"),
    "b_K": Source("model.layers.{l}.self_attn.k_proj.bias"),
    "b_V": Source("model.layers.{l}.self_attn.v_proj.bias"),
    "W_B": Source("model.layers.{l}.self_attn.o_proj.weight", linear=True),
    "b_B": Source("model.layers.{l}.self_attn.o_proj.bias"),
    "norm_2_weight": Source("model.layers.{l}.post_attention_layernorm.weight"),
    "W_gate": Source("model.layers.{l}.mlp.gate_proj.weight", linear=True),
    "W_up": Source("model.layers.{l}.mlp.up_proj.weight", linear=True),
    "b_gate": Source("model.layers.{l}.mlp.gate_proj.bias"),
    "b_up": Source("model.layers.{l}.mlp.up_proj.bias"),
    "W_D": Source("model.layers.{l}.mlp.down_proj.weight", linear=True),
    "b_D": Source("model.layers.{l}.mlp.down_proj.bias"),
}
_LLAMA_GLOBAL = {
    "W_embed": Source("model.embed_tokens.weight"),
    "norm_f_weight": Source("model.norm.weight"),
    "W_vocab": Source("lm_head.weight", linear=True),
}
_NAMES = {"gpt2": (_GPT2_LAYER, _GPT2_GLOBAL), "llama": (_LLAMA_LAYER, _LLAMA_GLOBAL)}


@dataclass
class BlockWeights:
    """One transformer block's weights on one rank (None where the architecture has no such weight)."""

    norm_1_weight: np.ndarray  # [n_embd]
    norm_1_bias: np.ndarray | None  # [n_embd] (LayerNorm only)
    W_Q: np.ndarray  # [n_embd, n_head_local * d_head]   column-parallel
    W_K: np.ndarray  # [n_embd, n_kv_head_local * d_head]  column-parallel
    W_V: np.ndarray  # [n_embd, n_kv_head_local * d_head]  column-parallel
    b_Q: np.ndarray | None  # [n_head_local * d_head]
    b_K: np.ndarray | None  # [n_kv_head_local * d_head]
    b_V: np.ndarray | None  # [n_kv_head_local * d_head]
    W_B: np.ndarray  # [n_head_local * d_head, n_embd]  row-parallel
    b_B: np.ndarray | None  # [n_embd] replicated, added once after Allreduce #1
    norm_2_weight: np.ndarray  # [n_embd]
    norm_2_bias: np.ndarray | None  # [n_embd]
    W_C: np.ndarray | None  # [n_embd, n_ffn_local]  column-parallel (GPT-2)
    b_C: np.ndarray | None  # [n_ffn_local]
    W_gate: np.ndarray | None  # [n_embd, n_ffn_local]  column-parallel (Llama)
    b_gate: np.ndarray | None  # [n_ffn_local]
    W_up: np.ndarray | None  # [n_embd, n_ffn_local]  column-parallel (Llama)
    b_up: np.ndarray | None  # [n_ffn_local]
    W_D: np.ndarray  # [n_ffn_local, n_embd]  row-parallel
    b_D: np.ndarray | None  # [n_embd] replicated, added once after Allreduce #2


@dataclass
class GlobalWeights:
    """The replicated weights outside the blocks."""

    W_embed: np.ndarray  # [n_vocab, n_embd]
    W_pos: np.ndarray | None  # [n_ctx, n_embd] (GPT-2 learned positions)
    norm_f_weight: np.ndarray  # [n_embd]
    norm_f_bias: np.ndarray | None  # [n_embd]
    W_vocab: np.ndarray  # [n_embd, n_vocab]; a transposed view of W_embed when tied


def _full_shape(config, name):
    """The full (unsplit) shape of an mpitp weight, in mpitp's [in, out] orientation."""
    d, q, kv, f = config.n_embd, config.n_head * config.d_head, config.n_kv_head * config.d_head, config.n_ffn
    return {
        "W_Q": (d, q), "b_Q": (q,), "W_K": (d, kv), "b_K": (kv,), "W_V": (d, kv), "b_V": (kv,),
        "W_B": (q, d), "b_B": (d,), "W_C": (d, f), "b_C": (f,), "W_gate": (d, f), "b_gate": (f,),
        "W_up": (d, f), "b_up": (f,), "W_D": (f, d), "b_D": (d,),
        "norm_1_weight": (d,), "norm_1_bias": (d,), "norm_2_weight": (d,), "norm_2_bias": (d,),
        "norm_f_weight": (d,), "norm_f_bias": (d,), "W_embed": (config.n_vocab, d),
        "W_pos": (config.n_ctx, d), "W_vocab": (d, config.n_vocab),
    }[name]


def _read(ckpt, ckpt_name, src, name, config, shard, dtype):
    """Read this rank's slice of one mpitp weight from the checkpoint."""
    full = _full_shape(config, name)
    # The stored shape: fused parts widen the output axis; Linear storage swaps the two axes.
    stored = full[:-1] + (full[-1] * src.n_parts,)
    if src.linear:
        stored = stored[::-1]
    if ckpt_name not in ckpt:
        raise CheckpointError(ckpt.model_dir, ckpt_name, f"tensor is missing (needed as {name}).")
    if tuple(ckpt.shape(ckpt_name)) != stored:
        raise CheckpointError(ckpt.path_of(ckpt_name), ckpt_name,
                              f"shape {list(ckpt.shape(ckpt_name))} does not match config.json, which "
                              f"implies {list(stored)}.")
    kind, attr = SPLIT[name]
    out_axis = len(full) - 1
    if kind == "replicate":
        sl = slice(0, full[-1]) if src.n_parts > 1 else slice(None)
        index = [slice(None)] * len(full)
        index[out_axis] = sl
    else:
        local = getattr(shard, attr)
        axis = out_axis if kind == "column" else 0
        index = [slice(None)] * len(full)
        index[axis] = local
    if src.n_parts > 1:  # shift the output-axis range into this part of the fused tensor
        s = index[out_axis]
        start, stop = (s.start or 0), (s.stop if s.stop is not None else full[-1])
        offset = src.part * full[-1]
        index[out_axis] = slice(start + offset, stop + offset)
    if src.linear:
        index = index[::-1]
    part = ckpt.read(ckpt_name, dtype, tuple(index))
    # A transposed view: numpy hands it to BLAS as a transposed operand, with no copy at load or at run time.
    return part.T if src.linear else part


def _gpt2_prefix(ckpt):
    # save_pretrained writes "transformer.wte.weight"; checkpoints on the Hub write "wte.weight".
    return "transformer." if "transformer.wte.weight" in ckpt else ""


def load_weights(ckpt, config, shard, dtype):
    """Read this rank's shard of every weight. Returns ``(blocks, global_weights)``.

    Parameters
    ----------
    ckpt : Checkpoint
    config : ModelConfig
    shard : Shard
    dtype : numpy dtype
        Every weight is cast to it at load.
    """
    layer_names, global_names = _NAMES[config.family]
    prefix = _gpt2_prefix(ckpt) if config.family == "gpt2" else ""
    optional = set() if config.qkv_bias else {"b_Q", "b_K", "b_V"}
    if not config.out_bias:
        optional.add("b_B")
    if not config.mlp_bias:
        optional |= {"b_C", "b_gate", "b_up", "b_D"}

    def get(name, src, layer=None):
        if name in optional:
            return None
        ckpt_name = prefix + src.name.format(l=layer)
        return _read(ckpt, ckpt_name, src, name, config, shard, dtype)

    blocks = []
    block_fields = [f.name for f in fields(BlockWeights)]
    for layer in range(config.n_layer):
        values = {name: get(name, layer_names[name], layer) if name in layer_names else None
                  for name in block_fields}
        blocks.append(BlockWeights(**values))
    g = {name: get(name, src) for name, src in global_names.items()
         if not (name == "W_vocab" and config.tie_word_embeddings)}
    W_embed = g["W_embed"]
    return blocks, GlobalWeights(
        W_embed=W_embed, W_pos=g.get("W_pos"), norm_f_weight=g["norm_f_weight"],
        norm_f_bias=g.get("norm_f_bias"),
        W_vocab=W_embed.T if config.tie_word_embeddings else g["W_vocab"],
    )
