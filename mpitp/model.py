"""The model: one rank's shard of the weights and the forward pass of the seed diagram.

``Model.block`` is the diagram, with its two Allreduce calls. Beside it, each other data flow is a short function of
its own: ``block_normed`` (QK-norm, and norms after each reduction: Qwen3, Gemma 3), ``block_parallel`` (one
reduction for attention and MLP: GPT-NeoX) and ``block_moe`` (a mixture of experts, sharded or dispatched); then
``embed``, ``lm_head`` and ``forward``. One rank runs this very same code on a 1-rank communicator (there is no
separate serial model), and the vocabulary is always split over the ranks (on one rank, the split is the whole
vocabulary).
"""

import hashlib

import numpy as np

from . import comm as mpi
from .checkpoint import Checkpoint
from .config import load_config
from .errors import MpitpError, RequestError
from .experts import expert_outputs, pack, route, shared_partial
from .families import FAMILIES
from .kvcache import KVCache, layer_slots
from .layers import (apply_rope, attention, causal_mask, geglu, gelu_erf, gelu_tanh, layer_norm, linear, rms_norm,
                     rope_inv_freq, rope_tables, swiglu)
from .resources import check_fits
from .sharding import block_range, check_rank_count, shard_for
from .stages import StageCache, StageGroup, layer_counts, place, split_stages
from .weights import load_weights, shard_bytes

DTYPES = {"float32": np.float32, "float64": np.float64}
SCORES_BYTES = 64 << 20  # attention scores of one chunk of a long prompt, at most (one chunk: at least a row)


