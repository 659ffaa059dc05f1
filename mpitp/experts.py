"""Mixtures of experts: the router, the experts' math, and what each layout sends. Pure NumPy, no communication.

A mixture's MLP: a router (``W_router``, replicated) gives each row a softmax over the experts; the row goes to
the ``n_expert_used`` most probable (top-k), each expert is a gated MLP (silu(C W_gate) * (C W_up)) W_D, and the
row's output is the sum of its experts' outputs, each times its routing weight: the top-k probabilities
themselves (Qwen2-MoE, Qwen3-MoE, OLMoE by default) or renormalized to sum to 1 (Mixtral; norm_topk_prob).
Qwen2-MoE adds a shared expert every row uses, times sigmoid(C W_shared_gate).

Two layouts (``mpitp.sharding``; ``Model.experts_tensor`` and ``Model.experts_dispatched`` are their flows):

- ``tensor``: every rank holds a range of every expert's hidden columns and runs every chosen expert on the
  rows that chose it; the partial sums are completed by the seed's Allreduce #2;
- ``expert``: every rank holds whole experts; a rank takes its share of the rows, sends each (row, expert) pair
  to the expert's owner (``Alltoallv``, counts first), the owners return the weighted outputs (a second
  ``Alltoallv``), and the rows are gathered on every rank (``Allgatherv``) before the next attention.

Routing ties: the router's top-k takes the lowest expert index among equal probabilities (a stable sort).
Hugging Face's ``torch.topk`` on a CPU keeps no such rule: its kernel selects with ``std::nth_element`` or
``std::partial_sort`` on the values alone, so which of two equal probabilities wins depends on where they sit
(measured with torch 2.13: a tie at the k-th place went to the lower index in 928 of 2000 random rows of 6
experts, top-2; six equal probabilities gave experts 3 and 5). No index rule reproduces it; exact ties need a
router whose rows are equal, and a tie in float32 (Hugging Face's router softmax) that float64 separates is
as rare as a gap below 1e-7.
"""

import numpy as np

from .families import FAMILIES
from .layers import softmax, swiglu
from .sharding import block_range


def route(C, W_router, k, renormalize):
    """R ``[n_rows, n_expert]``: the weight of each expert's output in each row, 0 for the experts not chosen. The
    router in the model's precision: softmax over every expert, then the top ``k`` (lowest index first among
    ties), renormalized to sum to 1 if ``renormalize``."""
    probs = softmax(C @ W_router)  # [n_rows, n_expert]
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # [n_rows, k]
    top = np.take_along_axis(probs, chosen, -1)
    if renormalize:
        top /= top.sum(-1, keepdims=True)
    R = np.zeros_like(probs)
    np.put_along_axis(R, chosen, top, -1)
    return R


def expert_outputs(X, experts, weights, W_CE, W_DE):
    """``[n_pairs, n_embd]``: row i of X through its expert ``experts[i]`` (an index into this rank's ``W_CE``,
    ``W_DE``), times ``weights[i]``. One product per expert, over the rows it was sent."""
    Y = np.empty((len(X), W_DE.shape[-1]), X.dtype)
    for e in np.unique(experts):
        rows = np.flatnonzero(experts == e)
        Y[rows] = swiglu(X[rows] @ W_CE[e]) @ W_DE[e]
        Y[rows] *= weights[rows, None]
    return Y


def shared_partial(C, w):
    """This rank's partial sum of the shared expert's output, gated (Qwen2-MoE): sigmoid(C W_shared_gate) *
    (silu(C W_gate) * (C W_up)) W_D, ``[n_rows, n_embd]``; zeros for a mixture without one. The gate is a
    per-row scale, so it applies to each rank's partial sum as well as to their total."""
    if w.W_C is None:
        return np.zeros((len(C), w.W_router.shape[0]), C.dtype)
    gate = 1.0 / (1.0 + np.exp(-(C @ w.W_shared_gate)))  # [n_rows, 1]
    return (swiglu(C @ w.W_C) @ w.W_D) * gate


def pack(C, R, first, count, owner, size):
    """The message a rank dispatches for its rows ``first ..< first + count`` of C and the routing R: a message row
    per (row, chosen expert) pair, ``[C's row | expert | weight]``, ordered by the expert's ``owner`` (its rank,
    of ``size``), then by row and expert. Returns ``(message, rows, counts)``: the pairs' rows (indices into C)
    and how many pairs go to each rank."""
    rows, experts = np.nonzero(R[first:first + count])
    order = np.argsort(owner[experts], kind="stable")
    rows, experts = rows[order] + first, experts[order]
    message = np.column_stack([C[rows], experts, R[rows, experts]]).astype(C.dtype, copy=False)
    return message, rows, np.bincount(owner[experts], minlength=size)


def bytes_per_token(config, size, layout, itemsize, remote_pairs=None):
    """Bytes one rank sends, on average, per token and per layer for the MLP part of a mixture (attention's
    Allreduce #1 is the same in both layouts), by the textbook algorithms (ring Allreduce and Allgather), with
    the router spreading the tokens evenly over the experts, and so over the ranks:

    - ``tensor``: Allreduce #2 of each token's row: 2 (P - 1) / P * n_embd * itemsize;
    - ``expert``: each token is one rank's (1/P of them each); of its k pairs (P - 1) / P go to another rank,
      with n_embd + 2 values (the row, the expert, the weight), and as many rows of n_embd come back: per rank,
      k (2 n_embd + 2) (P - 1) / P^2 * itemsize; then every row reaches every other rank: an Allgather,
      (P - 1) / P * n_embd * itemsize (an Allreduce, twice that, where a shared expert's partial sums ride on
      it).

    So the expert layout sends less where k (2 n_embd + 2) < P n_embd, P > 2k (1 + 1/n_embd), and never with a
    shared expert: at 2 ranks and top-2 it sends more; its messages are also four collectives, not one.
    ``remote_pairs``: the pairs per token that left their rank under a real routing, in place of the even
    spread's k (P - 1) / P (``routed_pairs``).
    """
    P, d, k = size, config.n_embd, config.n_expert_used
    if layout == "tensor":
        return 2 * (P - 1) / P * d * itemsize
    gather = (2 if "W_shared_gate" in FAMILIES[config.family].weights() else 1) * (P - 1) / P * d
    remote = k * (P - 1) / P if remote_pairs is None else remote_pairs
    return (remote * (2 * d + 2) / P + gather) * itemsize


def routed_pairs(routes, owner, size):
    """Pairs per token (row) of the routings ``routes`` (each ``[n_rows, n_expert]``, one per layer and forward)
    whose expert's owner (``owner[expert]``: its rank of ``size``) is not the rank whose share of the rows holds
    the row (near-equal blocks, as ``Model.experts_dispatched`` splits them)."""
    remote, rows = 0, 0
    for R in routes:
        holder = np.repeat(np.arange(size), [block_range(len(R), size, r)[1] for r in range(size)])
        row, expert = np.nonzero(R)
        remote, rows = remote + np.count_nonzero(owner[expert] != holder[row]), rows + len(R)
    return remote / rows


def load_imbalance(R):
    """Tokens per expert (``[n_expert]``, of the routing R) and their max over their mean: 1.0 is a perfect
    spread; in the expert layout the busiest expert's rank sets the pace."""
    counts = np.count_nonzero(R, axis=0)
    return counts, float(counts.max() / counts.mean()) if counts.any() else 1.0
