"""The weight matrices' type: how a few rows are multiplied by a matrix.

``x @ W`` with x ``[M, in]`` is one matrix product (GEMM) in NumPy, and with M = 1 a vector-matrix product (GEMV),
which reads W once, straight through. With a few rows, as in decoding a batch of a few sequences, the product is
still bound by reading W, and OpenBLAS's GEMM packs W before it multiplies: two rows took about twice as long as
one. ``rows_product`` instead reads W once, a panel of columns at a time, and multiplies every row by a panel
while it is in the core's cache. Measured on 2026-12-07 on all of a rank's weight matrices, 2 ranks x 1 thread
(docs/benchmark.md, "batched decode"): on GPT-2-124M's shapes, two rows took 1.8x as long as one row this way
and 2.2x as one GEMM; at four rows 1.8x against 2.0x; at eight rows GEMM is faster (2.3x against 3.2x).

So the weight matrices (``mpitp.weights``) are ``Matrix``: a NumPy array in every respect, whose product with
2 to ``ROW_BY_ROW`` rows is ``rows_product``, each row's result bit for bit its product alone. The block still
reads ``B @ W_B``: the choice lives in the weights' type, not in the block.
"""

import numpy as np

ROW_BY_ROW = 4  # products of 2..4 rows go row by row; the bench times both ways at each batch size
PANEL_BYTES = 768 << 10  # a panel of W's columns, kept in the core's cache while each row multiplies it
PANEL_ALIGN = 64  # panels start on multiples of 64 columns: each column meets the BLAS kernel as in the whole product


def rows_product(x, W):
    """``x @ W`` for x ``[M, in]``, W ``[in, out]``, as M vector-matrix products, a panel of W's columns at a time
    (``PANEL_BYTES``): W is read from memory once. Each row's result is exactly ``x[i] @ W``. ``[M, out]``"""
    out = np.empty((len(x), W.shape[-1]), np.result_type(x, W))
    width = max(PANEL_ALIGN, PANEL_BYTES // (W.shape[0] * W.itemsize) // PANEL_ALIGN * PANEL_ALIGN)
    for c in range(0, W.shape[-1], width):
        panel = W[:, c:c + width]
        for row, y in zip(x, out):
            np.matmul(row, panel, out=y[c:c + width])
    return out


class Matrix(np.ndarray):
    """A weight matrix ``[in, out]``: ``x @ W`` of 2 to ``ROW_BY_ROW`` rows is ``rows_product``, anything else
    NumPy's product. Results are plain arrays. ``matrix(a)`` makes one (a view, no copy)."""

    def __rmatmul__(self, x):
        x, W = np.asarray(x), self.view(np.ndarray)
        return rows_product(x, W) if x.ndim == 2 and 1 < len(x) <= ROW_BY_ROW else x @ W


def matrix(a):
    """``a`` (2-D) as a ``Matrix`` view; None stays None."""
    return None if a is None else a.view(Matrix)
