"""The weight matrices' type: how a few rows are multiplied by a matrix.

``x @ W`` with x ``[M, in]`` is one matrix product (GEMM) in NumPy, and with M = 1 a vector-matrix product (GEMV),
which reads W once, straight through. With a few rows, as in decoding a batch of a few sequences, the product is
still bound by reading W, and OpenBLAS's GEMM packs W before it multiplies: two rows took about twice as long as
one. ``rows_product`` instead reads W once, a panel of columns at a time, and multiplies every row by a panel
while it is in the core's cache. Measured on 2026-12-07 on all of a rank's weight matrices, 2 ranks x 1 thread,
GPT-2-124M's shapes, three runs (docs/benchmark.md), as multiples of one row's time: two rows 1.2-2.2x this way
against 1.9-2.7x as one GEMM, three rows 1.5-2.2x against 2.8-3.3x, four rows 1.6-2.5x against 2.0-2.3x (two
runs of three this way), eight rows 3.2-3.7x against 2.3-2.9x (GEMM). Five rows, again at 2 ranks, every weight
matrix of GPT-2-124M's and SmolLM2-135M's shapes, four rounds each: 23.0-31.7 ms row by row against 27.7-35.4 as
one GEMM padded to 8 rows, row by row faster in all eight; at six rows each way won about half.

With more rows, GEMM's time depends on the row count's remainder by 4: OpenBLAS's kernels take rows 4 at a
time, and a remainder goes through slower ones. Measured on 2026-12-07 (the same matrices, float32, one
process): 5, 6 and 7 rows took 1.11, 1.41 and 1.36x as long as 8; 9-11 rows 1.10-1.40x as long as 12; 13-15
rows 1.06-1.29x as long as 16; 61 and 63 rows 1.10 and 1.21x as long as 64; 125-127 rows 1.01-1.07x as long as
128, 255 rows 1.04x as long as 256. ``padded_product`` multiplies fewer than ``PADDED_BELOW`` rows with zero rows
up to the next multiple of 4, and drops the extra rows of the result; more rows gain little, and their copy
would be a prompt's worth of memory.

So the weight matrices (``mpitp.weights``) are ``Matrix``: a NumPy array in every respect, whose product with
2 to ``ROW_BY_ROW`` rows is ``rows_product`` (at one BLAS thread each row's result is bit for bit its product
alone; a threaded GEMV splits the columns its own way) and with more ``padded_product``. The block still reads
``B @ W_B``: the choice lives in the weights' type, not in the block. Anything else computed from a weight
(``W * 2``, ``np.matmul(x, W)``, a sum) is a plain array or number; a view of one (``W.T``, a slice) is still a
weight.
"""

import numpy as np

ROW_BY_ROW = 5  # products of 2..5 rows go row by row; the bench times every way at each batch size
ROWS_STEP, PADDED_BELOW = 4, 256  # 6 to 255 rows are multiplied in a multiple of 4 (padded_product)
PANEL_BYTES = 768 << 10  # a panel of W's columns, kept in the core's cache while each row multiplies it
PANEL_ALIGN = 64  # panels start on multiples of 64 columns: at one thread, each column meets the same BLAS kernel


def row_by_row(n_rows):
    """Whether ``Matrix`` multiplies ``n_rows`` rows one at a time (``rows_product``)."""
    return 1 < n_rows <= ROW_BY_ROW


def rows_product(x, W):
    """``x @ W`` for x ``[M, in]``, W ``[in, out]``, as M vector-matrix products, a panel of W's columns at a time
    (``PANEL_BYTES``): W is read from memory once. At one BLAS thread each row's result is exactly ``x[i] @ W``.
    ``[M, out]``"""
    n = W.shape[-1]
    out = np.empty((len(x), n), np.result_type(x, W))
    width = max(PANEL_ALIGN, PANEL_BYTES // (W.shape[0] * W.itemsize) // PANEL_ALIGN * PANEL_ALIGN)
    cuts = list(range(0, n, width)) + [n]
    if len(cuts) > 2 and n - cuts[-2] < PANEL_ALIGN:  # a short last panel joins the one before: NumPy would take
        del cuts[-2]  # a single column for a dot product, not the BLAS's GEMV
    for c0, c1 in zip(cuts, cuts[1:]):
        for row, y in zip(x, out):
            np.matmul(row, W[:, c0:c1], out=y[c0:c1])
    return out


def padded_rows(n_rows):
    """The rows one GEMM of ``n_rows`` rows multiplies: below ``PADDED_BELOW``, ``n_rows`` rounded up to a multiple
    of ``ROWS_STEP``."""
    return -(-n_rows // ROWS_STEP) * ROWS_STEP if n_rows < PADDED_BELOW else n_rows


def padded_product(x, W):
    """``x @ W`` for x ``[M, in]`` as one GEMM of ``padded_rows(M)`` rows, x's and zero rows. ``[M, out]``"""
    n = padded_rows(len(x))
    if n == len(x):
        return x @ W
    padded = np.zeros((n, x.shape[1]), x.dtype)
    padded[:len(x)] = x
    return (padded @ W)[:len(x)]


class Matrix(np.ndarray):
    """A weight matrix ``[in, out]``: ``x @ W`` of 2 to ``ROW_BY_ROW`` rows is ``rows_product``, of more
    ``padded_product``, anything else NumPy's product. Results are plain arrays. ``matrix(a)`` makes one (a view,
    no copy)."""

    def __rmatmul__(self, x):
        x, W = np.asarray(x), self.view(np.ndarray)
        if x.ndim != 2 or W.ndim != 2 or len(x) == 1:
            return x @ W
        return rows_product(x, W) if row_by_row(len(x)) else padded_product(x, W)

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        # What a ufunc computes from a weight (a product, a sum, a comparison) is a plain array, or a number.
        arr = arr.view(np.ndarray)
        return arr[()] if return_scalar else arr


def matrix(a):
    """``a`` (2-D) as a ``Matrix`` view; None stays None."""
    return None if a is None else a.view(Matrix)
