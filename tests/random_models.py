"""Small random-weight Hugging Face model folders, written on the fly, for shapes the goldens lack.

Their head counts split unevenly over most rank counts (6 heads over 4 and 5 ranks, 9 query heads and 3
key/value heads over 2, 4, 5 ...), and their MLP widths do not divide evenly either. Correctness is checked
against the dense reference (itself checked against HF).
"""

import json

import numpy as np

from st_util import write_safetensors

SHAPES = {
    # 6 heads, MLP width 100.
    "gpt2-6h": {"model_type": "gpt2", "n_embd": 48, "n_head": 6, "n_layer": 2, "n_inner": 100,
                "n_positions": 64, "vocab_size": 97, "activation_function": "gelu_new",
                "layer_norm_epsilon": 1e-5, "eos_token_id": 96},
    # 6 query heads sharing 1 kv head (multi-query): the kv head is replicated at every rank count.
    "llama-mqa": {"model_type": "llama", "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 1,
                  "num_hidden_layers": 2, "intermediate_size": 100, "max_position_embeddings": 64,
                  "vocab_size": 97, "rms_norm_eps": 1e-5, "attention_bias": True, "mlp_bias": True,
                  "tie_word_embeddings": True, "hidden_act": "silu",
                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                  "rope_theta": 10000.0},
    # SmolLM2-135M's head layout: 9 query heads in 3 groups of 3, so most rank counts cut a group.
    "llama-9h": {"model_type": "llama", "hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3,
                 "num_hidden_layers": 2, "intermediate_size": 100, "max_position_embeddings": 64,
                 "vocab_size": 97, "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0},
    "llama-large": {"model_type": "llama", "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
                    "num_hidden_layers": 6, "intermediate_size": 1536, "max_position_embeddings": 128,
                    "vocab_size": 1000, "rms_norm_eps": 1e-5},
}


def _tensors(cfg, rng):
    def w(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {}
    if cfg["model_type"] == "gpt2":
        d, f, p = cfg["n_embd"], cfg["n_inner"], "transformer."
        t[p + "wte.weight"], t[p + "wpe.weight"] = w(cfg["vocab_size"], d), w(cfg["n_positions"], d)
        for i in range(cfg["n_layer"]):
            h = f"{p}h.{i}."
            t.update({h + "ln_1.weight": norm(d), h + "ln_1.bias": w(d), h + "ln_2.weight": norm(d),
                      h + "ln_2.bias": w(d), h + "attn.c_attn.weight": w(d, 3 * d), h + "attn.c_attn.bias": w(3 * d),
                      h + "attn.c_proj.weight": w(d, d), h + "attn.c_proj.bias": w(d),
                      h + "mlp.c_fc.weight": w(d, f), h + "mlp.c_fc.bias": w(f),
                      h + "mlp.c_proj.weight": w(f, d), h + "mlp.c_proj.bias": w(d)})
        t[p + "ln_f.weight"], t[p + "ln_f.bias"] = norm(d), w(d)
    else:
        d, f = cfg["hidden_size"], cfg["intermediate_size"]
        dh = d // cfg["num_attention_heads"]
        q, kv = cfg["num_attention_heads"] * dh, cfg["num_key_value_heads"] * dh
        t["model.embed_tokens.weight"] = w(cfg["vocab_size"], d)
        for i in range(cfg["num_hidden_layers"]):
            h = f"model.layers.{i}."
            for name, (out, inp) in {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d),
                                     "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, q),
                                     "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}.items():
                t[h + name + ".weight"] = w(out, inp)
                t[h + name + ".bias"] = w(out)
            t[h + "input_layernorm.weight"], t[h + "post_attention_layernorm.weight"] = norm(d), norm(d)
        t["model.norm.weight"] = norm(d)
        if not cfg.get("tie_word_embeddings", False):
            t["lm_head.weight"] = w(cfg["vocab_size"], d)
    return t


def write_random_model(path, name, seed=0, **changes):
    """Write the model folder ``SHAPES[name]`` (with ``changes`` to its config) with seeded random weights into
    ``path``; return ``str(path)``."""
    cfg = dict(SHAPES[name], **changes)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    write_safetensors(path / "model.safetensors", _tensors(cfg, np.random.default_rng(seed)))
    return str(path)
