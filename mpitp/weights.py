"""Weights: from Hugging Face checkpoint names to this rank's shard of each mpitp weight.

Policy lives in two tables: ``_NAMES`` maps mpitp names to checkpoint names (per model family) and
``SPLIT`` says how each mpitp weight is split over ranks. The single mechanism, ``_read``, turns a table
entry and the rank's ``Shard`` into the one slice of the checkpoint this rank reads.

Orientation: mpitp stores every linear weight ``[in, out]`` (a layer is ``x @ W``). GPT-2's Conv1D weights
are already ``[in, out]``; torch ``nn.Linear`` weights (Llama) are ``[out, in]`` and are transposed here, in
this one place. GPT-2 fuses Q, K and V in one ``c_attn`` weight ``[n_embd, 3 * n_embd]``: it is split into
its three parts *before* a rank's head columns are taken (a plain P-way split of the fused matrix is wrong).
"""

from dataclasses import dataclass

import numpy as np

from .arena import Arena
from .errors import CheckpointError

# How each mpitp weight is split. "column": split the output axis (last); "row": split the input axis
# (first) -- its product is a partial sum completed by an Allreduce, and its bias is added once, after;
# "replicate": every rank holds all of it. The second item names the range from the Shard. The embedding's
# rows and the LM head's columns are the rank's vocabulary range (all of it when the head is replicated).
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
    "W_embed": ("row", "vocab_cols"), "W_pos": ("replicate", None),
    "norm_f_weight": ("replicate", None), "norm_f_bias": ("replicate", None),
    "W_vocab": ("column", "vocab_cols"),
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
    """One transformer block's weights on one rank (None where the architecture has no such weight).

    Weights that multiply the same activation are stored side by side in one matrix, so a layer is one
    matrix product (and one pass over memory): W_QKV = [W_Q | W_K | W_V]; for Llama W_C = [W_gate | W_up].
    W_Q, W_K, W_V, W_gate, W_up (and their biases) are views into them.
    """

    norm_1_weight: np.ndarray  # [n_embd]
    norm_1_bias: np.ndarray | None  # [n_embd] (LayerNorm only)
    W_QKV: np.ndarray  # [n_embd, (n_head_local + 2 * n_kv_head_local) * d_head]  column-parallel
    b_QKV: np.ndarray | None  # [(n_head_local + 2 * n_kv_head_local) * d_head]
    W_B: np.ndarray  # [n_head_local * d_head, n_embd]  row-parallel
    b_B: np.ndarray | None  # [n_embd] replicated, added once after Allreduce #1
    norm_2_weight: np.ndarray  # [n_embd]
    norm_2_bias: np.ndarray | None  # [n_embd]
    W_C: np.ndarray  # [n_embd, n_ffn_local] (GPT-2) or [n_embd, 2 * n_ffn_local] = [W_gate | W_up]  column-parallel
    b_C: np.ndarray | None  # [n_ffn_local] or [2 * n_ffn_local]
    W_D: np.ndarray  # [n_ffn_local, n_embd]  row-parallel
    b_D: np.ndarray | None  # [n_embd] replicated, added once after Allreduce #2
    q_width: int  # n_head_local * d_head: where W_K starts in W_QKV
    kv_width: int  # n_kv_head_local * d_head
    gated: bool  # W_C holds [W_gate | W_up] (Llama)

    def _qkv(self, a, part):
        if a is None:
            return None
        q, kv = self.q_width, self.kv_width
        return a[..., (0, q, q + kv)[part]:(q, q + kv, q + 2 * kv)[part]]

    W_Q = property(lambda self: self._qkv(self.W_QKV, 0))  # [n_embd, n_head_local * d_head]
    W_K = property(lambda self: self._qkv(self.W_QKV, 1))  # [n_embd, n_kv_head_local * d_head]
    W_V = property(lambda self: self._qkv(self.W_QKV, 2))
    b_Q = property(lambda self: self._qkv(self.b_QKV, 0))
    b_K = property(lambda self: self._qkv(self.b_QKV, 1))
    b_V = property(lambda self: self._qkv(self.b_QKV, 2))
    W_gate = property(lambda self: self.W_C[:, :self.W_C.shape[1] // 2] if self.gated else None)
    W_up = property(lambda self: self.W_C[:, self.W_C.shape[1] // 2:] if self.gated else None)

    def arrays(self):
        """The arrays of this block (views into the rank's arena; not the W_Q, W_K, ... views into them)."""
        return [a for a in (self.norm_1_weight, self.norm_1_bias, self.W_QKV, self.b_QKV, self.W_B, self.b_B,
                            self.norm_2_weight, self.norm_2_bias, self.W_C, self.b_C, self.W_D, self.b_D)
                if a is not None]


HEAD_ALIGN = 16  # the LM head's rows are padded to a multiple of this many values (64 bytes in float32)


def padded_vocab(n_vocab_local):
    """Columns of ``W_head`` for ``n_vocab_local`` vocabulary columns: rounded up to ``HEAD_ALIGN``."""
    return -(-n_vocab_local // HEAD_ALIGN) * HEAD_ALIGN


@dataclass
class GlobalWeights:
    """The weights outside the blocks.

    The LM head is stored as ``W_head``, ``[n_embd, n_vocab_local]`` padded with zero columns to a multiple of
    ``HEAD_ALIGN``, so that every row starts on a cache line. The matrix-vector kernel streams rows of odd
    width more slowly: GPT-2's 50257 columns split in two give a rank 25129, whose head took a median
    2.87 ms unpadded and 2.65 ms padded per token (two ranks reading at once, measured). The forward
    multiplies by all of ``W_head`` and drops the padded logits; ``W_vocab`` is the unpadded view.
    """

    W_embed: np.ndarray  # [n_vocab_local, n_embd]  vocab-parallel; a transposed view of W_vocab when tied
    W_pos: np.ndarray | None  # [n_ctx, n_embd] (GPT-2 learned positions)
    norm_f_weight: np.ndarray  # [n_embd]
    norm_f_bias: np.ndarray | None  # [n_embd]
    W_head: np.ndarray  # [n_embd, padded_vocab(n_vocab_local)]  vocab-parallel, C-contiguous, zero padding

    @property
    def W_vocab(self):
        """``[n_embd, n_vocab_local]``: the LM head without its padding (a view of ``W_head``)."""
        return self.W_head[:, :self.W_embed.shape[0]]

    def arrays(self, tied):
        return [a for a in (None if tied else self.W_embed, self.W_pos, self.norm_f_weight, self.norm_f_bias,
                            self.W_head) if a is not None]


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


def _local_shape(config, shard, name):
    """The shape of this rank's part of an mpitp weight."""
    full = list(_full_shape(config, name))
    kind, attr = SPLIT[name]
    if kind != "replicate":
        s = getattr(shard, attr)
        full[-1 if kind == "column" else 0] = s.stop - s.start
    return tuple(full)


def _read_into(ckpt, ckpt_name, src, name, config, shard, out):
    """Read this rank's slice of one mpitp weight from the checkpoint into ``out``."""
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
    index = [slice(0, n) for n in full]
    if kind != "replicate":
        index[out_axis if kind == "column" else 0] = getattr(shard, attr)
    if src.n_parts > 1:  # shift the output-axis range into this part of the fused tensor
        s, offset = index[out_axis], src.part * full[-1]
        index[out_axis] = slice(s.start + offset, s.stop + offset)
    # Linear storage is [out, in]: read the transposed block and transpose it into out.
    ckpt.read_into(ckpt_name, out, tuple(index[::-1] if src.linear else index), transpose=src.linear)


def _gpt2_prefix(ckpt):
    # save_pretrained writes "transformer.wte.weight"; checkpoints on the Hub write "wte.weight".
    return "transformer." if "transformer.wte.weight" in ckpt else ""


def _absent(config):
    """mpitp weight names this model does not have (biases the config switches off)."""
    absent = set() if config.qkv_bias else {"b_Q", "b_K", "b_V"}
    if not config.out_bias:
        absent.add("b_B")
    if not config.mlp_bias:
        absent |= {"b_C", "b_gate", "b_up", "b_D"}
    return absent


def _plan(config, shard):
    """Every array a rank holds, in the order a forward reads them.

    Returns ``(layer_fields, global_fields, head_table)``: the fields as ``(field, parts)`` with ``parts``
    a list of ``(mpitp name, local shape)`` stored side by side (empty if the model has none of them),
    and the table that says where the global weights come from in a checkpoint.
    """
    layer_names, global_names = _NAMES[config.family]
    absent = _absent(config)
    gated = config.family == "llama"
    tied = config.tie_word_embeddings
    head = dict(global_names)
    if tied:  # the LM head is the embedding, read transposed from [n_vocab, n_embd]
        head["W_vocab"] = Source(global_names["W_embed"].name, linear=True)
        del head["W_embed"]

    def parts(names, table):
        return [(n, _local_shape(config, shard, n)) for n in names if n in table and n not in absent]

    layer = [(field, parts(names, layer_names)) for field, names in (
        ("norm_1_weight", ["norm_1_weight"]), ("norm_1_bias", ["norm_1_bias"]),
        ("W_QKV", ["W_Q", "W_K", "W_V"]), ("b_QKV", ["b_Q", "b_K", "b_V"]),
        ("W_B", ["W_B"]), ("b_B", ["b_B"]),
        ("norm_2_weight", ["norm_2_weight"]), ("norm_2_bias", ["norm_2_bias"]),
        ("W_C", ["W_gate", "W_up"] if gated else ["W_C"]), ("b_C", ["b_gate", "b_up"] if gated else ["b_C"]),
        ("W_D", ["W_D"]), ("b_D", ["b_D"]))]
    # The final norm and the LM head are read right after the last block; the embedding and the learned
    # positions (only a few rows per forward) come last.
    glob = [(field, parts([field], head)) for field in ("norm_f_weight", "norm_f_bias", "W_vocab", "W_embed",
                                                          "W_pos")]
    return layer, glob, head


def _stacked_shape(parts):
    return parts[0][1][:-1] + (sum(shape[-1] for _, shape in parts),)


def _stored_shape(field, parts):
    """The shape a field is stored in: its parts side by side, and the LM head with padded rows."""
    shape = _stacked_shape(parts)
    return (shape[0], padded_vocab(shape[1])) if field == "W_vocab" else shape


def _arena_shapes(config, shard):
    layer_fields, global_fields, _ = _plan(config, shard)
    shapes = [_stored_shape(f, p) for f, p in layer_fields if p] * config.n_layer
    return shapes + [_stored_shape(f, p) for f, p in global_fields if p]


def shard_bytes(config, shard, dtype):
    """Bytes of weights one rank will hold, known before reading any of them: the size of its arena."""
    return Arena.size_of(_arena_shapes(config, shard), dtype)


def allocate_weights(config, shard, dtype, fill):
    """This rank's weights in one ``Arena``, in read order, each array filled by ``fill``.

    ``fill(field, layer, parts, out)`` writes the array ``out`` of one field (``layer`` is None for the
    global weights); ``parts`` lists the ``(mpitp name, local shape)`` stored side by side in it.
    Returns ``(blocks, global_weights)``.
    """
    layer_fields, global_fields, _ = _plan(config, shard)
    arena = Arena(shard_bytes(config, shard, dtype))

    def take(field, parts, layer):
        if not parts:
            return None
        out = arena.take(_stored_shape(field, parts), dtype)  # zero-filled: the arena is fresh memory
        fill(field, layer, parts, out[..., :_stacked_shape(parts)[-1]])  # without the LM head's padding
        return out

    blocks = []
    for layer in range(config.n_layer):
        arrays = {field: take(field, parts, layer) for field, parts in layer_fields}
        blocks.append(BlockWeights(**arrays, q_width=shard.n_head_local * config.d_head,
                                   kv_width=shard.n_kv_head_local * config.d_head, gated=config.family == "llama"))
    arrays = {field: take(field, parts, None) for field, parts in global_fields}
    arrays["W_head"] = arrays.pop("W_vocab")
    if config.tie_word_embeddings:
        arrays["W_embed"] = arrays["W_head"][:, :shard.n_vocab_local].T  # [n_vocab_local, n_embd]: a view
    return blocks, GlobalWeights(**arrays)


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
    layer_names, _ = _NAMES[config.family]
    _, _, head = _plan(config, shard)
    prefix = _gpt2_prefix(ckpt) if config.family == "gpt2" else ""

    def read(field, layer, parts, out):
        table = head if layer is None else layer_names
        col = 0
        for name, shape in parts:
            src = table[name]
            _read_into(ckpt, prefix + src.name.format(l=layer), src, name, config, shard,
                       out[..., col:col + shape[-1]])
            col += shape[-1]

    return allocate_weights(config, shard, dtype, read)
