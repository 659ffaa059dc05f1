"""``--summarize``: the scaling, ceiling, weights and batch tables of several JSON records (one per rank count), and
their plots; and reading the records, which ``--cluster-table`` shares.
"""

import json

from mpitp.cli.runner import out
from mpitp.errors import MpitpError, read_regular

from .plots import SKIPPED, plot_scaling, save_batch_plot
from .report import batch_ceiling_table


def scaling_table(records):
    """Speedup and efficiency of pp and tg against the fewest-ranks record, as a markdown table."""
    records = sorted(records, key=lambda r: r["ranks"])
    base = records[0]
    tests = [t["test"] for t in base["tests"]]
    head = ["ranks"] + [f"{t} {col}" for t in tests for col in ("t/s", "speedup", "efficiency")]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for r in records:
        cells = [str(r["ranks"])]
        for i, _ in enumerate(tests):
            speedup = r["tests"][i]["mean"] / base["tests"][i]["mean"]
            cells += [f"{r['tests'][i]['mean']:.2f}", f"{speedup:.2f}x",
                      f"{100 * speedup * base['ranks'] / r['ranks']:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ceiling_table(records):
    """Decode tokens/s per rank count against its two ceilings and the speedup each allows, as markdown:
    the DRAM read rate (bytes per token / bandwidth) and the matrix products alone (no other work)."""
    rows = [(r["ranks"], r["tests"][1]["mean"], r["roofline"]["decode_bound_tokens_per_s"],
             1e3 / r["decode_products"]["ms_per_token"]) for r in sorted(records, key=lambda r: r["ranks"])]
    base = rows[0]
    lines = ["| ranks | tg t/s | speedup | DRAM-bound t/s | its speedup | products-only t/s | its speedup |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, tg, dram, products in rows:
        lines.append(f"| {n} | {tg:.2f} | {tg / base[1]:.2f}x | {dram:.2f} | {dram / base[2]:.2f}x | "
                     f"{products:.2f} | {products / base[3]:.2f}x |")
    return "\n".join(lines)


def weights_table(records):
    """Each rank's weights and their imbalance per rank count, as markdown."""
    lines = ["| ranks | MB per rank | imbalance (max/mean) |", "|---:|---:|---:|"]
    for r in sorted(records, key=lambda r: r["ranks"]):
        mb = ", ".join(f"{b / 1e6:.3g}" for b in r["weights"]["bytes_per_rank"])
        lines.append(f"| {r['ranks']} | {mb} | {r['weights']['imbalance']:.2f} |")
    return "\n".join(lines)



def lacks(record):
    """What a record lacks that every table reads (None if nothing): its model, dtype, ranks, threads and a
    non-empty list of tests, each with its name, mean and sd."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [k for k in ("model", "dtype", "ranks", "threads", "tests") if k not in record]
    if missing:
        return "no " + ", ".join(missing)
    tests = record["tests"]
    if not (isinstance(tests, list) and tests and
            all(isinstance(t, dict) and {"test", "mean", "sd"} <= t.keys() for t in tests)):
        return "its tests are not a non-empty list of tests with a name, a mean and an sd"
    if type(record["ranks"]) is not int or record["ranks"] < 1:
        return f"ranks {record['ranks']!r} is not a rank count"
    return None


def read_records(paths):
    """The bench's JSON records in ``paths``; a file that is not one is an ``MpitpError`` naming it."""
    records = []
    for p in paths:
        try:
            record = json.loads(read_regular(p))
        except (ValueError, RecursionError) as e:
            raise MpitpError(f"{p}: not a JSON record of the bench ({type(e).__name__}).") from None
        if isinstance(record, dict) and "pipeline" in record and "tests" not in record:
            raise MpitpError(f"{p}: a record of python -m bench --pp (pipeline stages), which its run printed as a "
                             f"table; --summarize and --cluster-table read the tensor-parallel bench's records.")
        why = lacks(record)
        if why:
            raise MpitpError(f"{p}: not a JSON record of the bench ({why}; written by python -m bench --json-out).")
        records.append(record)
    return records


def checked(paths, text_of, records):
    """``text_of(records)``, or an ``MpitpError`` naming ``paths`` when a record lacks a field that a table reads
    or holds a value of another kind (a record edited by hand, or written by another version of the bench)."""
    try:
        return text_of(records)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise MpitpError(f"{', '.join(paths)}: a record lacks a field the tables read, or holds another kind of "
                         f"value ({type(e).__name__}: {e}); give records written by python -m bench --json-out."
                         ) from None


def summarize(paths, plot=None, batch_plot=None):
    """``--summarize``: print the scaling tables of several JSON records (and save the plots)."""
    records = read_records(paths)
    text = checked(paths, summary_text, records)
    plots = checked(paths, lambda recs: plot_lines(recs, plot, batch_plot), records)
    out("\n".join([text] + plots))
    return 0


def summary_text(records):
    """The scaling table, then those of the ceilings, the weights and each batch test the records hold."""
    out = [f"# scaling: {records[0]['model']}, {records[0]['dtype']}, threads per rank "
           f"{sorted({r['threads'] for r in records}, key=str)}", scaling_table(records)]
    if all("decode_products" in r for r in records):
        out += ["\n# decode against its ceilings: DRAM read rate per rank (all ranks reading at once) and the "
                "matrix products alone", ceiling_table(records)]
    if all("weights" in r for r in records):
        out += ["\n# weights each rank holds", weights_table(records)]
    for r in sorted((r for r in records if r.get("batch")), key=lambda r: r["ranks"]):
        out += [f"\n# batched decode against its ceiling, {r['ranks']} rank{'s' if r['ranks'] > 1 else ''}",
                batch_ceiling_table(r["batch"])]
    return "\n".join(out)


def plot_lines(records, plot, batch_plot):
    """Save the plots asked for; a line for each saying where, or why it was skipped."""
    out = []
    if plot:
        out.append(f"plot: {plot}" if plot_scaling(records, plot) else f"plot: {SKIPPED}")
    if batch_plot:
        out.append(save_batch_plot(records, batch_plot))
    return out
