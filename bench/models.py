"""The models the bench runs: presets of real shapes, built with random weights through mpitp's own loader.

``RandomCheckpoint`` stands in for a checkpoint file, so a random model takes exactly the loading path (and
memory layout) of a real one, each rank reading (here: drawing) only its own shard.
"""

import dataclasses

import numpy as np

from mpitp.model import Model
from mpitp.sharding import shard_for
from mpitp.weights import checkpoint_shapes, load_weights

# Real model shapes, as Hugging Face config.json dicts.
PRESETS = {
    "gpt2-124m": {"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
                  "vocab_size": 50257},
    "gpt2-355m": {"model_type": "gpt2", "n_embd": 1024, "n_head": 16, "n_layer": 24, "n_positions": 1024,
                  "vocab_size": 50257},
    "llama-1b": {"model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 64, "num_hidden_layers": 16, "intermediate_size": 8192, "vocab_size": 128256,
                 "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                 "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}},
    "qwen2-0.5b": {"model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
                   "num_hidden_layers": 24, "intermediate_size": 4864, "vocab_size": 151936,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "tie_word_embeddings": True},
    # 9 query heads in 3 groups: uneven at 2 and 4 ranks (README, "Uneven splits").
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "num_hidden_layers": 30, "intermediate_size": 1536, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                     "tie_word_embeddings": True},
    # 4 query heads and 1 key/value head (every rank past the first replicates it); 15 of 18 layers slide by 512.
    "gemma3-270m": {"model_type": "gemma3_text", "hidden_size": 640, "num_attention_heads": 4,
                    "num_key_value_heads": 1, "head_dim": 256, "num_hidden_layers": 18, "intermediate_size": 2048,
                    "vocab_size": 262144, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                    "query_pre_attn_scalar": 256, "sliding_window": 512, "rope_theta": 1000000.0,
                    "rope_local_base_freq": 10000.0, "tie_word_embeddings": True,
                    "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)]},
    "qwen3-0.6b": {"model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8,
                   "head_dim": 128, "num_hidden_layers": 28, "intermediate_size": 3072, "vocab_size": 151936,
                   "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "tie_word_embeddings": True},
    # GPT-NeoX's parallel block (one Allreduce per block), a quarter of each head turned by RoPE, untied head.
    "pythia-160m": {"model_type": "gpt_neox", "hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12,
                    "intermediate_size": 3072, "vocab_size": 50304, "max_position_embeddings": 2048,
                    "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": True,
                    "layer_norm_eps": 1e-5, "hidden_act": "gelu", "tie_word_embeddings": False},
    "tiny": {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 128,
             "vocab_size": 256},
}


class RandomCheckpoint:
    """A checkpoint of ``config``'s tensors (names and shapes of ``mpitp.weights.checkpoint_shapes``) whose
    values are drawn when read: matrices N(0, 0.02^2) as GPT-2 initialises them (its learned positions with
    scale 0.01), norm weights 1, biases 0. Draws come from a generator seeded by ``(seed, rank)``."""

    model_dir = "random"

    def __init__(self, config, seed=0, rank=0):
        self.shapes = checkpoint_shapes(config)
        self.rng = np.random.default_rng([seed, rank])

    def __contains__(self, name):
        return name in self.shapes

    def shape(self, name):
        return self.shapes[name]

    def path_of(self, name):
        return f"{self.model_dir}:{name}"

    def read_into(self, name, out, index=(), transpose=False):
        """Fill ``out``, the block ``index`` of tensor ``name`` (transposed if asked), with the tensor's values."""
        shape = self.shapes[name]
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        block = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
        if tuple(out.shape) != (block[::-1] if transpose else block):  # as a real checkpoint checks
            raise ValueError(f"{name}: destination shape {out.shape} does not match the block {block}")
        if name.endswith(".bias"):
            out.fill(0)
        elif len(self.shapes[name]) == 1:  # a 1-D weight is a norm's scale
            out.fill(1)
        else:
            scale = 0.01 if name.endswith("wpe.weight") else 0.02
            for row in np.atleast_2d(out):  # row by row: no temporary the size of the block
                self.rng.standard_normal(out=row, dtype=out.dtype)
                row *= scale


def random_model(config, comm, dtype, seed=0):
    """A ``Model`` with random weights of ``config``'s shapes on ``comm``, loaded like a checkpoint."""
    rank, size = comm.Get_rank(), comm.Get_size()
    shard = shard_for(config, rank, size)
    ckpt = RandomCheckpoint(config, seed, rank)
    return Model(config, shard, *load_weights(ckpt, config, shard, dtype), comm, dtype)


def fixed_cost_config(config, size):
    """``config`` shrunk until every weight stays in cache (d_head 4, width 4 x heads, a small MLP and
    vocabulary), with the same family, depth and heads, for ``size`` ranks: its decode makes exactly the same
    calls as the real model's, so its time per token is the floor that Python, NumPy dispatch and Allreduce
    latency set."""
    width = 4 * config.n_head
    return dataclasses.replace(config, n_embd=width, d_head=4, n_ffn=max(width, size), n_vocab=max(512, size),
                               rotary_dims=config.rotary_dims and 2)  # partial rotary stays partial: 2 of 4
