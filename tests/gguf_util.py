"""Writing GGUF files in tests, as llama.cpp's converter writes them, spelled out independently of mpitp.convert.

``write_gguf`` turns a Hugging Face model folder into a GGUF file with the ``gguf`` package's writer: llama.cpp's
tensor names, matrices in GGUF's order (the first dimension fastest: torch's [out, in]; GPT-2's Conv1D
[in, out] transposed), Llama's W_Q / W_K rows put in llama.cpp's per-head order (``permute_rows``), each
tensor in the GGUF type the test asks for, and optionally a byte-level BPE tokenizer as metadata.
``dequantize`` reads the bytes of F32, F16, BF16, Q8_0, Q4_0 and Q4_1 back from the format's definition (block
layouts in ggml's ggml-common.h), for comparing against what the converter writes; other types it leaves to
the ``gguf`` package's own dequantization, the converter's independent oracle for them. The ``gguf`` package
cannot quantize the k-quants, so ``random_blocks`` makes valid blocks of any type (its float16 scales drawn
from a given list, the other bytes random).
"""

import json
from pathlib import Path

import gguf
import numpy as np

from dense_reference import read_safetensors

Q = gguf.GGMLQuantizationType
BLOCK = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32}
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
# Where each block's float16 scales (d, and dmin / m) sit, from ggml-common.h: Q6_K's d comes last
SCALES_AT = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
             "Q6_K": [208]}


def random_blocks(kind, n_blocks, rng, scales=(1e-3, -2e-3, 5e-4)):
    """``[n_blocks, bytes per block]`` uint8: valid ``kind`` blocks, every byte random but the float16 scales
    (of the types in ``SCALES_AT``), each drawn from ``scales``."""
    size = gguf.GGML_QUANT_SIZES[Q[kind]][1]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for at in SCALES_AT.get(kind, ()):
        raw[:, at:at + 2] = rng.choice(np.array(scales, np.float16), n_blocks).view(np.uint8).reshape(-1, 2)
    return raw


