"""What a GGUF file's model is in Hugging Face's terms, for ``mpitp.convert``: config.json and the tensors.

Facts about llama.cpp's GGUF files this relies on (from its convert_hf_to_gguf.py):

- Tensor names: ``token_embd``, ``output_norm``, ``output`` and ``blk.N.{attn_norm, attn_q, attn_k, attn_v,
  attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}`` (GPT-2: ``position_embd``, ``attn_qkv``, biases; Qwen3
  and Gemma 3: ``attn_q_norm``, ``attn_k_norm``; Gemma 3: ``post_attention_norm`` and ``post_ffw_norm``, and
  its ``ffn_norm`` is Hugging Face's pre_feedforward_layernorm).
- A matrix's first GGUF dimension varies fastest, so in NumPy order it is torch's ``[out, in]``; GPT-2's Conv1D
  weights ``[in, out]`` were transposed on the way in and are transposed back here.
- For the ``llama`` architecture only (its converter class, not Qwen's or Gemma's) the rows of ``attn_q`` and
  ``attn_k`` are permuted within each head so that RoPE rotates adjacent pairs (rows 2i and 2i + 1); Hugging
  Face rotates row i with row i + d_head/2. The converter undoes it (``unpermute``).
- Gemma 3's RMSNorm scales by (1 + w); llama.cpp adds the 1 to every ``*norm.weight`` tensor (the QK norms
  too), so 1 is subtracted here. Its embedding is stored unscaled (the model multiplies by sqrt(n_embd)).
  Gemma 3's metadata leaves out what llama.cpp hard-codes: one global layer in six, RoPE base 10000 on the
  sliding layers, and the query scale 1/sqrt(head_dim) (1/sqrt(n_embd / n_head) for the 62-layer 27B).
- Llama 3's RoPE scaling is stored as a ``rope_freqs`` tensor of per-frequency divisors, not as parameters.
- Sizes are metadata ``{arch}.block_count``, ``embedding_length``, ``feed_forward_length``,
  ``attention.head_count(_kv)``, ``context_length``, ``rope.freq_base``, ``attention.layer_norm(_rms)_epsilon``,
  ``attention.key_length`` (the head size), ``attention.sliding_window``.
"""

import re
import warnings

import numpy as np

from ..errors import CheckpointError
from .gguf_reader import REQUIRED, shown
from ..config import config_from_dict
from ..weights import checkpoint_shapes

_PROJ = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}
_LLAMA = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight", "blk.{l}.attn_norm.weight": "model.layers.{l}.input_layernorm.weight",
          **{f"blk.{{l}}.{g}.{p}": f"model.layers.{{l}}.{h}.{p}" for g, h in _PROJ.items() for p in ("weight", "bias")}}
