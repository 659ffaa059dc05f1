"""What a GGUF file's model is in Hugging Face's terms, for ``mpitp.convert``: config.json and the tensors.

Facts about llama.cpp's GGUF files this relies on (from its convert_hf_to_gguf.py):

- Tensor names: ``token_embd``, ``output_norm``, ``output`` and ``blk.N.{attn_norm, attn_q, attn_k, attn_v,
  attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}`` (GPT-2: ``position_embd``, ``attn_qkv``, biases).
- A matrix's first GGUF dimension varies fastest, so in NumPy order it is torch's ``[out, in]``; GPT-2's Conv1D
  weights ``[in, out]`` were transposed on the way in and are transposed back here.
- For the ``llama`` architecture the rows of ``attn_q`` and ``attn_k`` are permuted within each head so that
  RoPE rotates adjacent pairs (rows 2i and 2i + 1); Hugging Face rotates row i with row i + d_head/2. The
  converter undoes it (``unpermute``).
- Llama 3's RoPE scaling is stored as a ``rope_freqs`` tensor of per-frequency divisors, not as parameters.
- Sizes are metadata ``{arch}.block_count``, ``embedding_length``, ``feed_forward_length``,
  ``attention.head_count(_kv)``, ``context_length``, ``rope.freq_base``, ``attention.layer_norm(_rms)_epsilon``.
"""

import re
import warnings

import numpy as np

from ..errors import CheckpointError
from .gguf_reader import REQUIRED, shown
from ..weights import checkpoint_shapes

_PROJ = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}
NAMES = {  # GGUF tensor name -> Hugging Face name, per architecture; "{l}" is the layer
    "llama": {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight",
              "blk.{l}.attn_norm.weight": "model.layers.{l}.input_layernorm.weight",
              "blk.{l}.ffn_norm.weight": "model.layers.{l}.post_attention_layernorm.weight",
              **{f"blk.{{l}}.{g}.{p}": f"model.layers.{{l}}.{h}.{p}" for g, h in _PROJ.items()
                 for p in ("weight", "bias")}},
    "gpt2": {"token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
             **{f"{g}.{p}": f"{h}.{p}" for p in ("weight", "bias") for g, h in (
                 ("output_norm", "ln_f"), ("blk.{l}.attn_norm", "h.{l}.ln_1"),
                 ("blk.{l}.attn_qkv", "h.{l}.attn.c_attn"), ("blk.{l}.attn_output", "h.{l}.attn.c_proj"),
                 ("blk.{l}.ffn_norm", "h.{l}.ln_2"), ("blk.{l}.ffn_up", "h.{l}.mlp.c_fc"),
                 ("blk.{l}.ffn_down", "h.{l}.mlp.c_proj"))}},
}
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
    scaling = g.get(f"{arch}.rope.scaling.type", "str", "none")
    if scaling != "none":
        raise CheckpointError(g.path, None, f"RoPE scaling '{shown(scaling)}' is not supported by mpitp.convert; "
                                            "supported: none, and Llama 3's (a rope_freqs tensor).")
    theta = g.get(f"{arch}.rope.freq_base", "float", 10000.0)
    rope = _llama3_rope(g, theta, d_head) if has("rope_freqs.weight") else {"rope_type": "default"}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": n_embd,
            "intermediate_size": size("feed_forward_length"), "num_hidden_layers": size("block_count"),
            "num_attention_heads": n_head, "num_key_value_heads": size("attention.head_count_kv", n_head),
            "head_dim": d_head, "max_position_embeddings": n_ctx, "hidden_act": "silu",
            "rms_norm_eps": g.get(f"{arch}.attention.layer_norm_rms_epsilon", "float"),
            "rope_theta": theta, "rope_parameters": {**rope, "rope_theta": theta},  # transformers 5; and 4:
            "rope_scaling": None if rope["rope_type"] == "default" else rope,
            "attention_bias": has("blk.0.attn_q.bias"), "mlp_bias": has("blk.0.ffn_up.bias"),
            "tie_word_embeddings": not has("output.weight"), **common}


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


def hf_tensors(g, arch, cfg):
    """``[(Hugging Face name, shape, read, GGUF name)]`` for the file's tensors; ``read()`` gives float32 values."""
    table, out = NAMES[arch], []
    for name in g.infos:
        m = re.fullmatch(r"blk\.(0|[1-9][0-9]*)\.(.+)", name)
        layer, key = (int(m.group(1)), "blk.{l}." + m.group(2)) if m else (None, name)
        if arch == "gpt2" and name == "output.weight" or arch == "llama" and name == "rope_freqs.weight":
            continue  # GPT-2: llama.cpp's copy of the tied token_embd. Llama: in config.json (_llama3_rope)
        if key not in table or layer is not None and layer >= cfg.n_layer:
            raise CheckpointError(g.path, shown(name), f"the converter does not know this tensor in a {arch} model "
                                                f"of {cfg.n_layer} layers.")
        shape, transform = g.shape(name), None
        if arch == "llama" and key.startswith(("blk.{l}.attn_q.", "blk.{l}.attn_k.")):
            heads = cfg.n_head if "attn_q" in key else cfg.n_kv_head
            if shape[0] != heads * cfg.d_head:
                raise CheckpointError(g.path, name, f"shape {list(shape)} does not have {heads} heads of "
                                                    f"{cfg.d_head} rows.")
            transform = (lambda h: lambda w: unpermute(w, h))(heads)
        elif arch == "gpt2" and _CONV1D.fullmatch(name):
            shape, transform = shape[::-1], np.transpose
        out.append((table[key].format(l=layer), shape,
                    (lambda n, t: lambda: (t or (lambda w: w))(g.read(n)))(name, transform), name))
    expected = checkpoint_shapes(cfg)
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
