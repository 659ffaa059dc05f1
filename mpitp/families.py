"""Families as data: each family's sharding plan (every checkpoint tensor, what it is in the seed diagram and how
it splits over the ranks) and the facts its block reads (which norm, which activation, how positions enter).

A plan row is ``(checkpoint tensor, mpitp weight(s), split)``; "{l}" is the layer. The split words are Hugging
Face's ``base_model_tp_plan`` ones, said in mpitp's ``[in, out]`` storage (see ``mpitp.sharding``):

- ``colwise``: the output axis is split (Megatron's ColumnParallelLinear): W_Q, W_K, W_V, W_C and their biases;
- ``rowwise``: the input axis is split (RowParallelLinear), its product a partial sum for an Allreduce: W_B, W_D;
- ``vocab``: the vocabulary is split: the embedding's rows and the LM head's columns;
- ``replicated``: every rank holds it whole: norms, learned positions, and a row-parallel layer's bias, which
  is added once after the reduction (added before it, P ranks would add it P times);
- ``expert``: one tensor per expert ("{e}" in its name) of a mixture of experts (``mpitp.experts``), split as the
  run's layout says (``--experts``): whole experts per rank, in contiguous blocks (``expert``), or every expert
  with each rank's range of its hidden columns, W_C's columns and W_D's rows, like the dense MLP (``tensor``).

Which range of heads, key/value heads, MLP columns or vocabulary ids a rank takes is the weight's, and
``mpitp.sharding.rank_slice(config, shard, weight, split)`` computes it: this table and that function answer
"which rows of W_D does rank 2 of 3 hold". A tensor holding several weights side by side along its output axis
lists them in order: GPT-2's ``c_attn`` is ``[Q | K | V]``, cut into its parts before a rank takes its heads.

The experts are read as ``save_pretrained`` writes them, one tensor per expert and projection (Mixtral's
``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down); Qwen's and OLMoE's
``mlp.experts.{e}.gate_proj``, ``up_proj``, ``down_proj``). transformers 5 fuses them when it loads a model, into
``mlp.experts.gate_up_proj`` ``[n_expert, 2 n_ffn_expert, n_embd]`` (``[gate | up]`` along its middle axis) and
``mlp.experts.down_proj`` ``[n_expert, n_embd, n_ffn_expert]``, and splits them again when it saves one; mpitp
stacks them in the same way: ``W_CE`` ``[n_expert_local, n_embd, 2 n_ffn_expert_local]`` is each expert's
``[W_gate | W_up]``, ``W_DE`` ``[n_expert_local, n_ffn_expert_local, n_embd]`` each expert's W_D.

A fourth word says when the parts are not side by side: ``per_head``, GPT-NeoX's ``query_key_value``, interleaves
them head by head, ``[q k v of head 0 | q k v of head 1 | ...]``, so a rank's heads' q, k and v rows are one
contiguous block of the stored tensor (``mpitp.weights`` reads it at once and puts each part in its place).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """A family of models: its plan and the facts its block reads."""

    plan: tuple  # rows (tensor, weight or weights, split), or (tensor, weights, split, "per_head")
    linear_storage: str  # "out_in" (torch nn.Linear: transposed to [in, out] on reading) or "in_out" (Conv1D)
    norm: str  # "layer_norm" or "rms_norm"
    gated: bool  # the MLP is act(C W_gate) * (C W_up), stored side by side as W_C = [W_gate | W_up]
    positions: str  # "learned" (added to the embedding) or "rope" (rotary, applied to Q and K)
    tensor_prefixes: tuple = ("",)  # prefixes a checkpoint may put before every tensor name
    qk_norm_span: str = "head"  # QK-norm over each head (Qwen3) or over the whole projection (OLMoE)

    def weights(self):
        """Every mpitp weight the plan names."""
        return {w for row in self.plan for w in (row[1] if isinstance(row[1], tuple) else (row[1],))}


def _linear(tensor, X, split, *layout):
    """A linear layer's two rows: its weight W_X, split as ``split``, and its bias b_X, split with a colwise weight
    and replicated beside a rowwise one (added once, after the reduction). ``X`` may be several letters (a fused
    tensor's parts, in order); ``layout`` a fourth word for both rows."""
    names = [tuple(f"{kind}_{x}" for x in X) if isinstance(X, tuple) else f"{kind}_{X}" for kind in "Wb"]
    return ((tensor + ".weight", names[0], split, *layout),
            (tensor + ".bias", names[1], "replicated" if split == "rowwise" else split, *layout))


def _layer_norm(tensor, name):
    # A LayerNorm's weight and bias rows, both replicated: norm_1 is (norm_1_weight, norm_1_bias).
    return (tensor + ".weight", name + "_weight", "replicated"), (tensor + ".bias", name + "_bias", "replicated")


GPT2 = Family(linear_storage="in_out", norm="layer_norm", gated=False, positions="learned",
              tensor_prefixes=("", "transformer."), plan=(
    ("wte.weight", "W_embed", "vocab"),  # also the LM head: GPT-2 ties them
    ("wpe.weight", "W_pos", "replicated"),
    *_layer_norm("h.{l}.ln_1", "norm_1"),
    *_linear("h.{l}.attn.c_attn", ("Q", "K", "V"), "colwise"),  # [Q | K | V] along the output axis
    *_linear("h.{l}.attn.c_proj", "B", "rowwise"),
    *_layer_norm("h.{l}.ln_2", "norm_2"),
    *_linear("h.{l}.mlp.c_fc", "C", "colwise"),
    *_linear("h.{l}.mlp.c_proj", "D", "rowwise"),
    *_layer_norm("ln_f", "norm_f"),
))

_L = "model.layers.{l}."
LLAMA = Family(linear_storage="out_in", norm="rms_norm", gated=True, positions="rope", plan=(
    ("model.embed_tokens.weight", "W_embed", "vocab"),
    (_L + "input_layernorm.weight", "norm_1_weight", "replicated"),
    *_linear(_L + "self_attn.q_proj", "Q", "colwise"),  # Qwen2 has q, k, v biases; Llama only if attention_bias
    *_linear(_L + "self_attn.k_proj", "K", "colwise"),
    *_linear(_L + "self_attn.v_proj", "V", "colwise"),
    *_linear(_L + "self_attn.o_proj", "B", "rowwise"),
    (_L + "post_attention_layernorm.weight", "norm_2_weight", "replicated"),
    *_linear(_L + "mlp.gate_proj", "gate", "colwise"),  # W_C = [W_gate | W_up]
    *_linear(_L + "mlp.up_proj", "up", "colwise"),
    *_linear(_L + "mlp.down_proj", "D", "rowwise"),
    ("model.norm.weight", "norm_f_weight", "replicated"),
    ("lm_head.weight", "W_vocab", "vocab"),  # the embedding, transposed, when tie_word_embeddings
))

_QK_NORM = ((_L + "self_attn.q_norm.weight", "norm_q_weight", "replicated"),  # [d_head]: per head, rank-local
            (_L + "self_attn.k_norm.weight", "norm_k_weight", "replicated"))
QWEN3 = Family(linear_storage="out_in", norm="rms_norm", gated=True, positions="rope", plan=LLAMA.plan + _QK_NORM)

# Gemma 3's names differ from Llama's where its block does: "post_attention_layernorm" is the norm of the
# attention's reduced output (Llama's is the norm before the MLP), and the MLP's output has a norm of its own.
# Both are norms of a sum over the ranks, so they come after the reduction, once. The LM head is the embedding.
GEMMA3 = Family(linear_storage="out_in", norm="rms_norm", gated=True, positions="rope", plan=tuple(
    row for row in LLAMA.plan if row[1] != "norm_2_weight") + _QK_NORM + (
    (_L + "post_attention_layernorm.weight", "post_norm_1_weight", "replicated"),
    (_L + "pre_feedforward_layernorm.weight", "norm_2_weight", "replicated"),
    (_L + "post_feedforward_layernorm.weight", "post_norm_2_weight", "replicated"),
))

# Mixtures of experts: Llama's attention, and in place of the dense MLP a router (``gate``, replicated: every
# rank routes) and the experts. Qwen2-MoE adds a shared expert every token uses, a dense gated MLP of its own
# width (config n_ffn), split like Llama's MLP, behind a sigmoid gate (replicated). OLMoE's q_norm and k_norm are
# over the whole projection ([n_head d_head] and [n_kv_head d_head]): each rank holds its heads' range of them.
_ATTENTION = tuple(row for row in LLAMA.plan if "mlp." not in row[0])
_MOE = ((_L + "mlp.gate.weight", "W_router", "replicated"),
        (_L + "mlp.experts.{e}.gate_proj.weight", "W_gate_e", "expert"),
        (_L + "mlp.experts.{e}.up_proj.weight", "W_up_e", "expert"),
        (_L + "mlp.experts.{e}.down_proj.weight", "W_D_e", "expert"))
_M = _L + "block_sparse_moe."  # Mixtral's names: w1 is the gate projection, w3 the up, w2 the down
MIXTRAL = Family(linear_storage="out_in", norm="rms_norm", gated=True, positions="rope", plan=_ATTENTION + (
    (_M + "gate.weight", "W_router", "replicated"),
    (_M + "experts.{e}.w1.weight", "W_gate_e", "expert"),
    (_M + "experts.{e}.w3.weight", "W_up_e", "expert"),
    (_M + "experts.{e}.w2.weight", "W_D_e", "expert"),
))
QWEN2_MOE = Family(linear_storage="out_in", norm="rms_norm", gated=True, positions="rope", plan=_ATTENTION + _MOE + (
    (_L + "mlp.shared_expert.gate_proj.weight", "W_gate", "colwise"),
    (_L + "mlp.shared_expert.up_proj.weight", "W_up", "colwise"),
    (_L + "mlp.shared_expert.down_proj.weight", "W_D", "rowwise"),
    (_L + "mlp.shared_expert_gate.weight", "W_shared_gate", "replicated"),
))
QWEN3_MOE = Family(linear_storage="out_in", norm="rms_norm", gated=True, positions="rope",
                   plan=_ATTENTION + _QK_NORM + _MOE)
OLMOE = Family(linear_storage="out_in", norm="rms_norm", gated=True, positions="rope", qk_norm_span="projection",
               plan=_ATTENTION + _MOE + ((_L + "self_attn.q_norm.weight", "norm_q_weight", "colwise"),
                                         (_L + "self_attn.k_norm.weight", "norm_k_weight", "colwise")))

# GPT-NeoX (Pythia): LayerNorms with biases, a fused QKV interleaved per head, a non-gated GELU MLP, an LM head of
# its own (embed_out). Its "post_attention_layernorm" is the norm before the MLP, as Llama's.
_N = "gpt_neox.layers.{l}."
GPT_NEOX = Family(linear_storage="out_in", norm="layer_norm", gated=False, positions="rope", plan=(
    ("gpt_neox.embed_in.weight", "W_embed", "vocab"),
    *_layer_norm(_N + "input_layernorm", "norm_1"),
    *_linear(_N + "attention.query_key_value", ("Q", "K", "V"), "colwise", "per_head"),
    *_linear(_N + "attention.dense", "B", "rowwise"),
    *_layer_norm(_N + "post_attention_layernorm", "norm_2"),
    *_linear(_N + "mlp.dense_h_to_4h", "C", "colwise"),
    *_linear(_N + "mlp.dense_4h_to_h", "D", "rowwise"),
    *_layer_norm("gpt_neox.final_layer_norm", "norm_f"),
    ("embed_out.weight", "W_vocab", "vocab"),
))

FAMILIES = {"gpt2": GPT2, "llama": LLAMA, "qwen3": QWEN3, "gemma3": GEMMA3, "gpt_neox": GPT_NEOX, "mixtral": MIXTRAL,
            "qwen2_moe": QWEN2_MOE, "qwen3_moe": QWEN3_MOE, "olmoe": OLMOE}
