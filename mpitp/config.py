"""Model configuration: what a Hugging Face ``config.json`` says, in mpitp's names.

``ModelConfig`` describes the whole model and is never changed to per-rank sizes; the per-rank view lives
in ``mpitp.sharding``. Every key that is read is checked here, so a bad config fails at load with a
sentence that names the key, not later inside a matmul.
"""

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field

from .errors import ConfigError, read_regular

# model_type values whose math mpitp implements, and the family (the plan in mpitp.families) each maps to.
# Mistral and Qwen2 are Llama's math (Qwen2 with biases on q, k, v only), with sliding windows on some layers.
_FAMILIES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "qwen3",
             "gemma3_text": "gemma3", "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe",
             "olmoe": "olmoe", "gpt_neox": "gpt_neox"}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation of GELU
_ACTIVATIONS = {"gpt2": _GELU_TANH, "gemma3": _GELU_TANH,
                "gpt_neox": ("gelu",) + _GELU_TANH,  # "gelu": the exact GELU, x Phi(x), with erf
                **dict.fromkeys(("llama", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"), ("silu", "swish"))}
MAX_SIZE = 2**31  # no model has a size or token id above this; refused before anything is computed from it


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings (Llama family)."""

    theta: float = 10000.0
    scaling: str = "default"  # "default", "linear" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The shape and flavour of a transformer, independent of how it is split over ranks."""

    family: str  # "gpt2" or "llama": which layer math to use
    model_type: str  # as written in config.json
    n_layer: int
    n_embd: int
    n_head: int  # query heads
    n_kv_head: int  # key/value heads (== n_head without grouped-query attention)
    d_head: int
    n_ffn: int  # MLP hidden width
    n_vocab: int
    n_ctx: int  # longest sequence the model supports (positions)
    norm_eps: float
    activation: str
    qkv_bias: bool  # biases on W_Q, W_K, W_V
    out_bias: bool  # bias on W_B
    mlp_bias: bool  # biases on W_C (and W_up) and W_D
    tie_word_embeddings: bool  # LM head shares the token embedding
    rope: RopeConfig = field(default_factory=RopeConfig)  # unused by gpt2; of the full-attention layers
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    # Per layer: how many positions back a query sees (itself included), 0 for all of them; () is all layers 0.
    windows: tuple = ()
    rope_local: RopeConfig | None = None  # the sliding layers' RoPE, where it differs (Gemma 3's local theta)
    qk_norm: bool = False  # an RMSNorm over each head of Q and of K, before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # Gemma's norms scale by (offset + weight): 1
    embed_scale: float = 1.0  # the embedding's rows are multiplied by it (Gemma: sqrt(n_embd))
    query_scale: float | None = None  # the scores' scale where it is not 1/sqrt(d_head) (query_pre_attn_scalar)
    # Mixtures of experts (mpitp.experts); n_expert 0 is a dense model. n_ffn is then the shared expert's width
    # (Qwen2-MoE), or the experts' where there is no shared expert.
    n_expert: int = 0  # routed experts per layer
    n_expert_used: int = 0  # experts each token is routed to (top-k)
    n_ffn_expert: int = 0  # one expert's MLP hidden width
    norm_topk: bool = False  # the top-k routing weights are renormalized to sum to 1 (Mixtral; norm_topk_prob)
    rotary_dims: int | None = None  # RoPE turns only the first rotary_dims of each head (GPT-NeoX's rotary_pct)
    parallel_residual: bool = False  # attention and MLP both read the block's input: one reduction (GPT-NeoX)


def _shown(value):
    # repr(value), cut short: JSON integers have any number of digits
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _is_int(value, low):
    return type(value) is int and low <= value <= MAX_SIZE


def _get(cfg, key, kind, path, default=None):
    # cfg[key] checked to be of ``kind``; ``default`` where it is missing or null (required if None)
    if cfg.get(key) is None:
        if default is None:
            raise ConfigError(f"{path}: required key '{key}' is missing.")
        return default
    value = cfg[key]
    if kind is int and not _is_int(value, 1):
        raise ConfigError(f"{path}: '{key}' must be a positive integer (at most {MAX_SIZE}), got {_shown(value)}.")
    if kind is float and not (type(value) in (int, float) and 0 < value <= sys.float_info.max):  # not NaN or inf
        raise ConfigError(f"{path}: '{key}' must be a positive number (finite), got {_shown(value)}.")
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}: '{key}' must be true or false, got {_shown(value)}.")
    return kind(value)


def _token_ids(value, key, path):
    # A token id or a list of them; an empty list is no id (for eos: no end-of-sequence token).
    ids = value if isinstance(value, list) else [value]
    if not all(_is_int(i, 0) for i in ids):
        raise ConfigError(f"{path}: '{key}' must be a token id (an integer from 0 to {MAX_SIZE}) or a list of them, "
                          f"got {_shown(value)}.")
    return tuple(ids)


def _rope(cfg, path, layer_type):
    # The RoPE of one kind of layer ("full_attention" or "sliding_attention"); None for the sliding layers of a
    # model whose layers all share one. transformers 5 writes {"rope_parameters": {"rope_theta", "rope_type",
    # ...}}, or one such object per kind of layer (Gemma 3); transformers 4 a top-level "rope_theta", an optional
    # "rope_scaling" dict, and Gemma 3's "rope_local_base_freq" for its sliding layers.
    key = "rope_parameters" if cfg.get("rope_parameters") is not None else "rope_scaling"
    params = {} if cfg.get(key) is None else cfg[key]
    if not isinstance(params, dict) or not isinstance(params.get(layer_type, {}), dict):
        raise ConfigError(f"{path}: '{key}' must be an object (or null), got {_shown(params)}.")
    if layer_type in params:
        params = params[layer_type]
    elif layer_type == "sliding_attention":
        if cfg.get("rope_local_base_freq") is None:
            return None
        params = {"rope_theta": cfg["rope_local_base_freq"]}
    elif key == "rope_scaling" and "rope_theta" in cfg:
        params = {"rope_theta": cfg["rope_theta"], **params}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = _get(params, "rope_theta", float, path, default=10000.0)
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":  # positions divided by factor
        return RopeConfig(theta=theta, scaling="linear", factor=_get(params, "factor", float, path))
    if kind == "llama3":
        rope = RopeConfig(theta=theta, scaling="llama3", factor=_get(params, "factor", float, path),
                          low_freq_factor=_get(params, "low_freq_factor", float, path),
                          high_freq_factor=_get(params, "high_freq_factor", float, path),
                          original_max_positions=_get(params, "original_max_position_embeddings", int, path))
        if rope.high_freq_factor <= rope.low_freq_factor:
            raise ConfigError(f"{path}: llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                              f"{rope.high_freq_factor} and {rope.low_freq_factor}.")
        return rope
    raise ConfigError(f"{path}: rope type '{kind}' is not supported; supported: default, linear, llama3.")


def config_from_dict(cfg, path="config.json", generation=None):
    """A ``ModelConfig`` from the parsed ``config.json`` (``path`` names it in errors); the eos/bos ids of a
    parsed ``generation_config.json`` (``generation``, ignored unless a JSON object) take precedence."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(cfg).__name__}.")
    model_type = cfg.get("model_type")
    family = _FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ConfigError(f"{path}: model_type {_shown(model_type)} is not supported; supported: "
                          f"{', '.join(sorted(_FAMILIES))}.")
    facts = {"gpt2": _gpt2, "gpt_neox": _gpt_neox}.get(family, _decoder)(cfg, path, model_type)
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        facts.update(_experts(cfg, path, model_type))
    conf = ModelConfig(family=family, model_type=model_type, **facts, **_special_ids(cfg, path, generation))
    if conf.activation not in _ACTIVATIONS[family]:
        raise ConfigError(f"{path}: activation {conf.activation!r} is not supported for {model_type}; "
                          f"supported: {', '.join(_ACTIVATIONS[family])}.")
    return conf


def _special_ids(cfg, path, generation):
    # The eos/bos ids, from generation_config.json where it has them. eos [] is no end-of-sequence token; bos []
    # is refused.
    gen = generation if isinstance(generation, dict) else {}
    gen_path = os.path.join(os.path.dirname(path), "generation_config.json")
    (eos_path, eos), (bos_path, bos) = ((gen_path, gen[key]) if key in gen else (path, cfg.get(key))
                                        for key in ("eos_token_id", "bos_token_id"))
    eos_ids = () if eos is None else _token_ids(eos, "eos_token_id", eos_path)
    if bos == []:
        raise ConfigError(f"{bos_path}: 'bos_token_id' is an empty list; give a token id, or null for none.")
    return {"bos_token_id": None if bos is None else _token_ids(bos, "bos_token_id", bos_path)[0],
            "eos_token_ids": eos_ids}


def _gpt2(cfg, path, model_type):
    # GPT-2's config.json, in ModelConfig's fields.
    n_embd, n_head = _get(cfg, "n_embd", int, path), _get(cfg, "n_head", int, path)
    if n_embd % n_head:
        raise ConfigError(f"{path}: n_embd={n_embd} is not divisible by n_head={n_head}.")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.get(key):
            raise ConfigError(f"{path}: '{key}: true' is not supported; mpitp implements the standard GPT-2.")
    if cfg.get("scale_attn_weights") is False:
        raise ConfigError(f"{path}: 'scale_attn_weights: false' is not supported.")
    return dict(n_layer=_get(cfg, "n_layer", int, path), n_embd=n_embd, n_head=n_head, n_kv_head=n_head,
                d_head=n_embd // n_head, n_ffn=_get(cfg, "n_inner", int, path, default=4 * n_embd),
                n_vocab=_get(cfg, "vocab_size", int, path), n_ctx=_get(cfg, "n_positions", int, path),
                norm_eps=_get(cfg, "layer_norm_epsilon", float, path, 1e-5),
                activation=cfg.get("activation_function", "gelu_new"), qkv_bias=True, out_bias=True,
                mlp_bias=True, tie_word_embeddings=True)


def _decoder(cfg, path, model_type):
    # The Llama-style config.json (Llama, Mistral, Qwen2, Qwen3, Gemma 3), in ModelConfig's fields.
    n_embd, n_head = _get(cfg, "hidden_size", int, path), _get(cfg, "num_attention_heads", int, path)
    n_kv_head = _get(cfg, "num_key_value_heads", int, path, default=n_head)
    if n_head % n_kv_head:
        raise ConfigError(f"{path}: num_attention_heads={n_head} is not a multiple of "
                          f"num_key_value_heads={n_kv_head}.")
    if "head_dim" not in cfg and n_embd % n_head:
        raise ConfigError(f"{path}: hidden_size={n_embd} is not divisible by num_attention_heads={n_head} "
                          f"and no head_dim is given.")
    d_head = _get(cfg, "head_dim", int, path, default=n_embd // n_head)
    if d_head % 2:
        raise ConfigError(f"{path}: head_dim={d_head} must be even for rotary embeddings.")
    gemma, n_layer = model_type == "gemma3_text", _get(cfg, "num_hidden_layers", int, path)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ConfigError(f"{path}: '{key}' is not supported (Gemma 2's soft-capping); set it to null.")
    attn_bias = _get(cfg, "attention_bias", bool, path, default=False)
    scalar = _get(cfg, "query_pre_attn_scalar", float, path, default=d_head) if gemma else d_head
    return dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head, d_head=d_head,
                n_ffn=_get(cfg, "intermediate_size", int, path), n_vocab=_get(cfg, "vocab_size", int, path),
                n_ctx=_get(cfg, "max_position_embeddings", int, path),
                norm_eps=_get(cfg, "rms_norm_eps", float, path, default=1e-6),
                activation=cfg.get("hidden_activation" if gemma else "hidden_act", "gelu_pytorch_tanh" if gemma
                                   else "silu"),
                qkv_bias=attn_bias or model_type == "qwen2" or (model_type == "qwen2_moe" and _get(
                    cfg, "qkv_bias", bool, path, default=True)), out_bias=attn_bias,
                mlp_bias=_get(cfg, "mlp_bias", bool, path, default=False),
                tie_word_embeddings=_get(cfg, "tie_word_embeddings", bool, path, default=gemma),
                rope=_rope(cfg, path, "full_attention"), rope_local=_rope(cfg, path, "sliding_attention"),
                windows=_windows(cfg, path, model_type, n_layer), qk_norm=model_type in ("qwen3", "gemma3_text", "qwen3_moe", "olmoe"),
                norm_offset=1.0 if gemma else 0.0, embed_scale=n_embd ** 0.5 if gemma else 1.0,
                query_scale=scalar ** -0.5 if scalar != d_head else None)


def _experts(cfg, path, model_type):
    # The mixture of experts' facts. Every layer is a mixture here: Qwen's dense layers between them
    # (mlp_only_layers, decoder_sparse_step) and OLMoE's clipped projections (clip_qkv) are refused.
    mixtral = model_type == "mixtral"  # transformers writes num_local_experts or num_experts: one name, two keys
    n_expert = _get(cfg, "num_local_experts" if "num_local_experts" in cfg else "num_experts", int, path)
    n_used = _get(cfg, "num_experts_per_tok", int, path)
    if n_used > n_expert:
        raise ConfigError(f"{path}: num_experts_per_tok={n_used} is more than the {n_expert} experts.")
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("clip_qkv") is not None:
        raise ConfigError(f"{path}: dense layers among the experts (mlp_only_layers, decoder_sparse_step != 1) and "
                          f"clip_qkv are not supported; every layer must be a mixture of experts.")
    width = _get(cfg, "intermediate_size" if model_type in ("mixtral", "olmoe") else "moe_intermediate_size", int,
                 path)
    shared = _get(cfg, "shared_expert_intermediate_size", int, path) if model_type == "qwen2_moe" else width
    return dict(n_expert=n_expert, n_expert_used=n_used, n_ffn_expert=width, n_ffn=shared,
                norm_topk=mixtral or _get(cfg, "norm_topk_prob", bool, path, default=False))


def _gpt_neox(cfg, path, model_type):
    # GPT-NeoX's config.json (Pythia), in ModelConfig's fields. transformers 4 writes rotary_pct and
    # rotary_emb_base at the top level, transformers 5 partial_rotary_factor and rope_theta in rope_parameters.
    n_embd, n_head = _get(cfg, "hidden_size", int, path), _get(cfg, "num_attention_heads", int, path)
    if n_embd % n_head:
        raise ConfigError(f"{path}: hidden_size={n_embd} is not divisible by num_attention_heads={n_head}.")
    rope_cfg = {**cfg, "rope_theta": cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0))}
    params = cfg.get("rope_parameters") or {}
    fraction = params.get("partial_rotary_factor", cfg.get("rotary_pct", 0.25)) if isinstance(params, dict) else 0.25
    d_head = n_embd // n_head
    rotary_dims = int(d_head * fraction) if type(fraction) in (int, float) and 0 < fraction <= 1 else -1
    if rotary_dims < 2 or rotary_dims % 2:
        raise ConfigError(f"{path}: the rotary fraction {_shown(fraction)} of head_dim={d_head} must turn an even "
                          f"number of dimensions (rotary_pct or partial_rotary_factor, in (0, 1]).")
    bias = _get(cfg, "attention_bias", bool, path, default=True)
    return dict(n_layer=_get(cfg, "num_hidden_layers", int, path), n_embd=n_embd, n_head=n_head, n_kv_head=n_head,
                d_head=d_head, n_ffn=_get(cfg, "intermediate_size", int, path, default=4 * n_embd),
                n_vocab=_get(cfg, "vocab_size", int, path), n_ctx=_get(cfg, "max_position_embeddings", int, path),
                norm_eps=_get(cfg, "layer_norm_eps", float, path, 1e-5), activation=cfg.get("hidden_act", "gelu"),
                qkv_bias=bias, out_bias=bias, mlp_bias=True,
                tie_word_embeddings=_get(cfg, "tie_word_embeddings", bool, path, default=False),
                rope=_rope(rope_cfg, path, "full_attention"), rotary_dims=rotary_dims,
                parallel_residual=_get(cfg, "use_parallel_residual", bool, path, default=True))


def _windows(cfg, path, model_type, n_layer):
    # Per layer, the sliding window (0: full attention). transformers 5 writes "layer_types"; older files say
    # it with use_sliding_window and max_window_layers (Qwen2, Qwen3), or sliding_window alone (Mistral).
    window = cfg.get("sliding_window")
    kinds = cfg.get("layer_types")
    if kinds is None:
        sliding = window is not None and (model_type in ("mistral", "mixtral") or cfg.get("use_sliding_window", False))
        first = cfg.get("max_window_layers", 0) if model_type in ("qwen2", "qwen3") else 0
        kinds = ["sliding_attention" if sliding and i >= first else "full_attention" for i in range(n_layer)]
    if not isinstance(kinds, list) or len(kinds) != n_layer or not set(kinds) <= {"sliding_attention",
                                                                                   "full_attention"}:
        raise ConfigError(f"{path}: 'layer_types' must list 'sliding_attention' or 'full_attention' for each of "
                          f"the {n_layer} layers, got {_shown(kinds)}.")
    if "sliding_attention" not in kinds:
        return ()
    window = _get(cfg, "sliding_window", int, path)
    return tuple(window if kind == "sliding_attention" else 0 for kind in kinds)


def _read_json(path, required):
    if not os.path.exists(path):
        if required:
            raise ConfigError(f"{path}: file not found; a model folder needs a Hugging Face config.json.")
        return None
    try:
        return json.loads(read_regular(path))
    except (ValueError, RecursionError) as e:  # not UTF-8 JSON, nested too deep, or an integer of > 4300 digits
        raise ConfigError(f"{path}: not readable as JSON ({str(e).split(';')[0]}).") from None  # not Python's advice


def _not_a_folder(path):
    """What a ``--model`` that is not a folder is, and what to give instead."""
    if not os.path.exists(path):
        return "model folder not found."
    head = b""
    if os.path.isfile(path):  # a regular file (not a FIFO, whose read would block)
        with contextlib.suppress(OSError), open(path, "rb") as f:
            head = f.read(4)
    if head == b"GGUF":  # every GGUF file's first bytes, whatever its name
        return f"a GGUF file, not a model folder: convert it once with `python -m mpitp.convert {path} OUT_DIR`, " \
               f"then give --model OUT_DIR."
    if str(path).endswith(".safetensors"):
        return "a safetensors file, not a model folder: give the folder that holds it and its config.json."
    return "not a folder; give a Hugging Face model folder (config.json and model.safetensors)."


def load_config(model_dir):
    """Read ``config.json`` (and ``generation_config.json`` if present) from a model folder."""
    if not os.path.isdir(model_dir):
        raise ConfigError(f"{model_dir}: {_not_a_folder(model_dir)}")
    cfg = _read_json(os.path.join(model_dir, "config.json"), required=True)
    gen = _read_json(os.path.join(model_dir, "generation_config.json"), required=False)
    return config_from_dict(cfg, os.path.join(model_dir, "config.json"), gen)