def permute_rows(w, n_head):
    """llama.cpp's row order for W_Q / W_K: in each head of d rows, GGUF row 2i + j is Hugging Face row
    i + j * d/2 (j = 0, 1), so RoPE's pairs are adjacent rows."""
    d = w.shape[0] // n_head
    order = [h * d + j // 2 + (j % 2) * (d // 2) for h in range(n_head) for j in range(d)]
    return w[order]


def llama3_rope_freqs(cfg):
    """The rope_freqs tensor llama.cpp's converter writes for Llama 3's RoPE scaling: per frequency, 1 for
    wavelengths below original / high_freq_factor, factor above original / low_freq_factor, and between them
    1 / ((1 - smooth) / factor + smooth) with smooth = (original / wavelength - low) / (high - low)."""
    s, theta = cfg["rope_scaling"], cfg["rope_theta"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    n, lo, hi, f = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    out = []
    for i in range(0, dim, 2):
        wavelength = 2 * np.pi * theta ** (i / dim)
        smooth = (n / wavelength - lo) / (hi - lo)
        out.append(1.0 if wavelength < n / hi else f if wavelength > n / lo else 1 / ((1 - smooth) / f + smooth))
    return np.array(out, np.float32)


def llama_names(layers, arch="llama"):
    """Hugging Face name -> llama.cpp's name, for a Llama (or ``arch`` qwen3 / gemma3) of ``layers`` layers."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    if arch in ("qwen3", "gemma3"):
        parts.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    if arch == "gemma3":  # Gemma's four norms a block: llama.cpp's ffn_norm is the one before the MLP
        parts.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    for layer in range(layers):
        for hf, gg in parts.items():
            for p in ("weight", "bias"):
                names[f"model.layers.{layer}.{hf}.{p}"] = f"blk.{layer}.{gg}.{p}"
    return names


def gpt2_names(layers):
    """Hugging Face name (without ``transformer.``) -> llama.cpp's name, for a GPT-2 of ``layers`` layers."""
    names = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight"}
    names.update({f"ln_f.{p}": f"output_norm.{p}" for p in ("weight", "bias")})
    parts = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for layer in range(layers):
        names.update({f"h.{layer}.{hf}.{p}": f"blk.{layer}.{gg}.{p}" for hf, gg in parts.items()
                      for p in ("weight", "bias")})
    return names


def encode(a, kind):
    """``a`` (float32, NumPy order) in GGUF type ``kind``: the array to hand to the writer, and its raw type."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if kind == "F32":
        return a, None
    if kind == "F16":
        return a.astype(np.float16), None
    try:
        return gguf.quants.quantize(a, Q[kind]), Q[kind]
    except NotImplementedError:  # the k-quants and others: random blocks of a's shape
        block, size = gguf.GGML_QUANT_SIZES[Q[kind]]
        raw = random_blocks(kind, a.size // block, np.random.default_rng(a.size))
        return raw.reshape(*a.shape[:-1], a.shape[-1] // block * size), Q[kind]


def dequantize(raw, kind, shape):
    """The float32 values of the bytes ``raw`` of one tensor of GGUF type ``kind`` (NumPy ``shape``)."""
    raw = np.frombuffer(bytes(raw), np.uint8)
    if kind not in ("F32", "F16", "BF16", *BLOCK):
        return gguf.quants.dequantize(raw, Q[kind]).astype(np.float32).reshape(shape)
    if kind == "F32":
        return raw.view("<f4").reshape(shape)
    if kind == "F16":
        return raw.view("<f2").astype(np.float32).reshape(shape)
    if kind == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    n = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]  # bytes per block of 32 values
    blocks = raw.reshape(-1, n)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # the scale, [n_blocks, 1]
    if kind == "Q8_0":  # int8 values times d
        values = blocks[:, 2:].copy().view(np.int8).astype(np.float32) * d
    else:  # 16 bytes: value j < 16 is the low nibble of byte j, value 16 + j its high nibble
        packed = blocks[:, n - 16:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
        values = (q - 8) * d if kind == "Q4_0" else q * d + blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    return values.reshape(shape)


def tensor_fields(path):
    """``{name: (byte position of its type, byte position of its offset, its offset)}`` in the GGUF file
    ``path``, from the gguf package's reader: where a test overwrites a tensor's type or data offset."""
    fields = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        ends = np.cumsum([t.field.offset] + [p.nbytes for p in t.field.parts])  # the parts: ..., type, offset
        fields[t.name] = (int(ends[-3]), int(ends[-2]), int(t.field.parts[-1][0]))
    return fields


def write_gguf(path, model_dir, types=lambda name: "F32", tokenizer=None, drop=(), meta=None, extra=None,
               permute=True):
    """Write the Hugging Face model in ``model_dir`` as the GGUF file ``path``.

    ``types(gguf_name)`` is each tensor's GGUF type (norms and 1-D tensors are always F32, as llama.cpp keeps
    them); ``tokenizer`` a dict of tokenizer metadata (``tokens``, ``merges``, ``token_type``, ``pre``, and
    optional ``bos``/``eos``/``add_bos``/``chat_template``); ``drop`` metadata keys or tensor names to leave
    out; ``meta`` metadata to add or replace, ``{key: (value, GGUFValueType or None)}``; ``extra`` more tensors
    ``{gguf name: (array, type)}``. Returns ``{gguf name: (type, raw bytes, NumPy shape)}`` of what was written.
    """
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    tensors = read_safetensors(model_dir / "model.safetensors")
    arch = {"gpt2": "gpt2", "gemma3_text": "gemma3", "qwen2": "qwen2", "qwen3": "qwen3"}.get(cfg["model_type"], "llama")
    w = gguf.GGUFWriter(str(path), arch)
    if arch == "gpt2":
        names = gpt2_names(cfg["n_layer"])
        keys = {"block_count": cfg["n_layer"], "context_length": cfg["n_positions"],
                "embedding_length": cfg["n_embd"], "feed_forward_length": cfg.get("n_inner") or 4 * cfg["n_embd"],
                "attention.head_count": cfg["n_head"]}
        floats = {"attention.layer_norm_epsilon": cfg.get("layer_norm_epsilon", 1e-5)}
    else:
        names = llama_names(cfg["num_hidden_layers"], arch)
        n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        d_head = cfg.get("head_dim") or cfg["hidden_size"] // n_head
        keys = {"block_count": cfg["num_hidden_layers"], "context_length": cfg["max_position_embeddings"],
                "embedding_length": cfg["hidden_size"], "feed_forward_length": cfg["intermediate_size"],
                "attention.head_count": n_head, "attention.head_count_kv": n_kv, "rope.dimension_count": d_head}
        rope = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0)}
        rope = rope.get("full_attention", rope)  # Gemma 3: the global layers' (the sliding ones' is not stored)
        floats = {"rope.freq_base": rope["rope_theta"], "attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"]}
        if cfg.get("head_dim"):  # llama.cpp's converter writes a config's head_dim as these two
            keys.update({"attention.key_length": d_head, "attention.value_length": d_head})
        if arch == "gemma3":
            keys["attention.sliding_window"] = cfg["sliding_window"]
    meta = dict(meta or {})
    for k, v in keys.items():
        meta.setdefault(f"{arch}.{k}", (v, gguf.GGUFValueType.UINT32))
    for k, v in floats.items():
        meta.setdefault(f"{arch}.{k}", (v, gguf.GGUFValueType.FLOAT32))
    if tokenizer is not None:
        meta.setdefault("tokenizer.ggml.model", (tokenizer.get("model", "gpt2"), None))
        meta.setdefault("tokenizer.ggml.pre", (tokenizer.get("pre", "default"), None))
        meta.setdefault("tokenizer.ggml.tokens", (tokenizer["tokens"], None))
        meta.setdefault("tokenizer.ggml.token_type", (tokenizer["token_type"], None))
        for key in ("merges", "scores"):  # SentencePiece vocabularies have scores and no merges
            if tokenizer.get(key):
                meta.setdefault(f"tokenizer.ggml.{key}", (tokenizer[key], None))
        for key in ("bos", "eos"):  # from the tokenizer dict, else the model's config
            token_id = tokenizer.get(key, cfg.get(f"{key}_token_id"))
            if token_id is not None:
                meta.setdefault(f"tokenizer.ggml.{key}_token_id", (token_id, gguf.GGUFValueType.UINT32))
        meta.setdefault("tokenizer.ggml.add_bos_token", (bool(tokenizer.get("add_bos")), None))
        if tokenizer.get("chat_template"):
            meta.setdefault("tokenizer.chat_template", (tokenizer["chat_template"], None))
    for key, (value, vtype) in meta.items():
        if key in drop:
            continue
        if vtype is None:
            w.add_key_value(key, value, gguf.GGUFValueType.get_type(value),
                            gguf.GGUFValueType.get_type(value[0]) if isinstance(value, list) else None)
        else:
            w.add_key_value(key, value, vtype)
    written = {}
    for hf_name, a in tensors.items():
        hf_name = hf_name.removeprefix("transformer.")
        if arch == "llama" and ".bias" in hf_name and not cfg.get(
                "mlp_bias" if ".mlp." in hf_name else "attention_bias", False):
            continue  # the random test models carry biases their config switches off
        name = names[hf_name]
        if arch != "gpt2" and cfg.get("tie_word_embeddings") and name == "output.weight" or name in drop:
            continue
        a = np.asarray(a, np.float32)
        if arch == "gemma3" and name.endswith("norm.weight"):
            a = a + np.float32(1)  # llama.cpp stores Gemma's RMSNorm scale 1 + w
        if arch == "llama" and permute and (".attn_q." in name or ".attn_k." in name):
            a = permute_rows(a, n_head if ".attn_q." in name else n_kv)
        if arch == "gpt2" and a.ndim == 2 and name.split(".")[-2] in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"):
            a = a.T
        kind = types(name) if a.ndim == 2 else "F32"
        data, raw_type = encode(a, kind)
        w.add_tensor(name, data, raw_dtype=raw_type)
        written[name] = (kind, data.tobytes(), a.shape)
    if arch == "llama" and (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3" \
            and "rope_freqs.weight" not in drop:
        extra = {"rope_freqs.weight": (llama3_rope_freqs(cfg), "F32"), **(extra or {})}
    for name, (a, kind) in (extra or {}).items():
        data, raw_type = encode(a, kind)
        w.add_tensor(name, data, raw_dtype=raw_type)
        written[name] = (kind, data.tobytes(), a.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