class Model:
    """One rank's part of a tensor-parallel transformer. Build it with ``Model.load`` (or ``load_model``).

    Attributes: ``config`` (the whole model), ``shard`` (what this rank owns), ``blocks`` (a list of
    ``BlockWeights``), ``weights`` (``GlobalWeights``: embedding, final norm, LM head), ``comm``, ``dtype``.
    """

    stage = None  # with --pp: this rank's pipeline stage (``mpitp.stages.Stage``): ``blocks`` are its layers only

    def __init__(self, config, shard, blocks, weights, comm, dtype, node_ranks=1, fingerprint=None):
        self.config, self.shard, self.blocks, self.weights, self.comm, self.dtype = (
            config, shard, blocks, weights, comm, dtype)
        family, eps = FAMILIES[config.family], config.norm_eps  # the facts the block reads, not the family's name
        norm = {"layer_norm": layer_norm, "rms_norm": rms_norm}[family.norm]
        self.norm = lambda x, w, b: norm(x, w, b, eps)
        self.activation = ((swiglu if config.activation in ("silu", "swish") else geglu) if family.gated else
                           gelu_erf if config.activation == "gelu" else gelu_tanh)
        rope = family.positions == "rope"
        # Per layer its sliding window (0: none); per window the RoPE's inverse frequencies (None: GPT-2's positions)
        self.windows = config.windows or (0,) * config.n_layer
        self._inv_freq = {w: rope_inv_freq(config.rope_local if w and config.rope_local else config.rope,
                                           config.rotary_dims or config.d_head) if rope else None
                          for w in set(self.windows)}
        # The block's data flow: the seed's, with Qwen3's and Gemma 3's norms, GPT-NeoX's parallel one, or a
        # mixture of experts'.
        self.block_fn = self.block_normed if config.qk_norm or "post_norm_1_weight" in family.weights() else self.block
        self.block_fn = self.block_parallel if config.parallel_residual else self.block_fn
        if config.n_expert:
            self._moe_facts(config, shard, family)
        self.head_runs = shard.head_runs  # which local query heads share which local key/value heads
        self.node_ranks, self.fingerprint = node_ranks, fingerprint  # see Model.load

    @classmethod
    def load(cls, model_dir, comm, dtype="float32", arena=True, node_ranks=1, pp=1, pp_layers=None, experts=None,
             comm_dtype=None):
        """This rank's shard of a Hugging Face model folder for the ranks of ``comm`` (``mpitp.comm.serial()``:
        this process alone), cast to ``dtype`` ("float32" or "float64"), in the layout of ``mpitp.arena`` or
        (``arena=False``) plain arrays. ``node_ranks`` load on this node at once (``mpitp.comm.ranks_on_node``): the
        memory check counts them. Every check that bad input can fail (config, rank count, memory, checkpoint
        headers and shapes) runs here, with no communication; ``model.fingerprint`` is for the ranks to compare.
        ``pp`` > 1: this rank's pipeline stage of ``pp`` (``mpitp.stages``; a collective ``Split`` first, unless
        ``pp`` is the ``StageGroup`` that ``split_stages`` made already, and ``comm`` its stage's communicator), its
        layers ``pp_layers`` per stage or near-equal in bytes; ``model.comm`` is then this stage's ranks. One stage
        (``pp_layers`` of one count, the model's layers) is no pipeline: ``model.stage`` is None.

        ``experts``: a mixture of experts' layout, "tensor" or "expert" (None: ``sharding.default_layout``).

        ``comm_dtype``: the wire format of the block's reductions (``Model.sync_in``)."""
        try:
            dtype = DTYPES[np.dtype(dtype).name]
        except (TypeError, KeyError):
            raise MpitpError(f"dtype {dtype!r} is not supported; use one of: {', '.join(DTYPES)}.") from None
        group = pp if isinstance(pp, StageGroup) else None  # split by the caller: comm is then its stage's
        if group is None and (pp != 1 or pp_layers is not None):
            comm, group = split_stages(comm, pp)
        mpi.wire_comm(comm, comm_dtype, dtype)  # an unknown format: refused before the checkpoint is read
        config = load_config(model_dir)
        if experts is not None and not config.n_expert:
            raise RequestError(f"--experts {experts}: {model_dir} is not a mixture of experts; leave the option out.")
        check_rank_count(config, comm.Get_size(), group.count if group else 1)  # with --pp: a stage's ranks
        shard = shard_for(config, comm.Get_rank(), comm.Get_size(), experts)
        counts = None if group is None else layer_counts(config, group, pp_layers)  # checks --pp-layers
        stage = place(group, counts) if counts and len(counts) > 1 else None  # one stage is no pipeline
        ckpt = Checkpoint(model_dir)
        hint = "use more ranks, on more nodes" + (", or --dtype float32" if dtype == np.float64 else "")
        check_fits(shard_bytes(config, shard, dtype, stage), f"this rank's shard of {model_dir}", hint, node_ranks)
        fingerprint = _fingerprint(config, ckpt)
        weights = load_weights(ckpt, config, shard, dtype, arena, stage)
        model = cls(config, shard, *weights, comm, dtype, node_ranks, fingerprint)
        model.stage = stage
        return model.sync_in(comm_dtype)

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

    def _moe_facts(self, config, shard, family):
        # A mixture of experts: its block, its layout's MLP flow, which rank owns each expert, and for OLMoE's
        # QK-norm over the whole projection the widths it averages over and the key/value heads this rank counts
        # (a head held by two ranks, its query group straddling them, is counted by the first: its first query
        # head's rank).
        self.block_fn = self.block_moe
        self.moe_mlp = self.experts_dispatched if shard.experts == "expert" else self.experts_tensor
        P = shard.size
        self.expert_owner = np.repeat(np.arange(P), [block_range(config.n_expert, P, r)[1] for r in range(P)])
        self.qk_span = family.qk_norm_span
        self.qk_widths = np.array([config.n_head, config.n_kv_head], self.dtype) * config.d_head  # not int64:
        # an integer array would turn a float32 model's Q and K into float64
        kv_heads = shard.kv_head_start + np.arange(shard.n_kv_head_local)
        self.kv_counted = np.repeat(kv_heads * shard.group >= shard.head_start, config.d_head)

    def block_moe(self, x, w, layer, cache, rope, mask):
        """The seed's block with a mixture of experts for its MLP (``mpitp.experts``): the router's weights R
        ``[n_rows, n_expert]`` (0 for experts a row did not choose; replicated: every rank routes every row), and
        M ``[n_rows, n_embd]``, the weighted sum of the chosen experts' outputs (and the gated shared expert's),
        complete and replicated: ``experts_tensor`` or ``experts_dispatched`` computes it, with their collectives.
        The trace records A, Q, K, V, B, C, R, M, E."""
        A = self.norm(x, w.norm_1_weight, w.norm_1_bias)  # [n_rows, n_embd], replicated
        QKV = linear(A, w.W_QKV, w.b_QKV)  # column-parallel: [A W_Q | A W_K | A W_V], this rank's heads only
        Q, K, V = self.split_heads(QKV)  # [n_rows, n_head_local (Q) or n_kv_head_local (K, V), d_head]
        Q, K = self.qk_norm(Q, K, w)  # none, per head (Qwen3-MoE), or over the projection (OLMoE: an Allreduce)
        Q, K = apply_rope(Q, rope), apply_rope(K, rope)
        K_all, V_all = cache.update(layer, K, V)  # [n_batch, n_kv_head_local, n_kv, d_head]
        B = attention(Q, K_all, V_all, mask, self.head_runs)  # [n_rows, n_head_local d_head]
        B_partial = B @ w.W_B  # row-parallel: [n_rows, n_embd]
        mpi.allreduce_sum(self.comm, B_partial)  # Allreduce #1
        x = x + B_partial + w.b_B
        C = self.norm(x, w.norm_2_weight, w.norm_2_bias)  # [n_rows, n_embd], replicated
        R = route(C, w.W_router, self.config.n_expert_used, self.config.norm_topk)  # [n_rows, n_expert]
        M = self.moe_mlp(C, R, w)  # [n_rows, n_embd], the experts' weighted outputs: complete, on every rank
        E = x + M  # [n_rows, n_embd], the block's output
        return E

    def experts_tensor(self, C, R, w):
        """The tensor layout: every rank runs every chosen expert on the rows that chose it, with its range of the
        expert's hidden columns; each row's partial sums (and the shared expert's) are completed by the seed's
        Allreduce #2. ``[n_rows, n_embd]``."""
        rows, experts = np.nonzero(R)  # every (row, chosen expert) pair
        M = shared_partial(C, w)  # [n_rows, n_embd]: zeros without a shared expert
        np.add.at(M, rows, expert_outputs(C[rows], experts, R[rows, experts], w.W_CE, w.W_DE))
        mpi.allreduce_sum(self.comm, M)  # Allreduce #2
        return M

    def experts_dispatched(self, C, R, w):
        """The expert layout: this rank's share of the rows (near-equal blocks) goes, one message row per (row,
        chosen expert) pair, to the expert's owner; the owners run their experts and send the weighted outputs
        back; every rank's rows are then gathered on every rank. ``[n_rows, n_embd]``."""
        s, counts = self.shard, [block_range(len(C), self.shard.size, r)[1] for r in range(self.shard.size)]
        first = sum(counts[:s.rank])
        message, rows, send_counts = pack(C, R, first, counts[s.rank], self.expert_owner, s.size)
        recv_counts = mpi.alltoall_counts(self.comm, send_counts)  # counts first,
        X = mpi.alltoallv_rows(self.comm, message, send_counts, recv_counts)  # then the rows: [n_recv, n_embd + 2]
        Y = expert_outputs(X[:, :-2], X[:, -2].astype(np.int64) - s.expert_start, X[:, -1], w.W_CE, w.W_DE)
        back = mpi.alltoallv_rows(self.comm, Y, recv_counts, send_counts)  # weighted outputs, in the order sent
        mine = np.zeros((counts[s.rank], C.shape[1]), C.dtype)
        np.add.at(mine, rows - first, back)  # each of this rank's rows: the sum of its experts' outputs
        if w.W_C is None:
            return mpi.allgather_rows(self.comm, mine, counts)  # every rank's rows, on every rank
        M = shared_partial(C, w)  # the shared expert is tensor-parallel: its Allreduce gathers the rows too
        M[first:first + len(mine)] += mine
        mpi.allreduce_sum(self.comm, M)
        return M

    def qk_norm(self, Q, K, w):
        # The QK-norm of a mixture's family: none (Mixtral, Qwen2-MoE), per head (Qwen3-MoE: rank-local), or over
        # the whole projection (OLMoE): its mean of squares spans every rank's heads, so each row's two sums of
        # squares (of Q, and of K's key/value heads this rank counts) are summed by one small Allreduce.
        if w.norm_q_weight is None or self.qk_span == "head":
            return (Q, K) if w.norm_q_weight is None else (self.norm(Q, w.norm_q_weight, None),
                                                           self.norm(K, w.norm_k_weight, None))
        Qf, Kf = Q.reshape(len(Q), -1), K.reshape(len(K), -1)  # [n_rows, n_head_local d_head], [.., n_kv ..]
        sums = np.stack([np.square(Qf).sum(-1), np.square(Kf[:, self.kv_counted]).sum(-1)], -1)  # [n_rows, 2]
        mpi.allreduce_sum(self.comm, sums)
        rms = np.sqrt(sums / self.qk_widths + self.config.norm_eps)
        return ((Qf / rms[:, :1] * w.norm_q_weight).reshape(Q.shape),
                (Kf / rms[:, 1:] * w.norm_k_weight).reshape(K.shape))

    def block_parallel(self, x, w, layer, cache, rope, mask):
        """GPT-NeoX's parallel block (use_parallel_residual): attention and MLP both read the block's input x, each
        through its own norm, so the MLP need not wait for attention's sum: the two partial sums are added on each
        rank and ONE Allreduce completes both; the two row-parallel biases are added once, after it. E = x +
        attention(norm_1(x)) + MLP(norm_2(x)). Same locals as ``block``."""
        A = self.norm(x, w.norm_1_weight, w.norm_1_bias)  # attention's input [n_rows, n_embd], replicated
        QKV = linear(A, w.W_QKV, w.b_QKV)  # column-parallel: [A W_Q | A W_K | A W_V], this rank's heads only
        Q, K, V = self.split_heads(QKV)  # [n_rows, n_head_local, d_head] each
        Q, K = apply_rope(Q, rope), apply_rope(K, rope)  # partial rotary: the first rotary_dims of each head
        K_all, V_all = cache.update(layer, K, V)  # [n_batch, n_kv_head_local, n_kv, d_head]
        B = attention(Q, K_all, V_all, mask, self.head_runs)  # [n_rows, n_head_local d_head]
        C = self.norm(x, w.norm_2_weight, w.norm_2_bias)  # the MLP's input: a norm of x too, not of x + attention
        D = self.activation(linear(C, w.W_C, w.b_C))  # column-parallel: [n_rows, n_ffn_local]
        BE_partial = B @ w.W_B  # row-parallel: this rank's heads' share of attention, [n_rows, n_embd] ...
        BE_partial += D @ w.W_D  # ... plus its MLP columns' share of the MLP
        mpi.allreduce_sum(self.comm, BE_partial)  # the one Allreduce: attention + MLP, summed over every rank
        E = x + BE_partial + w.b_B + w.b_D  # [n_rows, n_embd], the block's output; each bias added once
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

    def forward(self, token_ids, cache, all_logits=False, gather=True, logits_from=0):
        """Run new tokens through the model, writing their keys and values into ``cache``; return the logits.

        ``token_ids`` ``[n_seq]`` (a one-sequence cache) or ``[n_batch, n_seq]``, trusted (generation validates
        requests). Logits ``[(n_batch,) n_seq or 1, n_vocab]``: of every new position with ``all_logits`` (from
        the new position ``logits_from`` on: scoring needs no LM head rows for its context), else of the last;
        with ``gather=False`` only this rank's vocabulary range ``[.., n_vocab_local]``. A long prompt
        goes through in chunks of positions against the cache so far: a chunk's attention scores are ``[n_batch,
        n_head_local, chunk, n_kv]``, so memory grows with the prompt, not its square.
        """
        ids = np.asarray(token_ids)
        rows = ids.reshape(len(cache.lengths), -1)  # [n_batch, n_seq]
        n_batch, n_seq = rows.shape
        n_kv = int(cache.lengths.max()) + n_seq
        chunk = min(self.prefill_chunk(n_batch, n_kv), cache.chunk)  # a sliding layer's ring: a window + a chunk
        logits = [self.forward_chunk(rows[:, i:i + chunk], cache, max(0, logits_from - i) if all_logits else None)
                  for i in range(0, n_seq, chunk)]
        logits = np.concatenate(logits, axis=1) if len(logits) > 1 and all_logits else logits[-1]
        if gather:
            counts = [block_range(self.config.n_vocab, self.shard.size, r)[1] for r in range(self.shard.size)]
            logits = mpi.allgather_columns(self.comm, logits, counts)
        return logits[0] if ids.ndim == 1 else logits

    def prefill_chunk(self, n_batch, n_kv):
        """Positions per chunk of a prompt whose keys will reach ``n_kv``. Every rank cuts the prompt alike (their
        Allreduce must pair up): by the most heads any rank holds, a fact of the model and the rank count, never of
        this rank's own share."""
        heads = -(-self.config.n_head // self.shard.size)
        return max(1, SCORES_BYTES // (n_batch * heads * n_kv * np.dtype(self.dtype).itemsize))

    def tables(self, positions, cache):
        """The masks ``[n_batch, n_seq, n_kv]`` and RoPE tables of each kind of layer in ``cache`` (full, or sliding
        by a window), keyed by window, for new tokens at ``positions`` ``[n_batch, n_seq]``: a mask is of the
        positions the layer's cache holds (a sliding layer's ring: its window and these tokens)."""
        n_seq = positions.shape[1]
        masks = {w: causal_mask(positions, cache.key_positions(w, n_seq), self.dtype, w) for w in cache.ring}
        ropes = {w: None if f is None else rope_tables(f, positions.ravel(), self.dtype)
                 for w, f in self._inv_freq.items() if w in cache.ring}
        return masks, ropes

    def forward_chunk(self, ids, cache, first=None):
        # ``forward`` of new tokens [n_batch, n_seq] -> this rank's logits [n_batch, n_seq - first or 1, n_vocab_local]
        # (of the positions first.. of each sequence, or with None of its last)
        n_batch, n_seq = ids.shape
        positions = cache.positions(n_seq)  # [n_batch, n_seq]
        masks, ropes = self.tables(positions, cache)
        x = self.embed(ids.ravel(), positions.ravel())  # [n_rows, n_embd]
        for layer, (w, window) in enumerate(zip(self.blocks, self.windows)):
            x = self.block_fn(x, w, layer, cache, ropes[window], masks[window])
        cache.advance(n_seq)
        n_out = 1 if first is None else max(n_seq - first, 0)
        x = x[n_seq - 1::n_seq] if first is None else x.reshape(n_batch, n_seq, -1)[:, first:].reshape(-1, x.shape[-1])
        logits = self.lm_head(x)  # each sequence's last row, or its rows from ``first`` on
        return logits.reshape(n_batch, n_out, logits.shape[-1])

    @property
    def weight_bytes(self):
        """Bytes of weights this rank holds (a tied LM head counted once)."""
        tied = self.config.tie_word_embeddings
        arrays = [a for w in self.blocks for a in vars(w).values()]
        arrays += [a for name, a in vars(self.weights).items() if not (tied and name == "W_embed")]
        return sum(a.nbytes for a in arrays if a is not None)

    def cache_bytes(self, capacity, n_batch=1):
        """Bytes of this rank's KV cache (of its stage's layers, with --pp) for ``n_batch`` sequences of up to
        ``capacity`` positions: a sliding layer holds its window and one chunk of new tokens
        (``mpitp.kvcache.layer_slots``), however long the sequence."""
        slots = sum(layer_slots(capacity, Model.cache_windows(self)))  # self: the bench asks with a stand-in too
        return 2 * n_batch * self.shard.n_kv_head_local * slots * self.config.d_head * np.dtype(self.dtype).itemsize

    def cache_windows(self):
        # The sliding window (0: none) of each layer this rank caches: its stage's, with --pp.
        cfg, stage = self.config, getattr(self, "stage", None)  # the bench asks with a stand-in for a model
        windows = cfg.windows or (0,) * cfg.n_layer
        return windows[stage.first_layer:stage.first_layer + stage.n_layer_local] if stage else windows

    def new_cache(self, capacity, n_batch=1):
        """A KV cache for ``n_batch`` sequences of up to ``capacity`` positions (at most the model's context)."""
        if not 1 <= capacity <= self.config.n_ctx:
            raise RequestError(f"a sequence of {capacity} positions does not fit the model's context of "
                               f"{self.config.n_ctx} positions.")
        check_fits(self.cache_bytes(capacity, n_batch), f"a KV cache of {n_batch} x {capacity} positions",
                   "ask for fewer tokens or prompts, or use more ranks, on more nodes", self.node_ranks)
        cache = KVCache(len(self.blocks), n_batch, self.shard.n_kv_head_local, self.config.d_head, capacity, self.dtype,
                        self.cache_windows())
        return cache if self.stage is None else StageCache(cache, self.stage.first_layer)  # its layers only


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


def load_model(model_dir, comm=None, dtype="float32", arena=True, experts=None):
    """Load a Hugging Face model folder onto ``comm`` (default: this process alone). See ``Model.load``."""
    return Model.load(model_dir, comm if comm is not None else mpi.serial(), dtype, arena, experts=experts)
