"""The bench's PNG plots: tokens/s against ranks with the ideal line and the ceilings (``--summarize --plot``),
and batched decode against its ceiling per batch size (``--batch-plot``). Each file is written whole or not at
all, and only over a regular file; without matplotlib a plot is skipped with a line saying so.
"""

import os

import numpy as np

from mpitp.cli.runner import replace_file

SKIPPED = "skipped (matplotlib is not installed: pip install 'mpitp[plot]')"


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, plt, path, what):
    """Write ``fig`` to ``path`` (``replace_file``; the format from its extension, PNG without one) and close it."""
    try:
        replace_file(path, lambda f: fig.savefig(f, format=os.path.splitext(path)[1][1:] or "png", dpi=100),
                     f"{what} {path}")
    finally:
        plt.close(fig)


def scaling_ceilings(rec, i):
    """``(label, tokens/s)`` of the ceilings of test ``i`` (0: pp, 1: tg) in a record that has them."""
    rf = rec.get("roofline")
    if rf is None:
        return []
    if i == 0:
        return [("prefill roofline (GEMM + LM head read)", rf["prefill_bound_tokens_per_s"])]
    return [("DRAM roofline", rf["decode_bound_tokens_per_s"]),
            ("products alone", 1e3 / rec["decode_products"]["ms_per_token"])]


def plot_scaling(records, path):
    """Save tokens/s against ranks (``scaling_figure``) as a PNG; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    save(scaling_figure(records, plt), plt, path, "--plot")
    return True


def scaling_figure(records, plt):
    """tokens/s against ranks, pp and tg side by side: measured, the ideal line and each rank count's
    ceilings (``scaling_ceilings``), every y axis from 0."""
    records = sorted(records, key=lambda r: r["ranks"])
    ranks = [r["ranks"] for r in records]
    fig, axes = plt.subplots(1, len(records[0]["tests"]), figsize=(10, 4))
    for i, ax in enumerate(np.atleast_1d(axes)):
        means = [r["tests"][i]["mean"] for r in records]
        sds = [r["tests"][i]["sd"] for r in records]
        ax.errorbar(ranks, means, yerr=sds, marker="o", label="measured")
        ax.plot(ranks, [means[0] * n / ranks[0] for n in ranks], "--", color="gray", label="ideal")
        if all(scaling_ceilings(r, i) for r in records):
            for k, (label, _) in enumerate(scaling_ceilings(records[0], i)):
                ax.plot(ranks, [scaling_ceilings(r, i)[k][1] for r in records], ":", marker="_",
                        label=f"ceiling: {label}")
        ax.set(title=f"{records[0]['model']}: {records[0]['tests'][i]['test']}", xlabel="ranks",
               ylabel="tokens/s", xticks=ranks)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_batch(records, path):
    """Save aggregate decode tokens/s and its ceiling against batch size (one line pair per record) as a PNG,
    y from 0; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rec in records:
        b = rec["batch"]
        sizes = [r["batch"] for r in b]
        label = f"{rec['ranks']} rank{'s' if rec['ranks'] > 1 else ''}"
        line, = ax.plot(sizes, [r["decode_tokens_per_s"] for r in b], marker="o", label=f"{label}: measured")
        ax.plot(sizes, [r["ceiling_tokens_per_s"] for r in b], "--", color=line.get_color(),
                label=f"{label}: ceiling (GEMM or DRAM)")
    sizes = sorted({r["batch"] for rec in records for r in rec["batch"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_ylim(bottom=0)
    first = records[0]["batch"][0]
    ax.set(title=f"{records[0]['model']}: batched decode, pp{first['n_prompt']} tg{first['n_gen']}",
           xlabel="batch size (sequences)", ylabel="aggregate decode tokens/s")
    ax.legend()
    fig.tight_layout()
    save(fig, plt, path, "--batch-plot")
    return True


def save_batch_plot(records, path):
    """``--batch-plot``: the plot of the records that have a batch test, and one line saying what happened."""
    records = [r for r in records if r.get("batch")]
    if not records:
        return "batch plot: skipped (no batch test in the record: it ran with --batch none or --long)"
    return f"batch plot: {path}" if plot_batch(records, path) else f"batch plot: {SKIPPED}"