_QK_NORMS = {f"blk.{{l}}.attn_{x}_norm.weight": f"model.layers.{{l}}.self_attn.{x}_norm.weight" for x in "qk"}
_POST_ATTENTION = {"blk.{l}.ffn_norm.weight": "model.layers.{l}.post_attention_layernorm.weight"}
NAMES = {  # GGUF tensor name -> Hugging Face name, per architecture; "{l}" is the layer
    "llama": {**_LLAMA, **_POST_ATTENTION},
    "qwen2": {**_LLAMA, **_POST_ATTENTION},
    "qwen3": {**_LLAMA, **_POST_ATTENTION, **_QK_NORMS},
    "gemma3": {**_LLAMA, **_QK_NORMS, **{f"blk.{{l}}.{g}.weight": f"model.layers.{{l}}.{h}.weight" for g, h in (
        ("post_attention_norm", "post_attention_layernorm"), ("ffn_norm", "pre_feedforward_layernorm"),
        ("post_ffw_norm", "post_feedforward_layernorm"))}},
    "gpt2": {"token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
             **{f"{g}.{p}": f"{h}.{p}" for p in ("weight", "bias") for g, h in (
                 ("output_norm", "ln_f"), ("blk.{l}.attn_norm", "h.{l}.ln_1"),
                 ("blk.{l}.attn_qkv", "h.{l}.attn.c_attn"), ("blk.{l}.attn_output", "h.{l}.attn.c_proj"),
                 ("blk.{l}.ffn_norm", "h.{l}.ln_2"), ("blk.{l}.ffn_up", "h.{l}.mlp.c_fc"),
                 ("blk.{l}.ffn_down", "h.{l}.mlp.c_proj"))}},
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma3": "Gemma3ForCausalLM"}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
_CONV1D = re.compile(r"blk\.\d+\.(attn_qkv|attn_output|ffn_up|ffn_down)\.weight")  # GPT-2: stored [in, out] in HF


def unpermute(w, n_head):
    """Undo llama.cpp's per-head row order of W_Q / W_K (``[n_head * d_head, ...]``): GGUF row (h, i, j) for
    i < d_head/2, j in {0, 1} is Hugging Face row (h, j, i)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config(g, arch, has, n_vocab):
    """``config.json`` of the model the GGUF file ``g`` describes (``has(name)``: is that tensor there)."""
    def size(key, default=REQUIRED):
        value = g.get(f"{arch}.{key}", "int", default)
        if value <= 0:
            raise CheckpointError(g.path, None, f"metadata '{arch}.{key}' must be a positive integer, got {value}.")
        return value

    n_embd, n_head, n_ctx = size("embedding_length"), size("attention.head_count"), size("context_length")
    common = {"vocab_size": n_vocab}
    for role in ("bos", "eos", "eot"):  # eot: Llama 3's end of turn, a second eos for generation
        token_id = g.get(f"tokenizer.ggml.{role}_token_id", "int", None)
        if token_id is not None and not 0 <= token_id < n_vocab:
            raise CheckpointError(g.path, None, f"tokenizer.ggml.{role}_token_id {token_id} is not a token id "
                                                f"(0..{n_vocab - 1}).")
        common[f"{role}_token_id"] = token_id
    if arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": n_embd, "n_head": n_head,
                "n_layer": size("block_count"), "n_inner": size("feed_forward_length"), "n_positions": n_ctx,
                "layer_norm_epsilon": g.get(f"{arch}.attention.layer_norm_epsilon", "float"),
                "activation_function": "gelu_new", "tie_word_embeddings": True, **common}
    d_head = size("attention.key_length", n_embd // n_head)
    if size("rope.dimension_count", d_head) != d_head or size("attention.value_length", d_head) != d_head:
        raise CheckpointError(g.path, None, f"rope.dimension_count and attention.value_length must equal the head "
                                            f"size {d_head}: partial rotary embeddings are not supported.")
    n_kv_head = size("attention.head_count_kv", n_head)
    if n_head % n_kv_head or d_head % 2 or arch == "qwen2" and d_head * n_head != n_embd:
        raise CheckpointError(g.path, None, f"{n_head} heads of {d_head} values and {n_kv_head} key/value heads "
                                            f"(hidden size {n_embd}) are not a {arch} model's: the heads must be "
                                            "a multiple of the key/value heads, the head size even"
                                            + (" and hidden size / heads." if arch == "qwen2" else "."))
    theta = g.get(f"{arch}.rope.freq_base", "float", 10000.0)
    sizes = {"architectures": [ARCHITECTURES[arch]], "model_type": MODEL_TYPES[arch], "hidden_size": n_embd,
             "intermediate_size": size("feed_forward_length"), "num_hidden_layers": size("block_count"),
             "num_attention_heads": n_head, "num_key_value_heads": n_kv_head, "head_dim": d_head,
             "max_position_embeddings": n_ctx, "rms_norm_eps": g.get(f"{arch}.attention.layer_norm_rms_epsilon",
                                                                       "float"),
             "tie_word_embeddings": not has("output.weight"), **common}
    if arch == "gemma3":
        return {**sizes, **_gemma3(g, sizes, theta)}
    scaling = g.get(f"{arch}.rope.scaling.type", "str", "none")
    if scaling != "none":
        raise CheckpointError(g.path, None, f"RoPE scaling '{shown(scaling)}' is not supported by mpitp.convert; "
                                            "supported: none, Llama 3's (a rope_freqs tensor) and Gemma 3's linear.")
    rope = _llama3_rope(g, theta, d_head) if arch == "llama" and has("rope_freqs.weight") else {"rope_type": "default"}
    rope_fields = {"rope_theta": theta, "rope_parameters": {**rope, "rope_theta": theta}}  # transformers 5; and 4:
    if arch != "llama":  # Qwen: biases are in the tensors (Qwen2's q/k/v always), no sliding window is used
        return {**sizes, **rope_fields, "hidden_act": "silu", "use_sliding_window": False,
                **({"attention_bias": has("blk.0.attn_q.bias")} if arch == "qwen3" else {"head_dim": None})}
    return {**sizes, **rope_fields, "hidden_act": "silu", "rope_scaling": None if rope["rope_type"] == "default"
            else rope, "attention_bias": has("blk.0.attn_q.bias"), "mlp_bias": has("blk.0.ffn_up.bias")}


def _gemma3(g, sizes, theta):
    """The Gemma 3 fields of config.json: what the metadata says, and what llama.cpp hard-codes (module doc)."""
    n_layer, window = sizes["num_hidden_layers"], g.get("gemma3.attention.sliding_window", "int")
    every = g.get("gemma3.attention.sliding_window_pattern", "int", 6)  # one global layer in ``every``
    if window <= 0 or every <= 0:
        raise CheckpointError(g.path, None, f"gemma3.attention.sliding_window ({window}) and its pattern ({every}) "
                                            "must be positive integers.")
    full = {"rope_type": "default", "rope_theta": theta}
    kind = g.get("gemma3.rope.scaling.type", "str", "none")
    if kind == "linear":  # the global layers' only (llama.cpp's converter)
        full = {"rope_type": "linear", "factor": g.get("gemma3.rope.scaling.factor", "float"), "rope_theta": theta}
    elif kind != "none":
        raise CheckpointError(g.path, None, f"RoPE scaling '{shown(kind)}' is not supported for gemma3; supported: "
                                            "none and linear.")
    local = g.get("gemma3.rope.freq_base_swa", "float", 10000.0)
    scalar = sizes["head_dim"] if n_layer != 62 else sizes["hidden_size"] // sizes["num_attention_heads"]
    return {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar, "sliding_window": window,
            "sliding_window_pattern": every, "layer_types": ["full_attention" if (i + 1) % every == 0 else
                                                             "sliding_attention" for i in range(n_layer)],
            "rope_theta": theta, "rope_local_base_freq": local, "rope_scaling": None if kind == "none" else full,
            "rope_parameters": {"full_attention": full, "sliding_attention": {"rope_type": "default",
                                                                               "rope_theta": local}},
            "final_logit_softcapping": g.get("gemma3.final_logit_softcapping", "float", None),
            "attn_logit_softcapping": g.get("gemma3.attn_logit_softcapping", "float", None),
            "attention_bias": False, "pad_token_id": g.get("tokenizer.ggml.padding_token_id", "int", None)}


def _llama3_divisors(p, wavelen):
    # Llama 3's RoPE scaling: each frequency is divided by 1 (short wavelengths), factor (long ones) or a blend.
    f, lo, hi, n = p["factor"], p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
    smooth = (n / wavelen - lo) / (hi - lo)
    return np.where(wavelen < n / hi, 1.0, np.where(wavelen > n / lo, f, 1 / ((1 - smooth) / f + smooth)))


def _llama3_rope(g, theta, d_head):
    """Llama 3's RoPE settings from llama.cpp's ``rope_freqs`` tensor, which holds the divisor of each frequency
    (``_llama3_divisors``) instead of the parameters. They are solved from the blended divisors, taking
    low_freq_factor = 1 (every equivalent choice gives the same frequencies), and checked by computing the
    divisors again."""
    if g.shape("rope_freqs.weight") != (d_head // 2,):
        raise CheckpointError(g.path, "rope_freqs.weight", f"shape {list(g.shape('rope_freqs.weight'))} is not "
                                                           f"[{d_head // 2}], one divisor per frequency.")
    r = g.read("rope_freqs.weight").astype(np.float64)
    with np.errstate(all="ignore"), warnings.catch_warnings():  # any values: judged by the check below
        warnings.simplefilter("ignore")
        wavelen = 2 * np.pi * theta ** (np.arange(0, d_head, 2) / d_head)
        factor = float(np.max(r)) if np.all(np.isfinite(r)) and np.min(r) > 0 else 0.0
        if factor == 1.0:
            return {"rope_type": "default"}  # every divisor 1: no scaling
        blend = (r > 1 + 1e-4) & (r < factor * (1 - 1e-4))
        params = None
        if factor > 1 and blend.sum() >= 2:  # a blended divisor's smooth = n / wavelen - lo, over hi - lo
            slope, intercept = np.polyfit(1 / wavelen[blend], (1 / r[blend] - 1 / factor) / (1 - 1 / factor), 1)
            if slope > 0 and intercept < 0 and 1 <= -slope / intercept < 2**31:
                params = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"), "low_freq_factor": 1.0,
                          "high_freq_factor": float(f"{1 - 1 / intercept:.6g}"),
                          "original_max_position_embeddings": int(round(-slope / intercept))}
        ok = params is not None and np.allclose(_llama3_divisors(params, wavelen), r, rtol=1e-4, atol=0)
    if not ok:
        raise CheckpointError(g.path, "rope_freqs.weight", "these RoPE divisors are not Llama 3's scaling with "
                                                           "parameters the converter can recover.")
    return params


def _d_head(c):
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]  # Qwen2's config.json has none


def hf_shapes(arch, c):
    """``{Hugging Face name: shape}`` of every tensor the model of config.json ``c`` (not GPT-2) has, as
    transformers' class for it builds them: what the file's tensors are checked against."""
    n_embd, n_ffn, d_head, n_vocab = c["hidden_size"], c["intermediate_size"], _d_head(c), c["vocab_size"]
    q, kv = c["num_attention_heads"] * d_head, c["num_key_value_heads"] * d_head
    layer = {"self_attn.q_proj.weight": (q, n_embd), "self_attn.k_proj.weight": (kv, n_embd),
             "self_attn.v_proj.weight": (kv, n_embd), "self_attn.o_proj.weight": (n_embd, q),
             "mlp.gate_proj.weight": (n_ffn, n_embd), "mlp.up_proj.weight": (n_ffn, n_embd),
             "mlp.down_proj.weight": (n_embd, n_ffn), "input_layernorm.weight": (n_embd,),
             "post_attention_layernorm.weight": (n_embd,)}
    if arch == "qwen2" or c.get("attention_bias"):
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if arch == "llama" and c["attention_bias"]:
        layer["self_attn.o_proj.bias"] = (n_embd,)
    if c.get("mlp_bias"):
        layer.update({"mlp.gate_proj.bias": (n_ffn,), "mlp.up_proj.bias": (n_ffn,), "mlp.down_proj.bias": (n_embd,)})
    if arch in ("qwen3", "gemma3"):
        layer.update({"self_attn.q_norm.weight": (d_head,), "self_attn.k_norm.weight": (d_head,)})
    if arch == "gemma3":
        layer.update({f"{x}_feedforward_layernorm.weight": (n_embd,) for x in ("pre", "post")})
    shapes = {f"model.layers.{i}.{k}": v for i in range(c["num_hidden_layers"]) for k, v in layer.items()}
    shapes.update({"model.embed_tokens.weight": (n_vocab, n_embd), "model.norm.weight": (n_embd,)})
    return shapes if c["tie_word_embeddings"] else {**shapes, "lm_head.weight": (n_vocab, n_embd)}


def _transform(arch, key, shape, c):
    """The function that takes a GGUF tensor (``key``: its name with the layer as ``{l}``) to Hugging Face's."""
    if arch == "llama" and key.startswith(("blk.{l}.attn_q.", "blk.{l}.attn_k.")):
        heads = c["num_attention_heads"] if "attn_q" in key else c["num_key_value_heads"]
        if shape[0] != heads * _d_head(c):
            return None  # misshapen: hf_tensors says so
        return lambda w: unpermute(w, heads)
    if arch == "gpt2" and _CONV1D.fullmatch(key.replace("{l}", "0")):
        return np.transpose
    if arch == "gemma3" and key.endswith("norm.weight"):
        return lambda w: w - np.float32(1)  # llama.cpp stored Gemma's 1 + w
    return lambda w: w


def hf_tensors(g, arch, c):
    """``[(Hugging Face name, shape, read, GGUF name)]`` for the file's tensors, the model being config.json
    ``c``; ``read()`` gives float32 values."""
    table, out = NAMES[arch], []
    n_layer = c.get("n_layer", c.get("num_hidden_layers"))
    for name in g.infos:
        m = re.fullmatch(r"blk\.(0|[1-9][0-9]*)\.(.+)", name)
        layer, key = (int(m.group(1)), "blk.{l}." + m.group(2)) if m else (None, name)
        if arch == "gpt2" and name == "output.weight" or arch == "llama" and name == "rope_freqs.weight":
            continue  # GPT-2: llama.cpp's copy of the tied token_embd. Llama: in config.json (_llama3_rope)
        if key not in table or layer is not None and layer >= n_layer:
            raise CheckpointError(g.path, shown(name), f"the converter does not know this tensor in a {arch} model "
                                                       f"of {n_layer} layers.")
        shape = g.shape(name)
        transform = _transform(arch, key, shape, c)
        if transform is None:
            raise CheckpointError(g.path, name, f"shape {list(shape)} does not have the heads of "
                                                f"{_d_head(c)} rows the metadata implies.")
        shape = shape[::-1] if transform is np.transpose else shape
        out.append((table[key].format(l=layer), shape, (lambda n, t: lambda: t(g.read(n)))(name, transform), name))
    expected = checkpoint_shapes(config_from_dict(c, f"{g.path} (its metadata as config.json)")) if arch == "gpt2" \
        else hf_shapes(arch, c)
    for hf_name, shape, _, name in out:
        if hf_name not in expected:
            raise CheckpointError(g.path, name, "the tensor is not part of the model its metadata describes.")
        if tuple(expected[hf_name]) != tuple(shape):
            raise CheckpointError(g.path, name, f"shape {list(shape)} (as {hf_name}) does not match the "
                                                f"metadata, which implies {list(expected[hf_name])}.")
    missing = sorted(set(expected) - {hf_name for hf_name, *_ in out})
    if missing:
        m = re.fullmatch(r"(\D+)\.(\d+)\.(.+)", missing[0])
        template = f"{m.group(1)}.{{l}}.{m.group(3)}" if m else missing[0]
        gguf_name = {v: k for k, v in table.items()}[template].format(l=m.group(2) if m else None)
        raise CheckpointError(g.path, gguf_name, f"tensor is missing ({len(missing)} tensor(s) of the model are; "
                                                 f"it becomes {missing[0]}).")
    return out
