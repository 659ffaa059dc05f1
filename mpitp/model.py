"""The model: one rank's shard of the weights and the forward pass of the seed diagram.

``Model.block`` is the diagram, with its two Allreduce calls; ``embed``, ``lm_head`` and ``forward`` sit beside
it. One rank runs this very same code on a 1-rank communicator (there is no separate serial model), and the
vocabulary is always split over the ranks (on one rank, the split is the whole vocabulary).
"""

import hashlib

import numpy as np

from . import comm as mpi
from .checkpoint import Checkpoint
from .config import load_config
from .errors import MpitpError, RequestError
from .families import FAMILIES
from .kvcache import KVCache
from .layers import (apply_rope, attention, causal_mask, geglu, gelu_tanh, layer_norm, linear, rms_norm,
                     rope_inv_freq, rope_tables, swiglu)
from .resources import check_fits
from .sharding import block_range, shard_for
from .weights import load_weights, shard_bytes

DTYPES = {"float32": np.float32, "float64": np.float64}
SCORES_BYTES = 64 << 20  # attention scores of one chunk of a long prompt, at most (one chunk: at least a row)


class Model:
    """One rank's part of a tensor-parallel transformer. Build it with ``Model.load`` (or ``load_model``).

    Attributes: ``config`` (the whole model), ``shard`` (what this rank owns), ``blocks`` (a list of
    ``BlockWeights``), ``weights`` (``GlobalWeights``: embedding, final norm, LM head), ``comm``, ``dtype``.
    """

    def __init__(self, config, shard, blocks, weights, comm, dtype, node_ranks=1, fingerprint=None):
        self.config, self.shard, self.blocks, self.weights, self.comm, self.dtype = (
            config, shard, blocks, weights, comm, dtype)
        family, eps = FAMILIES[config.family], config.norm_eps  # the facts the block reads, not the family's name
        norm = {"layer_norm": layer_norm, "rms_norm": rms_norm}[family.norm]
        self.norm = lambda x, w, b: norm(x, w, b, eps)
        self.activation = (swiglu if config.activation in ("silu", "swish") else geglu) if family.gated else gelu_tanh
        rope = family.positions == "rope"
        # Per layer its sliding window (0: none); per window the RoPE's inverse frequencies (None: GPT-2's positions)
        self.windows = config.windows or (0,) * config.n_layer
        self._inv_freq = {w: rope_inv_freq(config.rope_local if w and config.rope_local else config.rope,
                                           config.d_head) if rope else None for w in set(self.windows)}
        # The block's data flow: the seed's, or with Qwen3's and Gemma 3's norms.
        self.block_fn = self.block_normed if config.qk_norm or "post_norm_1_weight" in family.weights() else self.block
        self.head_runs = shard.head_runs  # which local query heads share which local key/value heads
        self.node_ranks, self.fingerprint = node_ranks, fingerprint  # see Model.load

    @classmethod
    def load(cls, model_dir, comm, dtype="float32", arena=True, node_ranks=1, comm_dtype=None):
        """This rank's shard of a Hugging Face model folder for the ranks of ``comm`` (``mpitp.comm.serial()``:
        this process alone), cast to ``dtype`` ("float32" or "float64"), in the layout of ``mpitp.arena`` or
        (``arena=False``) plain arrays. ``node_ranks`` load on this node at once (``mpitp.comm.ranks_on_node``): the
        memory check counts them. Every check that bad input can fail (config, rank count, memory, checkpoint
        headers and shapes) runs here, with no communication; ``model.fingerprint`` is for the ranks to compare.
        ``comm_dtype``: the wire format of the block's reductions (``Model.sync_in``)."""
        try:
            dtype = DTYPES[np.dtype(dtype).name]
        except (TypeError, KeyError):
            raise MpitpError(f"dtype {dtype!r} is not supported; use one of: {', '.join(DTYPES)}.") from None
        mpi.wire_comm(comm, comm_dtype, dtype)  # an unknown format: refused before the checkpoint is read
        config = load_config(model_dir)
        shard = shard_for(config, comm.Get_rank(), comm.Get_size())
        ckpt = Checkpoint(model_dir)
        hint = "use more ranks, on more nodes" + (", or --dtype float32" if dtype == np.float64 else "")
        check_fits(shard_bytes(config, shard, dtype), f"this rank's shard of {model_dir}", hint, node_ranks)
        fingerprint = _fingerprint(config, ckpt)
        weights = load_weights(ckpt, config, shard, dtype, arena)
        return cls(config, shard, *weights, comm, dtype, node_ranks, fingerprint).sync_in(comm_dtype)

    def sync_in(self, comm_dtype):
        """Send the partial sums of every block's two reductions in the wire format ``comm_dtype`` (a name of
        ``mpitp.wire.FORMATS``; None or the model's dtype: the plain Allreduce, bit for bit), summed in the
        model's dtype (``mpitp.comm.wire_allreduce``). The embedding's and the scoring's sums stay exact. Once,
        when the model is built; returns the model."""
        comm = mpi.wire_comm(self.comm, comm_dtype, self.dtype)
        if comm is not self.comm:
            self.comm, self.block_fn = comm, comm.during(self.block_fn)
        return self

    def block(self, x, w, layer, cache, rope, mask):
        """One transformer block on this rank: the seed diagram, one line per arrow.

        ``x`` is the residual stream ``[n_rows, n_embd]``, the same on every rank: a row per new token, a batch's
        sequences one after the other (n_rows = n_batch n_seq). ``w`` is this rank's ``BlockWeights``. B is
        ``[n_rows, n_head_local d_head]``. Every product is local but the two Allreduce.

        The trace (``mpitp.trace``, ``--trace``) records the locals A, Q, K, V, B, C, D, E by these names, and
        ``layer``: they are its contract (docs/trace.md), and renaming one fails a test.
        """
        A = self.norm(x, w.norm_1_weight, w.norm_1_bias)  # [n_rows, n_embd], replicated
        QKV = linear(A, w.W_QKV, w.b_QKV)  # column-parallel: [A W_Q | A W_K | A W_V], this rank's heads only
        Q, K, V = self.split_heads(QKV)  # [n_rows, n_head_local (Q) or n_kv_head_local (K, V), d_head]
        Q, K = apply_rope(Q, rope), apply_rope(K, rope)  # Llama's rotary positions; GPT-2's are in x
        K_all, V_all = cache.update(layer, K, V)  # this rank's cache: [n_batch, n_kv_head_local, n_kv, d_head]
        B = attention(Q, K_all, V_all, mask, self.head_runs)  # softmax(QK^T / sqrt(d_head)) V per head, [n_rows, ..]
        B_partial = B @ w.W_B  # row-parallel: this rank's heads' share of the sum, [n_rows, n_embd]
        mpi.allreduce_sum(self.comm, B_partial)  # Allreduce #1: the sum over every rank's heads
        x = x + B_partial + w.b_B  # residual; the bias is added once, after the reduce
        C = self.norm(x, w.norm_2_weight, w.norm_2_bias)  # [n_rows, n_embd], replicated (the diagram's C0 = C1)
        D = self.activation(linear(C, w.W_C, w.b_C))  # column-parallel: [n_rows, n_ffn_local]
        E_partial = D @ w.W_D  # row-parallel: [n_rows, n_embd]
        mpi.allreduce_sum(self.comm, E_partial)  # Allreduce #2
        E = x + E_partial + w.b_D  # [n_rows, n_embd], the block's output
        return E

    def block_normed(self, x, w, layer, cache, rope, mask):
        """The seed's block with the norms of Qwen3 and Gemma 3: each head of Q and K normed before RoPE (rank-local:
        a head is whole on its rank), and, where the family has them (Gemma 3), each reduced output normed before
        it joins the residual: a norm of the sum over the ranks, so after the Allreduce, once. Same locals as
        ``block``."""
        A = self.norm(x, w.norm_1_weight, w.norm_1_bias)  # [n_rows, n_embd], replicated
        QKV = linear(A, w.W_QKV, w.b_QKV)  # column-parallel: [A W_Q | A W_K | A W_V], this rank's heads only
        Q, K, V = self.split_heads(QKV)  # [n_rows, n_head_local (Q) or n_kv_head_local (K, V), d_head]
        Q, K = self.norm(Q, w.norm_q_weight, None), self.norm(K, w.norm_k_weight, None)  # QK-norm, per head
        Q, K = apply_rope(Q, rope), apply_rope(K, rope)
        K_all, V_all = cache.update(layer, K, V)  # [n_batch, n_kv_head_local, n_kv, d_head]
        B = attention(Q, K_all, V_all, mask, self.head_runs, self.config.query_scale)  # [n_rows, n_head_local d_head]
        B_partial = B @ w.W_B  # row-parallel: [n_rows, n_embd]
        mpi.allreduce_sum(self.comm, B_partial)  # Allreduce #1
        x = x + self.post_norm(B_partial + w.b_B, w.post_norm_1_weight)  # Gemma 3 normalizes the sum, then adds
        C = self.norm(x, w.norm_2_weight, w.norm_2_bias)  # [n_rows, n_embd], replicated
        D = self.activation(linear(C, w.W_C, w.b_C))  # column-parallel: [n_rows, n_ffn_local]
        E_partial = D @ w.W_D  # row-parallel: [n_rows, n_embd]
        mpi.allreduce_sum(self.comm, E_partial)  # Allreduce #2
        E = x + self.post_norm(E_partial + w.b_D, w.post_norm_2_weight)  # [n_rows, n_embd], the block's output
        return E

    def post_norm(self, x, weight):
        # The norm of a reduced output where the family has one (Gemma 3), else x as it is. [n_rows, n_embd]
        return x if weight is None else self.norm(x, weight, None)

    def split_heads(self, QKV):
        # [n_rows, (n_head_local + 2 n_kv_head_local) d_head] -> views Q [n_rows, n_head_local, d_head], K, V
        heads = QKV.reshape(len(QKV), -1, self.config.d_head)
        q, kv = self.shard.n_head_local, self.shard.n_kv_head_local
        return heads[:, :q], heads[:, q:q + kv], heads[:, q + kv:]

    def embed(self, ids, positions):
        """``[n_rows]`` token ids -> the residual stream ``[n_rows, n_embd]``, on every rank. Vocab-parallel: each
        rank fills the rows of the ids in its vocabulary range and an Allreduce combines them."""
        g, s = self.weights, self.shard
        local = ids - s.vocab_start
        mine = (local >= 0) & (local < s.n_vocab_local)
        x = np.zeros(ids.shape + (self.config.n_embd,), dtype=self.dtype)
        x[mine] = g.W_embed[local[mine]]
        mpi.allreduce_sum(self.comm, x)
        if self.config.embed_scale != 1.0:  # Gemma scales the embedding by sqrt(n_embd)
            x *= self.dtype(self.config.embed_scale)
        if g.W_pos is not None:  # GPT-2's learned positions
            x += g.W_pos[positions]
        return x

    def lm_head(self, x):
        """The logits of this rank's vocabulary range: ``[.., n_embd] -> [.., n_vocab_local]``."""
        g = self.weights
        return self.norm(x, g.norm_f_weight, g.norm_f_bias) @ g.W_vocab

    def forward(self, token_ids, cache, all_logits=False, gather=True):
        """Run new tokens through the model, writing their keys and values into ``cache``; return the logits.

        ``token_ids`` ``[n_seq]`` (a one-sequence cache) or ``[n_batch, n_seq]``, trusted (generation validates
        requests). Logits ``[(n_batch,) n_seq or 1, n_vocab]``: of every new position with ``all_logits``, else of
        the last; with ``gather=False`` only this rank's vocabulary range ``[.., n_vocab_local]``. A long prompt
        goes through in chunks of positions against the cache so far: a chunk's attention scores are ``[n_batch,
        n_head_local, chunk, n_kv]``, so memory grows with the prompt, not its square.
        """
        ids = np.asarray(token_ids)
        rows = ids.reshape(len(cache.lengths), -1)  # [n_batch, n_seq]
        n_batch, n_seq = rows.shape
        n_kv = int(cache.lengths.max()) + n_seq
        # Every rank cuts the prompt alike (their Allreduce must pair up): by the most heads any rank holds,
        # a fact of the model and the rank count, never of this rank's own share.
        heads = -(-self.config.n_head // self.shard.size)
        chunk = max(1, SCORES_BYTES // (n_batch * heads * n_kv * np.dtype(self.dtype).itemsize))
        logits = [self.forward_chunk(rows[:, i:i + chunk], cache, all_logits) for i in range(0, n_seq, chunk)]
        logits = np.concatenate(logits, axis=1) if len(logits) > 1 and all_logits else logits[-1]
        if gather:
            counts = [block_range(self.config.n_vocab, self.shard.size, r)[1] for r in range(self.shard.size)]
            logits = mpi.allgather_columns(self.comm, logits, counts)
        return logits[0] if ids.ndim == 1 else logits

    def forward_chunk(self, ids, cache, all_logits):
        # ``forward`` of new tokens [n_batch, n_seq] -> this rank's logits [n_batch, n_seq or 1, n_vocab_local]
        n_batch, n_seq = ids.shape
        positions = cache.positions(n_seq)  # [n_batch, n_seq]
        # The mask [n_batch, n_seq, n_kv] and the RoPE tables of each kind of layer (full, or sliding by a window)
        masks = {w: causal_mask(positions, positions.max() + 1, self.dtype, w) for w in set(self.windows)}
        ropes = {w: None if f is None else rope_tables(f, positions.ravel(), self.dtype)
                 for w, f in self._inv_freq.items()}
        x = self.embed(ids.ravel(), positions.ravel())  # [n_rows, n_embd]
        for layer, (w, window) in enumerate(zip(self.blocks, self.windows)):
            x = self.block_fn(x, w, layer, cache, ropes[window], masks[window])
        cache.advance(n_seq)
        logits = self.lm_head(x if all_logits else x[n_seq - 1::n_seq])  # every row, or each sequence's last
        return logits.reshape(n_batch, -1, logits.shape[-1])

    @property
    def weight_bytes(self):
        """Bytes of weights this rank holds (a tied LM head counted once)."""
        tied = self.config.tie_word_embeddings
        arrays = [a for w in self.blocks for a in vars(w).values()]
        arrays += [a for name, a in vars(self.weights).items() if not (tied and name == "W_embed")]
        return sum(a.nbytes for a in arrays if a is not None)

    def cache_bytes(self, capacity, n_batch=1):
        """Bytes of this rank's KV cache for ``n_batch`` sequences of up to ``capacity`` positions."""
        cfg = self.config
        return 2 * n_batch * cfg.n_layer * self.shard.n_kv_head_local * capacity * cfg.d_head * np.dtype(
            self.dtype).itemsize

    def new_cache(self, capacity, n_batch=1):
        """A KV cache for ``n_batch`` sequences of up to ``capacity`` positions (at most the model's context)."""
        if not 1 <= capacity <= self.config.n_ctx:
            raise RequestError(f"a sequence of {capacity} positions does not fit the model's context of "
                               f"{self.config.n_ctx} positions.")
        check_fits(self.cache_bytes(capacity, n_batch), f"a KV cache of {n_batch} x {capacity} positions",
                   "ask for fewer tokens or prompts, or use more ranks, on more nodes", self.node_ranks)
        return KVCache(self.config.n_layer, n_batch, self.shard.n_kv_head_local, self.config.d_head, capacity,
                       self.dtype)


FINGERPRINTED = "model (digest of config.json, the checkpoint headers and each weight's first and last rows)"


def _fingerprint(config, ckpt):
    """A short digest of a model as stored: its config, every tensor's name, dtype and shape, and the values of
    its first and last rows (which every rank reads, whatever its slice: a stale copy differs there)."""
    digest = hashlib.sha256(repr(config).encode())
    for name in sorted(ckpt.names()):
        kind, shape = ckpt.dtype(name), ckpt.shape(name)
        digest.update(repr((name, kind, shape)).encode())
        if kind in ("F16", "BF16", "F32", "F64") and len(shape) in (1, 2) and all(shape):  # a weight
            for r in sorted({0, shape[0] - 1}):
                digest.update(ckpt.read(name, np.float64, (slice(r, r + 1),)).tobytes())
    return digest.hexdigest()[:16]


def load_model(model_dir, comm=None, dtype="float32", arena=True):
    """Load a Hugging Face model folder onto ``comm`` (default: this process alone). See ``Model.load``."""
    return Model.load(model_dir, comm if comm is not None else mpi.serial(), dtype, arena)
