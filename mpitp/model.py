"""The model: one rank's shard of the weights and the forward pass of the seed diagram.

``Model.forward`` runs the new tokens of one sequence through every block against the rank's KV cache.
Each block makes exactly two Allreduce calls (``comm.allreduce_sum``): after the row-parallel W_B of
attention and after the row-parallel W_D of the MLP. One rank runs this very same code on a 1-rank
communicator; there is no separate serial model.
"""

import numpy as np

from . import comm as mpi
from .checkpoint import Checkpoint
from .config import load_config
from .errors import MpitpError, RequestError
from .kvcache import KVCache
from .profile import NO_PROFILE
from .layers import apply_rope, attention, gelu_tanh, layer_norm, rms_norm, rope_inv_freq, rope_tables, silu
from .sharding import block_range, shard_for
from .memory import check_fits
from .weights import load_weights, shard_bytes

DTYPES = {"float32": np.float32, "float64": np.float64}


def resolve_dtype(dtype):
    """``"float32"``/``"float64"`` (or the NumPy type) -> NumPy type; anything else is a ``MpitpError``."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise MpitpError(f"dtype {dtype!r} is not supported; use one of: {', '.join(DTYPES)}.")
    return DTYPES[name]


class Model:
    """One rank's part of a tensor-parallel transformer.

    Build it with ``Model.load``. Attributes: ``config`` (the whole model), ``shard`` (what this rank owns),
    ``blocks`` (list of ``BlockWeights``), ``globals`` (``GlobalWeights``), ``comm``, ``dtype``.
    """

    def __init__(self, config, shard, blocks, global_weights, comm, dtype):
        self.config, self.shard, self.comm, self.dtype = config, shard, comm, dtype
        self.blocks, self.globals = blocks, global_weights
        # Embedding and LM head split by vocabulary (the default), or replicated on every rank.
        self.vocab_parallel = shard.n_vocab_local < config.n_vocab
        self._vocab_counts = [block_range(config.n_vocab, shard.size, r)[1] if self.vocab_parallel
                              else config.n_vocab for r in range(shard.size)]
        self._inv_freq = rope_inv_freq(config.rope, config.d_head) if config.family == "llama" else None
        self._reduce_buf = np.empty((0, config.n_embd), dtype=dtype)

    @classmethod
    def load(cls, model_dir, comm, dtype="float32", vocab_parallel=True):
        """Read config.json and this rank's shard of the weights of a Hugging Face model folder.

        Every check that bad input can fail runs here, on every rank, before any communication: the config,
        the rank count (``ShardingError`` lists the valid ones), and every checkpoint header and shape.
        Loading itself makes no MPI calls.

        Parameters
        ----------
        model_dir : str
            Folder with config.json and model.safetensors (or model.safetensors.index.json + shards).
        comm : mpi4py communicator
            The ranks that share the model. ``mpitp.comm.serial()`` runs it on this process alone.
        dtype : {"float32", "float64"}
            Weights are cast to it at load and every computation runs in it.
        vocab_parallel : bool
            Split the embedding and LM head by vocabulary over the ranks (default), or replicate them.
        """
        dtype = resolve_dtype(dtype)
        config = load_config(model_dir)
        shard = shard_for(config, comm.Get_rank(), comm.Get_size(), vocab_parallel)
        ckpt = Checkpoint(model_dir)
        check_fits(shard_bytes(config, shard, dtype), f"this rank's shard of {model_dir}",
                   "use more ranks (spread over nodes) or --dtype float32")
        blocks, global_weights = load_weights(ckpt, config, shard, dtype)
        return cls(config, shard, blocks, global_weights, comm, dtype)

    @property
    def weight_bytes(self):
        """Bytes of weights this rank holds (a tied LM head counted once)."""
        arrays = [a for b in self.blocks for a in b.arrays()]
        return sum(a.nbytes for a in arrays + self.globals.arrays(self.config.tie_word_embeddings))

    def cache_bytes(self, capacity):
        """Bytes of this rank's KV cache for ``capacity`` positions."""
        cfg = self.config
        return 2 * cfg.n_layer * self.shard.n_kv_head_local * capacity * cfg.d_head * np.dtype(self.dtype).itemsize

    def new_cache(self, capacity):
        """A KV cache for one sequence of up to ``capacity`` positions (at most the model's context)."""
        if not 1 <= capacity <= self.config.n_ctx:
            raise RequestError(f"a sequence of {capacity} positions does not fit the model's context of "
                               f"{self.config.n_ctx} positions.")
        check_fits(self.cache_bytes(capacity), f"a KV cache of {capacity} positions",
                   "ask for fewer tokens, or use more ranks or nodes")
        return KVCache(self.config.n_layer, self.shard.n_kv_head_local, self.config.d_head, capacity, self.dtype)

    def check_tokens(self, token_ids):
        """Raise ``RequestError`` unless ``token_ids`` is a non-empty list of ids in the vocabulary."""
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise RequestError(f"token ids must be a non-empty list of integers, got {token_ids!r}.")
        bad = ids[(ids < 0) | (ids >= self.config.n_vocab)]
        if bad.size:
            raise RequestError(f"token id {int(bad[0])} is outside the vocabulary 0..{self.config.n_vocab - 1}.")
        return ids.astype(np.int64)

    def forward(self, token_ids, cache, trace=None, all_logits=False, profile=None, gather=True):
        """Run new tokens of one sequence through the model, appending their keys and values to ``cache``.

        Parameters
        ----------
        token_ids : sequence of int, [n_seq]
            The prompt (prefill) or the one newly chosen token (decode).
        cache : KVCache
            This rank's cache for the sequence; its ``length`` is the position of the first new token.
        trace : Trace, optional
            Records this rank's named tensors A, Q, K, V, B, C, D, E for every layer, and the logits.
        all_logits : bool
            Return logits for every new position instead of only the last one.
        profile : Profile, optional
            Accumulates this forward's wall time per category (matmul, attention, allreduce, lm_head, other).
        gather : bool
            Return the logits of the whole vocabulary on every rank, C-contiguous. With ``False`` a
            vocab-parallel model returns only this rank's columns, ``shard.vocab_cols``, as a view that may
            have strided rows (what generation uses: it decides the next token without gathering the logits).

        Returns
        -------
        ndarray, [n_seq or 1, n_vocab] (or [n_seq or 1, n_vocab_local])
            Logits.
        """
        return self.forward_batch([(token_ids, cache)], trace, all_logits, profile, gather)[0]

    def forward_batch(self, segments, trace=None, all_logits=False, profile=None, gather=True):
        """Run new tokens of several sequences through the model in one pass.

        The rows of all sequences are stacked, so every weight is read once for the whole batch; only
        attention runs per sequence, against that sequence's own cache and positions. Sequences may be at
        different lengths (a batch of prompts, or one new token each while decoding).

        Parameters
        ----------
        segments : list of (token_ids, KVCache)
            The new tokens of each sequence and its cache.
        trace, all_logits, profile, gather
            As in ``forward``; a trace records the stacked rows of all sequences.

        Returns
        -------
        list of ndarray
            Each sequence's logits, as ``forward`` returns them.
        """
        cfg, shard = self.config, self.shard
        ids_list = [self.check_tokens(ids) for ids, _ in segments]
        for ids, (_, cache) in zip(ids_list, segments):
            if cache.length + len(ids) > cfg.n_ctx:
                raise RequestError(f"positions up to {cache.length + len(ids)} exceed the model's context of "
                                   f"{cfg.n_ctx}.")
            cache.check_room(len(ids))
        mark = (profile or NO_PROFILE).mark  # charges the time since the previous mark to a category
        (profile or NO_PROFILE).start()
        ends = np.cumsum([len(ids) for ids in ids_list])  # row ranges of the sequences: [end - n_i, end)
        starts = [cache.length for _, cache in segments]  # position of each sequence's first new token
        ids = np.concatenate(ids_list)
        n_rows = len(ids)
        positions = np.concatenate([np.arange(p, p + len(i)) for p, i in zip(starts, ids_list)])
        g = self.globals
        if self.vocab_parallel:
            # Vocab-parallel embedding: each rank fills the rows of the ids in its range; an Allreduce
            # combines them into x, the residual stream, [n_rows, n_embd], replicated from here on.
            local = ids - shard.vocab_start
            mine = (local >= 0) & (local < shard.n_vocab_local)
            x = np.zeros((n_rows, cfg.n_embd), dtype=self.dtype)
            x[mine] = g.W_embed[local[mine]]
            mark("other")
            mpi.allreduce_sum(self.comm, x)
            mark("allreduce")
        else:
            x = g.W_embed[ids]  # [n_rows, n_embd], a copy: the residual stream, replicated on every rank
        if g.W_pos is not None:
            x += g.W_pos[positions]
        rope = rope_tables(self._inv_freq, positions, self.dtype) if self._inv_freq is not None else None
        if self._reduce_buf.shape[0] < n_rows:
            self._reduce_buf = np.empty((n_rows, cfg.n_embd), dtype=self.dtype)
        buf = self._reduce_buf[:n_rows]  # contiguous rows: the in-place Allreduce buffer

        for layer, w in enumerate(self.blocks):
            # Attention. A = norm_1(x), replicated.
            A = self._norm(x, w.norm_1_weight, w.norm_1_bias)
            mark("other")
            # Q, K, V of this rank's heads (column-parallel: no communication), as one product with
            # W_QKV = [W_Q | W_K | W_V]; Q, K and V are views of its columns.
            QKV = self._linear(A, w.W_QKV, w.b_QKV)
            Q = QKV[:, :w.q_width].reshape(n_rows, shard.n_head_local, cfg.d_head)
            K = QKV[:, w.q_width:w.q_width + w.kv_width].reshape(n_rows, shard.n_kv_head_local, cfg.d_head)
            V = QKV[:, w.q_width + w.kv_width:].reshape(n_rows, shard.n_kv_head_local, cfg.d_head)
            mark("matmul")
            if rope is not None:
                Q, K = apply_rope(Q, *rope), apply_rope(K, *rope)
            # Per sequence: append its K, V to its cache and attend over all its positions so far.
            B = np.empty((n_rows, shard.n_head_local * cfg.d_head), dtype=self.dtype)
            for (_, cache), start, end, n in zip(segments, starts, ends, map(len, ids_list)):
                K_all, V_all = cache.update(layer, K[end - n:end], V[end - n:end])
                B[end - n:end] = attention(Q[end - n:end], K_all, V_all, start)  # [n, n_head_local * d_head]
            mark("attention")
            # Row-parallel W_B gives a partial sum; Allreduce #1 completes it; bias once, after.
            np.matmul(B, w.W_B, out=buf)
            mark("matmul")
            mpi.allreduce_sum(self.comm, buf)
            mark("allreduce")
            x += buf  # x is this forward's own array: the residual is added in place
            if w.b_B is not None:
                x += w.b_B
            # MLP. C = norm_2(x), replicated.
            C = self._norm(x, w.norm_2_weight, w.norm_2_bias)
            mark("other")
            H = self._linear(C, w.W_C, w.b_C)
            mark("matmul")
            if w.gated:  # Llama: D = silu(C W_gate) * (C W_up), with W_C = [W_gate | W_up]
                D = silu(H[:, :shard.n_ffn_local]) * H[:, shard.n_ffn_local:]
            else:  # GPT-2: D = gelu(C W_C + b_C)
                D = gelu_tanh(H)
            mark("other")
            # Row-parallel W_D, Allreduce #2, bias once. E is the block's output, the new residual stream.
            np.matmul(D, w.W_D, out=buf)
            mark("matmul")
            mpi.allreduce_sum(self.comm, buf)
            mark("allreduce")
            x += buf
            if w.b_D is not None:
                x += w.b_D
            E = x  # the block's output (the trace copies it)
            if trace is not None:
                trace.record_layer(layer, A=A, Q=Q, K=K, V=V, B=B, C=C, D=D, E=E)

        for (_, cache), n in zip(segments, map(len, ids_list)):
            cache.advance(n)
        rows = np.arange(n_rows) if all_logits else ends - 1  # every new position, or each sequence's last
        h = self._norm(x[rows], g.norm_f_weight, g.norm_f_bias)
        mark("other")
        logits = (h @ g.W_head)[:, :shard.n_vocab_local]  # [len(rows), n_vocab_local]: this rank's vocabulary
        mark("lm_head")
        if self.vocab_parallel and (gather or trace is not None):
            full = mpi.allgather_columns(self.comm, logits, self._vocab_counts)
            if trace is not None:
                trace.record("logits", full)
            if gather:
                logits = full
        elif trace is not None:
            trace.record("logits", logits)
        if gather:  # whole rows for the caller; without gather, a view of the padded product (no copy)
            logits = np.ascontiguousarray(logits)
        bounds = np.concatenate([[0], ends]) if all_logits else np.arange(len(segments) + 1)
        return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def _norm(self, x, weight, bias):
        if self.config.family == "gpt2":
            return layer_norm(x, weight, bias, self.config.norm_eps)
        return rms_norm(x, weight, self.config.norm_eps)

    @staticmethod
    def _linear(x, W, b):
        # [n_seq, in] -> [n_seq, out]
        y = x @ W
        if b is not None:
            y += b
        return y


def load_model(model_dir, comm=None, dtype="float32", vocab_parallel=True):
    """Load a Hugging Face model folder onto ``comm`` (default: this process alone). See ``Model.load``."""
    return Model.load(model_dir, comm if comm is not None else mpi.serial(), dtype, vocab_parallel)
